"""Kernels over gradients: the Inf/NaN check with unscaling (loss scaler) and norm reductions (clipping).

Every kernel takes a flat (n,) view of one gradient array, float32 or float64 (Numba specializes per
dtype); the Python callers in npcpu.optim make the views. No fastmath anywhere in this file: these
kernels exist to see NaN and Inf.

Finiteness is decided on the bits, not with `isnan`/`isinf`: a float is Inf or NaN exactly when all
its exponent bits are set,

    float32  s eeeeeeee mmm...m   exponent mask 0x7f800000
    float64  s eeeeeeeeeee mmm...m  exponent mask 0x7ff0000000000000

so subnormals, -0.0 and the largest finite values are finite, and every NaN payload (quiet or
signalling, either sign) is not. `EXPONENT_MASKS` maps a float dtype to its mask, typed as the
unsigned integer of the same width, which is the dtype of the bits view the kernel reads.

Reductions run over fixed chunks of `CHUNK` elements, each chunk summed in order into a float64
partial, and the partials summed in order: the result does not depend on the thread count.
"""

import numpy as np
from numba import njit, prange

CHUNK = 1 << 14

EXPONENT_MASKS = {
    np.dtype(np.float32): np.uint32(0x7F800000),
    np.dtype(np.float64): np.uint64(0x7FF0000000000000),
}


@njit(parallel=True, cache=True)
def unscale_and_count_nonfinite(values, bits, exponent_mask, inv_scale):
    """Count the Inf/NaN entries of `values`, then multiply every entry by `inv_scale` in place.

    Parameters
    ----------
    values : (n,) float32 or float64
        A gradient, unscaled in place: ``values[i] *= inv_scale``, in the dtype of `values` (the
        caller passes `inv_scale` in that dtype), Inf/NaN entries included, as torch's
        ``_amp_foreach_non_finite_check_and_unscale_``. With ``inv_scale == 1`` nothing is written.
    bits : (n,) uint32 or uint64
        The same memory as `values`, viewed as unsigned integers of the same width.
    exponent_mask : uint32 or uint64
        ``EXPONENT_MASKS[values.dtype]``. Entry i is non-finite when
        ``bits[i] & exponent_mask == exponent_mask``; it is tested before it is scaled.
    inv_scale : float32 or float64

    Returns
    -------
    int
        The number of non-finite entries before scaling.
    """
    nonfinite = 0
    scale_values = inv_scale != 1
    for i in prange(values.shape[0]):
        if (bits[i] & exponent_mask) == exponent_mask:
            nonfinite += 1
        if scale_values:
            values[i] *= inv_scale
    return nonfinite


@njit(inline="always", cache=True)
def _power_sum_range(values, p, start, stop):
    """sum(|values[start:stop]| ** p) in float64, in index order; p == 2 and p == 1 skip the pow."""
    total = 0.0
    if p == 2.0:
        for i in range(start, stop):
            v = np.float64(values[i])
            total += v * v
    elif p == 1.0:
        for i in range(start, stop):
            total += abs(np.float64(values[i]))
    else:
        for i in range(start, stop):
            total += abs(np.float64(values[i])) ** p
    return total


LANES = 4
"""Chunks one thread sums side by side when p = 2: a chunk's sum is a chain of dependent float64
additions, each waiting for the one before, so a thread runs LANES chains at once (each chunk
still summed in index order: the same sums)."""


@njit(inline="always", cache=True)
def _square_sums_side_by_side(values, start, scale):
    """The sums of squares, in float64 and index order, of the LANES whole chunks from `start`
    (chunk k from start + k CHUNK), each entry first multiplied by `scale` in place (if any)."""
    a, b = values[start:start + CHUNK], values[start + CHUNK:start + 2 * CHUNK]
    c, d = values[start + 2 * CHUNK:start + 3 * CHUNK], values[start + 3 * CHUNK:start + 4 * CHUNK]
    t0 = t1 = t2 = t3 = 0.0
    for i in range(CHUNK):
        if scale is not None:
            a[i] *= scale
            b[i] *= scale
            c[i] *= scale
            d[i] *= scale
        v0, v1, v2, v3 = np.float64(a[i]), np.float64(b[i]), np.float64(c[i]), np.float64(d[i])
        t0 += v0 * v0
        t1 += v1 * v1
        t2 += v2 * v2
        t3 += v3 * v3
    return t0, t1, t2, t3


