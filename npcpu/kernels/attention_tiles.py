"""Causal self-attention on the native float32 tile: each (batch, head) pair's products, softmax
and gradients in one parallel pass per direction.

Legend: B batch, H heads, T queries, S keys (S = T in training; S = offset + T with a key/value
cache), D head size; query t sits at absolute position offset + t and sees keys 0 .. offset + t.
q (B, H, T, D), k and v (B, H, S, D), y and dy (B, H, T, D): any strides (heads of c_attn's and
c_proj's (B, T, .) arrays). probs (B, H, T, S): C-contiguous, float32 throughout.

forward, per pair (npcpu.nn.attention's module docstring has the math):

    probs = causal_softmax(scale * q k^T)           (T, S), exactly 0 above the causal diagonal
    y     = probs v                                 (T, D)

backward, per pair, from dy and the kept probs:

    dprobs  = dy v^T                                (T, S)
    dscores = scale * probs * (dprobs - rowsum(dprobs * probs))   (npcpu.kernels.attention)
    dv = probs^T dy,   dq = dscores k,   dk = dscores^T q

Every product runs on npcpu.kernels.dpbf16's tile (ROWS x COLUMNS of the result per call, float32
fused multiply-adds on zmm registers), whose A operand is read with any row and pair strides (so
probs, dscores and their transposes are read in place) and whose B operand is packed into rows of
COLUMNS floats. Per pair, q, k, v and dy are copied once into that packed form:

    rows layout        X (R, D) -> panels (ceil(D / COLUMNS), R, COLUMNS): panel j, row r holds
                       X[r, j COLUMNS : (j + 1) COLUMNS], zero past D
    transposed layout  X (R, D) -> panels (ceil(R / COLUMNS), Dp, COLUMNS), Dp = D rounded up to
                       COLUMNS: panel j, row d holds X[j COLUMNS : (j + 1) COLUMNS, d], zero past R

Why one pass per pair instead of a batched GEMM per product: at T = 64, D = 32 a product is
131 072 multiply-adds, so the cost of a GEMM call, a thread hand-off per product and writing and
re-reading each (T, T) result through memory between the steps outweighs the arithmetic; here a
pair's operands and its (T, S) rows stay in the core's caches from the first product to the last,
and there is one parallel region per direction. The causal mask also skips work: a row tile of
queries reads only keys up to its last row's position (half of q k^T, probs v, dy v^T and
dscores k), and the transposed products (dv, dk) start at the first query that sees the tile's
keys.

Each product's multiply-adds run in the tile's order (one fused multiply-add per term, summed
along the shared index in increasing order), so a result equals BLAS sgemm's up to float32
rounding of a sum taken in another order.
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels import dpbf16
from npcpu.kernels.attention import softmax_row, softmax_row_backward

ROWS, COLUMNS = dpbf16.ROWS, dpbf16.COLUMNS


def panels(n: int) -> int:
    return (n + COLUMNS - 1) // COLUMNS


@njit(cache=True)
def pack_rows(x, out):
    """x (R, D) -> out (panels(D) * R * COLUMNS,): the rows layout of the module docstring."""
    rows, depth = x.shape
    for j in range((depth + COLUMNS - 1) // COLUMNS):
        width = min(COLUMNS, depth - j * COLUMNS)
        for r in range(rows):
            base = (j * rows + r) * COLUMNS
            for c in range(width):
                out[base + c] = x[r, j * COLUMNS + c]
            for c in range(width, COLUMNS):
                out[base + c] = 0.0


@njit(cache=True)
def pack_transposed(x, out):
    """x (R, D) -> out (panels(R) * Dp * COLUMNS,): the transposed layout of the module docstring
    (rows of X become columns of the packed B, so that a product takes X^T as its B)."""
    rows, depth = x.shape
    padded = (depth + COLUMNS - 1) // COLUMNS * COLUMNS
    for j in range((rows + COLUMNS - 1) // COLUMNS):
        width = min(COLUMNS, rows - j * COLUMNS)
        block = out[j * padded * COLUMNS:(j + 1) * padded * COLUMNS]
        block[:] = 0.0
        for c in range(width):
            row = x[j * COLUMNS + c]
            for d in range(depth):
                block[d * COLUMNS + c] = row[d]


@njit(cache=True)
def _store(tile_out, dest, row0, rows, column0):
    """dest[row0 + i, column0 + c] = tile_out[i * COLUMNS + c], the part of the tile inside dest."""
    columns = min(COLUMNS, dest.shape[1] - column0)
    for i in range(rows):
        for c in range(columns):
            dest[row0 + i, column0 + c] = tile_out[i * COLUMNS + c]


@njit(cache=True)
def _rows_times_transposed(a_rows, b_transposed, depth, n_rows, n_columns, visible, offset,
                           tile_out, dest):
    """dest (n_rows, n_columns) = A B^T for A (n_rows, depth) and B (n_columns, depth), from A's
    rows layout and B's transposed layout: q k^T and dy v^T. Column tiles that no row of a row
    tile may see (causal: keys past offset + its last row) are skipped when `visible`, left
    unwritten (the softmax writes its zeros there)."""
    padded = (depth + COLUMNS - 1) // COLUMNS * COLUMNS
    for t0 in range(0, n_rows, ROWS):
        rows = min(ROWS, n_rows - t0)
        columns = min(n_columns, offset + t0 + rows) if visible else n_columns
        for j in range((columns + COLUMNS - 1) // COLUMNS):
            for p in range((depth + COLUMNS - 1) // COLUMNS):  # A's rows layout: one call a panel
                dpbf16.tile(a_rows, (p * n_rows + t0) * COLUMNS, COLUMNS, 1, rows, b_transposed,
                            (j * padded + p * COLUMNS) * COLUMNS, min(COLUMNS, depth - p * COLUMNS),
                            tile_out, 0, p > 0)
            _store(tile_out, dest, t0, rows, j * COLUMNS)


@njit(cache=True)
def _masked_times_rows(a, a_start, a_row_step, a_pair_step, n_rows, transposed, offset, b_rows,
                       b_length, tile_out, dest):
    """dest (n_rows, D) = A B for B (b_length, D) in rows layout (D = dest's columns) and A
    (n_rows, b_length) read in place, element (i, r) at a_start + i a_row_step + r a_pair_step:
    probs v and dscores k (A causal: row t is zero past key offset + t), or, when `transposed`,
    probs^T dy and dscores^T q (A's row s is zero before query s - offset). Each row tile sums
    only the pairs its rows can see."""
    depth = dest.shape[1]
    for t0 in range(0, n_rows, ROWS):
        rows = min(ROWS, n_rows - t0)
        if transposed:
            first, stop = min(b_length, max(0, t0 - offset)), b_length
        else:
            first, stop = 0, min(b_length, offset + t0 + rows)
        for j in range((depth + COLUMNS - 1) // COLUMNS):
            dpbf16.tile(a, a_start + t0 * a_row_step + first * a_pair_step, a_row_step,
                        a_pair_step, rows, b_rows, (j * b_length + first) * COLUMNS, stop - first,
                        tile_out, 0, False)
            _store(tile_out, dest, t0, rows, j * COLUMNS)


@njit(parallel=True, cache=True)
def attention_forward(q, k, v, probs, y, offset, scale):
    """probs (B, H, T, S) = causal_softmax(scale * q k^T) and y (B, H, T, D) = probs v, both
    written (module docstring)."""
    batch, heads, queries, depth = q.shape
    keys = k.shape[2]
    flat_probs = probs.reshape(-1)
    d_panels, s_panels = (depth + COLUMNS - 1) // COLUMNS, (keys + COLUMNS - 1) // COLUMNS
    for g in prange(batch * heads):
        b, h = g // heads, g % heads
        q_rows = np.empty(d_panels * queries * COLUMNS, np.float32)
        k_transposed = np.empty(s_panels * d_panels * COLUMNS * COLUMNS, np.float32)
        v_rows = np.empty(d_panels * keys * COLUMNS, np.float32)
        tile_out = np.empty(ROWS * COLUMNS, np.float32)
        pack_rows(q[b, h], q_rows)
        pack_transposed(k[b, h], k_transposed)
        pack_rows(v[b, h], v_rows)
        p = probs[b, h]
        _rows_times_transposed(q_rows, k_transposed, depth, queries, keys, True, offset,
                               tile_out, p)
        bits = np.empty(keys, np.int32)
        for t in range(queries):
            softmax_row(p[t], min(keys, offset + t + 1), scale, bits)
        _masked_times_rows(flat_probs, g * queries * keys, keys, 1, queries, False, offset,
                           v_rows, keys, tile_out, y[b, h])


@njit(parallel=True, cache=True)
def attention_backward(dy, q, k, v, probs, dq, dk, dv, offset, scale):
    """dq (B, H, T, D), dk and dv (B, H, S, D), written, from dy (B, H, T, D), the forward's q, k,
    v and probs (module docstring). With offset > 0 (keys before the queries), dk and dv hold
    only the queries' contributions."""
    batch, heads, queries, depth = q.shape
    keys = k.shape[2]
    flat_probs = probs.reshape(-1)
    d_panels, s_panels = (depth + COLUMNS - 1) // COLUMNS, (keys + COLUMNS - 1) // COLUMNS
    for g in prange(batch * heads):
        b, h = g // heads, g % heads
        dy_rows = np.empty(d_panels * queries * COLUMNS, np.float32)
        q_rows = np.empty(d_panels * queries * COLUMNS, np.float32)
        k_rows = np.empty(d_panels * keys * COLUMNS, np.float32)
        v_transposed = np.empty(s_panels * d_panels * COLUMNS * COLUMNS, np.float32)
        dscores = np.empty(queries * keys, np.float32)
        tile_out = np.empty(ROWS * COLUMNS, np.float32)
        pack_rows(dy[b, h], dy_rows)
        pack_rows(q[b, h], q_rows)
        pack_rows(k[b, h], k_rows)
        pack_transposed(v[b, h], v_transposed)
        p, ds = probs[b, h], dscores.reshape(queries, keys)
        # forward: y = probs v
        _rows_times_transposed(dy_rows, v_transposed, depth, queries, keys, True, offset,
                               tile_out, ds)
        _masked_times_rows(flat_probs, g * queries * keys, 1, keys, keys, True, offset, dy_rows,
                           queries, tile_out, dv[b, h])
        # forward: probs = causal_softmax(scale * scores)
        for t in range(queries):
            softmax_row_backward(ds[t], p[t], min(keys, offset + t + 1), scale)
        # forward: scores = q k^T
        _masked_times_rows(dscores, 0, keys, 1, queries, False, offset, k_rows, keys, tile_out,
                           dq[b, h])
        _masked_times_rows(dscores, 0, 1, keys, keys, True, offset, q_rows, queries, tile_out,
                           dk[b, h])
