"""The loops of the compiled training step (npcpu.kernels.compiled_step) for one layer: forward
out = f(a[rows] W^T + b), dL/dW, dL/dx and the activation f's backward, over a gathered set of rows.

Legend: a (R, K) a layer's input with rows (n,) indices into it, W (M, K) torch layout, b (M,),
dz (>= n, M) dL/d(pre-activation), dx (>= n, K).

The GEMMs are register-tiled loops over 4 rows x 5 outputs at a time whose innermost loop runs over
the contiguous K dimension, so LLVM vectorizes it: for the layers the compiled path is for (784 ->
10 at batch 128 is 1M multiply-adds) they are faster than BLAS calls, which pay dispatch and packing
for each of the 3 GEMMs of a layer and step. `reassoc` lets LLVM keep several partial sums in a dot
product (the order of a float32 sum then differs from BLAS's, within float32 rounding); `contract`
fuses multiply-adds. Neither removes NaN or Inf: a diverged loss stays NaN. The bias gradient is
npcpu.kernels.linear.add_row_sums, the reference Linear's own reduction.
"""

import math

from numba import njit

from npcpu.kernels.activations import (gelu32, gelu64, gelu_slope32, gelu_slope64, gelu_tanh,
                                       gelu_tanh_slope, tanh_slope)
from npcpu.kernels.intrinsics import prefetch