@njit(parallel=True, cache=True)
def chunk_power_sums(values, p, partials, scale=None):
    """``partials[c] = sum |values[i]| ** p`` over chunk c (elements c CHUNK .. (c + 1) CHUNK - 1),
    each accumulated in float64 in index order; with `scale`, first ``values *= scale`` in place
    in the same pass. `power_sum` adds the chunks' sums in chunk order; a tensor cut at multiples
    of CHUNK (npcpu.dist.shard) has its pieces' chunk sums added in that order to the same total.
    With p = 2, whole chunks are summed LANES at a time (`_square_sums_side_by_side`).

    Parameters
    ----------
    values : (n,) float32 or float64
    p : float
    partials : (ceil(n / CHUNK),) float64, written
    scale : float32 or float64 (the dtype of `values`), optional
    """
    n = values.shape[0]
    groups = n // CHUNK // LANES if p == 2.0 else 0  # of LANES whole chunks
    rest = groups * LANES  # the first chunk summed on its own
    for task in prange(groups + partials.shape[0] - rest):
        if task < groups:
            c = task * LANES
            partials[c], partials[c + 1], partials[c + 2], partials[c + 3] = \
                _square_sums_side_by_side(values, c * CHUNK, scale)
        else:
            c = rest + task - groups
            start, stop = c * CHUNK, min(n, (c + 1) * CHUNK)
            if scale is not None:
                for i in range(start, stop):
                    values[i] *= scale
            partials[c] = _power_sum_range(values, p, start, stop)


RANK_SUM_BLOCK = 128
"""Elements of one chunk that `sum_ranks_and_square_chunks` adds, writes and squares at a time:
the ranks' sum and its squares are vector loops over a block in the cache, and only the running
sum of squares, a chain of dependent additions, is left to scalar code."""


@njit(inline="always", cache=True)
def _sum_ranks_block(sources, out, start, count, running, squares):
    """``out[start:start + count] = sources[0] + sources[1] + ...`` over those elements, each
    addition rounded to the dtype (as NumPy adds them one source after the other), the sum kept
    in `running` until every source is read (`out` may be one of them), and
    ``squares[i] = float64(sum[i]) ** 2``, the product `_power_sum_range` forms."""
    first, second = sources[0][start:start + count], sources[1][start:start + count]
    for i in range(count):
        running[i] = first[i] + second[i]
    for r in range(2, len(sources)):
        more = sources[r][start:start + count]
        for i in range(count):
            running[i] += more[i]
    written = out[start:start + count]
    for i in range(count):
        written[i] = running[i]
        v = np.float64(running[i])
        squares[i] = v * v


@njit(inline="always", cache=True)
def _add_in_order(total, squares, count):
    """total + squares[0] + squares[1] + ... + squares[count - 1], added in that order."""
    for i in range(count):
        total += squares[i]
    return total


