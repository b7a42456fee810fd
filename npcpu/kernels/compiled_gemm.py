"""The loops of the compiled training step (npcpu.kernels.compiled_step) for one layer: forward
out = relu?(a[rows] W^T + b), dL/dW, dL/dx and the ReLU's backward, over a gathered set of rows.

Legend: a (R, K) a layer's input with rows (n,) indices into it, W (M, K) torch layout, b (M,),
dz (>= n, M) dL/d(pre-activation), dx (>= n, K).

The GEMMs are register-tiled loops over 4 rows at a time whose innermost loop runs over the
contiguous K dimension, so LLVM vectorizes it: for the layers the compiled path is for (784 -> 10
at batch 128 is 1M multiply-adds) they are faster than BLAS calls, which pay dispatch and packing
for each of the 3 GEMMs of a layer and step. `reassoc` lets LLVM keep several partial sums in a
dot product (the order of a float32 sum then differs from BLAS's, within float32 rounding);
`contract` fuses multiply-adds. Neither removes NaN or Inf: a diverged loss stays NaN. The bias
gradient is npcpu.kernels.linear.add_row_sums, the reference Linear's own reduction.
"""

from numba import njit

from npcpu.kernels.intrinsics import prefetch

FAST = {"contract", "reassoc"}
ROW_TILE = 4  # rows that share each load of a weight row in the GEMMs below
CACHE_LINE = 64  # bytes


@njit(cache=True)
def prefetch_rows(a, rows, first, stop):
    """Prefetch every cache line of a[rows[i]] for first <= i < min(stop, rows.size)."""
    step = CACHE_LINE // a.itemsize
    for i in range(first, min(stop, rows.size)):
        row = a[rows[i]]
        for k in range(0, row.size, step):
            prefetch(row, k)


@njit(cache=True, fastmath=FAST)
def linear_forward(a, rows, weight, bias, relu, out, first_col, stop_col):
    """out[i, m] = sum_k a[rows[i], k] weight[m, k] + bias[m], then max(., 0) when `relu`;
    the sum runs over first_col <= k < stop_col (all of K for a whole layer, a block of columns
    for a partial sum of layer 0).

    a (R, K) with rows (n,) indices into it; weight (M, K); bias (M,) or (0,) for none;
    out (>= n, M), rows 0..n-1 written (out[i] is the output of row rows[i]). Tiles of 4 rows x 2
    weight rows: 6 loads per 8 multiply-adds, 8 running sums (vectors, after LLVM vectorizes
    over k). The loops index slices from 0: a loop index that might be negative would make Numba
    check every index for wraparound, and LLVM would not vectorize.
    """
    n = rows.size
    n_out, width = weight.shape[0], stop_col - first_col
    zero = out.dtype.type(0)
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % 2
    for i in range(0, full_rows, ROW_TILE):
        x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
        x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
        for m in range(0, full_outs, 2):
            w, v = weight[m, first_col:stop_col], weight[m + 1, first_col:stop_col]
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
            for k in range(width):
                s0 += x0[k] * w[k]
                s1 += x1[k] * w[k]
                s2 += x2[k] * w[k]
                s3 += x3[k] * w[k]
                t0 += x0[k] * v[k]
                t1 += x1[k] * v[k]
                t2 += x2[k] * v[k]
                t3 += x3[k] * v[k]
            out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = s0, s1, s2, s3
            out[i, m + 1], out[i + 1, m + 1], out[i + 2, m + 1], out[i + 3, m + 1] = t0, t1, t2, t3
        for m in range(full_outs, n_out):
            w = weight[m, first_col:stop_col]
            out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = (
                _dot(x0, w), _dot(x1, w), _dot(x2, w), _dot(x3, w))
    for i in range(full_rows, n):
        for m in range(n_out):
            out[i, m] = _dot(a[rows[i], first_col:stop_col], weight[m, first_col:stop_col])
    for i in range(n):
        for m in range(n_out):
            v = out[i, m] + bias[m] if bias.size else out[i, m]
            out[i, m] = zero if relu and v <= zero else v  # NaN stays NaN, as torch.relu


@njit(cache=True, fastmath=FAST)
def _dot(x, w):
    """sum_k x[k] w[k], summed in the dtype of x."""
    total = x.dtype.type(0)
    for k in range(x.size):
        total += x[k] * w[k]
    return total


@njit(cache=True)
def relu_backward(dz, out, n):
    """dz[i, m] = 0 where out[i, m] <= 0 (out = max(z, 0) is positive exactly where z is), i < n."""
    zero = dz.dtype.type(0)
    for i in range(n):
        for m in range(dz.shape[1]):
            if not out[i, m] > zero:
                dz[i, m] = zero


@njit(cache=True, fastmath=FAST)
def add_weight_grad(dz, a, rows, grad_weight, first_col, stop_col):
    """grad_weight[m, k] += sum_i dz[i, m] a[rows[i], k] over the n = rows.size rows, for the
    columns first_col <= k < stop_col.

    In the forward pass this was `out[i, m] += a[rows[i], k] * weight[m, k]`, so each row adds
    dz[i, m] * a[rows[i], :] to weight row m. Tiles of 4 rows x 2 weight rows: each pass over a
    pair of gradient rows adds 4 rows of a (6 loads and 2 stores per 8 multiply-adds).
    """
    n = rows.size
    n_out, width = grad_weight.shape[0], stop_col - first_col
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % 2
    for i in range(0, full_rows, ROW_TILE):
        x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
        x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
        for m in range(0, full_outs, 2):
            d0, d1, d2, d3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
            e0, e1, e2, e3 = dz[i, m + 1], dz[i + 1, m + 1], dz[i + 2, m + 1], dz[i + 3, m + 1]
            g, h = grad_weight[m, first_col:stop_col], grad_weight[m + 1, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
                h[k] += e0 * x0[k] + e1 * x1[k] + e2 * x2[k] + e3 * x3[k]
        for m in range(full_outs, n_out):
            d0, d1, d2, d3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
            g = grad_weight[m, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
    for i in range(full_rows, n):
        x0 = a[rows[i], first_col:stop_col]
        for m in range(n_out):
            d0 = dz[i, m]
            g = grad_weight[m, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k]


@njit(cache=True, fastmath=FAST)
def input_grad(dz, weight, n, dx):
    """dx[i, k] = sum_m dz[i, m] weight[m, k] for i < n (overwritten): dL/da = dz W."""
    n_out, n_in = weight.shape
    for i in range(n):
        d = dz[i]
        row = dx[i]
        row[...] = 0
        for m in range(n_out):
            w = weight[m]
            for k in range(n_in):
                row[k] += d[m] * w[k]