FAST = {"contract", "reassoc"}
ROW_TILE = 4  # rows that share each load of a weight row in the GEMMs below
OUT_TILE = 5  # weight rows that share each load of an input row (10 classes: two tiles)
CACHE_LINE = 64  # bytes
IDENTITY, RELU, GELU, GELU_TANH, TANH = range(5)
"""A layer's activation: the codes of npcpu.train.compiled's layer list (ReLU is also
linear_forward's `relu` flag, applied as the sums are written)."""


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
    out (>= n, M), rows 0..n-1 written (out[i] is the output of row rows[i]). Tiles of 4 rows x 5
    weight rows (`_forward_tile`): 9 loads per 20 multiply-adds, and a uint8 row converted once
    for 5 outputs; the weight rows left over (M mod 5) go one at a time, the rows left over
    (n mod 4) one dot product at a time.
    """
    n = rows.size
    n_out = weight.shape[0]
    zero = out.dtype.type(0)
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % OUT_TILE
    for i in range(0, full_rows, ROW_TILE):
        for m in range(0, full_outs, OUT_TILE):
            _forward_tile(a, rows, weight, out, i, m, first_col, stop_col)
        for m in range(full_outs, n_out):
            _forward_column(a, rows, weight, out, i, m, first_col, stop_col)
    for i in range(full_rows, n):
        for m in range(n_out):
            out[i, m] = _dot(a[rows[i], first_col:stop_col], weight[m, first_col:stop_col])
    for i in range(n):
        for m in range(n_out):
            v = out[i, m] + bias[m] if bias.size else out[i, m]
            out[i, m] = zero if relu and v <= zero else v  # NaN stays NaN, as torch.relu


@njit(cache=True, fastmath=FAST, inline="always")
def _forward_tile(a, rows, weight, out, i, m, first_col, stop_col):
    """out[i + r, m + j] = sum_k a[rows[i + r], k] weight[m + j, k] for r < 4, j < 5: 20 running
    sums (vectors over k, after LLVM vectorizes), each row of a and of weight loaded once per k.
    The loops index slices from 0: a loop index that might be negative would make Numba check
    every index for wraparound, and LLVM would not vectorize."""
    x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
    x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
    w0, w1 = weight[m, first_col:stop_col], weight[m + 1, first_col:stop_col]
    w2, w3, w4 = (weight[m + 2, first_col:stop_col], weight[m + 3, first_col:stop_col],
                  weight[m + 4, first_col:stop_col])
    s00 = s01 = s02 = s03 = s04 = s10 = s11 = s12 = s13 = s14 = out.dtype.type(0)
    s20 = s21 = s22 = s23 = s24 = s30 = s31 = s32 = s33 = s34 = out.dtype.type(0)
    for k in range(stop_col - first_col):
        v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
        u0, u1, u2, u3, u4 = w0[k], w1[k], w2[k], w3[k], w4[k]
        s00 += v0 * u0; s01 += v0 * u1; s02 += v0 * u2; s03 += v0 * u3; s04 += v0 * u4  # noqa: E702
        s10 += v1 * u0; s11 += v1 * u1; s12 += v1 * u2; s13 += v1 * u3; s14 += v1 * u4  # noqa: E702
        s20 += v2 * u0; s21 += v2 * u1; s22 += v2 * u2; s23 += v2 * u3; s24 += v2 * u4  # noqa: E702
        s30 += v3 * u0; s31 += v3 * u1; s32 += v3 * u2; s33 += v3 * u3; s34 += v3 * u4  # noqa: E702
    out[i, m], out[i, m + 1], out[i, m + 2], out[i, m + 3], out[i, m + 4] = s00, s01, s02, s03, s04
    out[i + 1, m], out[i + 1, m + 1], out[i + 1, m + 2], out[i + 1, m + 3], out[i + 1, m + 4] = (
        s10, s11, s12, s13, s14)
    out[i + 2, m], out[i + 2, m + 1], out[i + 2, m + 2], out[i + 2, m + 3], out[i + 2, m + 4] = (
        s20, s21, s22, s23, s24)
    out[i + 3, m], out[i + 3, m + 1], out[i + 3, m + 2], out[i + 3, m + 3], out[i + 3, m + 4] = (
        s30, s31, s32, s33, s34)


@njit(cache=True, fastmath=FAST, inline="always")
def _forward_column(a, rows, weight, out, i, m, first_col, stop_col):
    """out[i + r, m] = sum_k a[rows[i + r], k] weight[m, k] for r < 4: one weight row, 4 sums."""
    x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
    x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
    w = weight[m, first_col:stop_col]
    s0 = s1 = s2 = s3 = out.dtype.type(0)
    for k in range(stop_col - first_col):
        s0 += x0[k] * w[k]
        s1 += x1[k] * w[k]
        s2 += x2[k] * w[k]
        s3 += x3[k] * w[k]
    out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = s0, s1, s2, s3


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


@njit(cache=True)
def activation_forward(activation, out, pre_activation, n):
    """out[i] = f(out[i]) for i < n (in place), f the GELU (erf or tanh form) or tanh of
    npcpu.kernels.activations; for GELU the input is first kept in pre_activation[i] (its
    backward needs it). IDENTITY and RELU leave out as it is (ReLU is applied by the GEMM)."""
    for i in range(n):
        row, kept = out[i], pre_activation[i]
        for m in range(row.size):
            z = row[m]
            if activation == TANH:
                row[m] = math.tanh(z)
            elif activation == GELU_TANH:
                kept[m] = z
                row[m] = gelu_tanh(z)
            elif activation == GELU:
                kept[m] = z
                row[m] = gelu32(z) if out.itemsize == 4 else gelu64(z)


@njit(cache=True)
def activation_backward(activation, dz, out, pre_activation, n):
    """dz[i] = dL/d(pre-activation) from dz[i] = dL/d(output), i < n, in place: times the
    activation's slope (npcpu.kernels.activations), from the output out for ReLU and tanh, from
    the kept input pre_activation for GELU."""
    if activation == RELU:
        relu_backward(dz, out, n)
        return
    for i in range(n):
        d, y, z = dz[i], out[i], pre_activation[i]
        for m in range(d.size):
            if activation == TANH:
                d[m] = d[m] * tanh_slope(y[m])
            elif activation == GELU_TANH:
                d[m] = d[m] * gelu_tanh_slope(z[m])
            elif activation == GELU:
                d[m] = d[m] * (gelu_slope32(z[m]) if dz.itemsize == 4 else gelu_slope64(z[m]))


@njit(cache=True, fastmath=FAST)
def add_weight_grad(dz, a, rows, grad_weight, first_col, stop_col):
    """grad_weight[m, k] += sum_i dz[i, m] a[rows[i], k] over the n = rows.size rows, for the
    columns first_col <= k < stop_col.

    In the forward pass this was `out[i, m] += a[rows[i], k] * weight[m, k]`, so each row adds
    dz[i, m] * a[rows[i], :] to weight row m. Tiles of 4 rows x 5 gradient rows
    (`_weight_grad_tile`): 9 loads and 5 stores per 20 multiply-adds, a uint8 row converted once
    for 5 gradient rows; the gradient rows left over (M mod 5) go one at a time, the rows left
    over (n mod 4) one at a time.
    """
    n = rows.size
    n_out, width = grad_weight.shape[0], stop_col - first_col
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % OUT_TILE
    for i in range(0, full_rows, ROW_TILE):
        x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
        x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
        for m in range(0, full_outs, OUT_TILE):
            _weight_grad_tile(dz, x0, x1, x2, x3, grad_weight, i, m, first_col, stop_col)
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


@njit(cache=True, fastmath=FAST, inline="always")
def _weight_grad_tile(dz, x0, x1, x2, x3, grad_weight, i, m, first_col, stop_col):
    """grad_weight[m + j, k] += sum_{r < 4} dz[i + r, m + j] x_r[k] for j < 5, over the columns
    first_col <= k < stop_col (x_r = a[rows[i + r], first_col:stop_col]): each x_r[k] loaded once
    for the 5 gradient rows."""
    g0, g1 = grad_weight[m, first_col:stop_col], grad_weight[m + 1, first_col:stop_col]
    g2, g3, g4 = (grad_weight[m + 2, first_col:stop_col], grad_weight[m + 3, first_col:stop_col],
                  grad_weight[m + 4, first_col:stop_col])
    a0, a1, a2, a3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
    b0, b1, b2, b3 = dz[i, m + 1], dz[i + 1, m + 1], dz[i + 2, m + 1], dz[i + 3, m + 1]
    c0, c1, c2, c3 = dz[i, m + 2], dz[i + 1, m + 2], dz[i + 2, m + 2], dz[i + 3, m + 2]
    d0, d1, d2, d3 = dz[i, m + 3], dz[i + 1, m + 3], dz[i + 2, m + 3], dz[i + 3, m + 3]
    e0, e1, e2, e3 = dz[i, m + 4], dz[i + 1, m + 4], dz[i + 2, m + 4], dz[i + 3, m + 4]
    for k in range(stop_col - first_col):
        v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
        g0[k] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
        g1[k] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
        g2[k] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
        g3[k] += d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3
        g4[k] += e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3


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