@njit(parallel=True, cache=True)
def sum_ranks_and_square_chunks(sources, out, starts, partials):
    """The ranks' sum of a gradient buffer's chunks, and each chunk's sum of squares in the same
    pass: for each chunk c (elements starts[c] .. starts[c + 1] - 1 of the buffer, at most CHUNK
    of them), ``out = sources[0] + sources[1] + ...`` in rank order (npcpu.dist.node.add_ranks),
    and ``partials[c]`` the sum of the squares of those sums, in float64 and index order:
    bit for bit `chunk_power_sums`' partial (p = 2) of that chunk.

    The chunk's elements go a block of RANK_SUM_BLOCK at a time (`_sum_ranks_block`). A run of
    LANES whole chunks is summed side by side, their running sums of squares being independent
    chains (as in chunk_power_sums); lane k works k blocks behind lane 0: the chunks lie CHUNK
    elements apart, a multiple of 4 KiB, and a load at the same address modulo 4 KiB as a store
    still in flight waits for it, so lanes in step would stall on each other's stores. The other
    chunks go one at a time.

    Parameters
    ----------
    sources : tuple of (n,) float32 or float64
        The ranks' buffers, in rank order (at least two). `out` may be one of them.
    out : (n,) of the same dtype
    starts : (chunks + 1,) int64
        Where each chunk begins, then where the last one ends (the chunks are consecutive).
    partials : (chunks,) float64, written
    """
    block = RANK_SUM_BLOCK
    steps = CHUNK // block  # blocks in a chunk
    chunks = partials.shape[0]
    groups = chunks // LANES
    for task in prange(groups + chunks - groups * LANES):
        first = task * LANES if task < groups else groups * LANES + task - groups
        lanes = LANES if task < groups else 1
        whole = True
        for k in range(lanes):
            whole = whole and starts[first + k + 1] - starts[first + k] == CHUNK
        running = np.empty(block, out.dtype)
        squares = np.empty((LANES, block))
        totals = np.zeros(LANES)
        if lanes == LANES and whole:
            for step in range(LANES - 1):  # lanes 0 .. step start
                for k in range(step + 1):
                    _sum_ranks_block(sources, out, starts[first + k] + (step - k) * block,
                                     block, running, squares[k])
                    totals[k] = _add_in_order(totals[k], squares[k], block)
            s0, s1, s2, s3 = starts[first], starts[first + 1], starts[first + 2], starts[first + 3]
            q0, q1, q2, q3 = squares[0], squares[1], squares[2], squares[3]
            t0, t1, t2, t3 = totals[0], totals[1], totals[2], totals[3]
            for step in range(LANES - 1, steps):  # every lane
                _sum_ranks_block(sources, out, s0 + step * block, block, running, q0)
                _sum_ranks_block(sources, out, s1 + (step - 1) * block, block, running, q1)
                _sum_ranks_block(sources, out, s2 + (step - 2) * block, block, running, q2)
                _sum_ranks_block(sources, out, s3 + (step - 3) * block, block, running, q3)
                for i in range(block):
                    t0 += q0[i]
                    t1 += q1[i]
                    t2 += q2[i]
                    t3 += q3[i]
            totals[0], totals[1], totals[2], totals[3] = t0, t1, t2, t3
            for step in range(steps, steps + LANES - 1):  # lanes step - steps + 1 .. 3 finish
                for k in range(step - steps + 1, LANES):
                    _sum_ranks_block(sources, out, starts[first + k] + (step - k) * block,
                                     block, running, squares[k])
                    totals[k] = _add_in_order(totals[k], squares[k], block)
        else:
            for k in range(lanes):
                c = first + k
                for start in range(starts[c], starts[c + 1], block):
                    count = min(block, starts[c + 1] - start)
                    _sum_ranks_block(sources, out, start, count, running, squares[0])
                    totals[k] = _add_in_order(totals[k], squares[0], count)
        for k in range(lanes):
            partials[first + k] = totals[k]


@njit(cache=True)
def power_sum(values, p, scale=None):
    """``sum_i |values[i]| ** p`` accumulated in float64: the p-th power of the p-norm. With
    `scale`, first ``values *= scale`` in place, in the same pass over memory (clipping and the
    clipped gradient's norm at once): bit for bit the two steps one after the other.

    Parameters
    ----------
    values : (n,) float32 or float64
    p : float
        p > 0 (the caller checks). p = 2 gives the squared Euclidean norm.
    scale : float32 or float64 (the dtype of `values`), optional

    Returns
    -------
    float
        The sum of `chunk_power_sums` in chunk order. A NaN or Inf entry makes it NaN or Inf.
    """
    partials = np.zeros((values.shape[0] + CHUNK - 1) // CHUNK)
    chunk_power_sums(values, p, partials, scale)
    total = 0.0
    for c in range(partials.shape[0]):
        total += partials[c]
    return total


@njit(inline="always", cache=True)
def _max_abs_update(running, value):
    """max(running, value) where a NaN on either side wins, so that a NaN is never lost."""
    if value > running or value != value:
        return value
    return running


@njit(parallel=True, cache=True)
def max_abs(values):
    """``max_i |values[i]|`` in float64 (the inf-norm); NaN if any entry is NaN; 0 for n = 0.

    Parameters
    ----------
    values : (n,) float32 or float64
    """
    n = values.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    partials = np.zeros(n_chunks)
    for c in prange(n_chunks):
        running = 0.0
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            running = _max_abs_update(running, abs(np.float64(values[i])))
        partials[c] = running
    result = 0.0
    for c in range(n_chunks):
        result = _max_abs_update(result, partials[c])
    return result
