"""The two GEMMs of a skinny linear layer (few outputs: a classifier head) on one thread.

    y      = x W^T     forward(x, weight, out)           (N, K) @ (M, K)^T -> (N, M)
    grad  += dz^T x    add_weight_grad(dz, x, grad)       (N, M)^T @ (N, K) -> (M, K)

Legend: x (N, K) the layer's input, W (M, K) torch layout, dz (N, M) dL/d(x W^T + b); M small
(npcpu.blas sends M <= SKINNY_OUTPUTS here when the product is small). Every array C-contiguous.

Both loops run innermost over the contiguous K dimension, so LLVM vectorizes them, and both hold a
register tile that reuses each load several times (the loops of npcpu.kernels.compiled_gemm,
made for a gathered subset of rows, use 4 x 2 tiles for both):
- forward: 4 rows of x x 5 weight rows, 20 running sums (vectors) for 9 loads a step of k;
- dL/dW: in the forward pass this was `y[n, m] = sum_k x[n, k] W[m, k]`, so row m of dL/dW
  collects dz[n, m] * x[n, :] over the rows n: 8 rows of x at a time into 2 gradient rows, so each
  pass loads and stores a gradient row once for 8 rows (10 loads and 2 stores per 16 multiply-adds).
`reassoc` lets LLVM keep partial sums in any order and `contract` fuses multiply-adds: each sum is
a float32 sum in an order of LLVM's choosing, as a BLAS GEMM's is. Neither removes NaN or Inf.
"""

from numba import njit

FAST = {"contract", "reassoc"}
GRAD_ROWS = 8  # rows of x per pass of add_weight_grad over a pair of gradient rows
FORWARD_ROWS, FORWARD_OUTPUTS = 4, 5  # the forward's register tile


@njit(cache=True, fastmath=FAST)
def forward(x, weight, out):
    """out[n, m] = sum_k x[n, k] weight[m, k]; x (N, K), weight (M, K), out (N, M) written."""
    n_rows, n_out = x.shape[0], weight.shape[0]
    full_rows = n_rows - n_rows % FORWARD_ROWS
    full_outs = n_out - n_out % FORWARD_OUTPUTS
    zero = out.dtype.type(0)
    for n in range(0, full_rows, FORWARD_ROWS):
        x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
        for m in range(0, full_outs, FORWARD_OUTPUTS):
            w0, w1, w2 = weight[m], weight[m + 1], weight[m + 2]
            w3, w4 = weight[m + 3], weight[m + 4]
            a0 = a1 = a2 = a3 = a4 = b0 = b1 = b2 = b3 = b4 = zero
            c0 = c1 = c2 = c3 = c4 = d0 = d1 = d2 = d3 = d4 = zero
            for k in range(x0.size):
                u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
                v0, v1, v2, v3, v4 = w0[k], w1[k], w2[k], w3[k], w4[k]
                a0, a1, a2 = a0 + u0 * v0, a1 + u0 * v1, a2 + u0 * v2
                a3, a4 = a3 + u0 * v3, a4 + u0 * v4
                b0, b1, b2 = b0 + u1 * v0, b1 + u1 * v1, b2 + u1 * v2
                b3, b4 = b3 + u1 * v3, b4 + u1 * v4
                c0, c1, c2 = c0 + u2 * v0, c1 + u2 * v1, c2 + u2 * v2
                c3, c4 = c3 + u2 * v3, c4 + u2 * v4
                d0, d1, d2 = d0 + u3 * v0, d1 + u3 * v1, d2 + u3 * v2
                d3, d4 = d3 + u3 * v3, d4 + u3 * v4
            for j, (a, b, c, d) in enumerate(((a0, b0, c0, d0), (a1, b1, c1, d1), (a2, b2, c2, d2),
                                              (a3, b3, c3, d3), (a4, b4, c4, d4))):
                out[n, m + j], out[n + 1, m + j], out[n + 2, m + j], out[n + 3, m + j] = a, b, c, d
        for m in range(full_outs, n_out):  # the last M mod 5 outputs, one weight row at a time
            w0 = weight[m]
            a0 = b0 = c0 = d0 = zero
            for k in range(x0.size):
                a0 += x0[k] * w0[k]
                b0 += x1[k] * w0[k]
                c0 += x2[k] * w0[k]
                d0 += x3[k] * w0[k]
            out[n, m], out[n + 1, m], out[n + 2, m], out[n + 3, m] = a0, b0, c0, d0
    for n in range(full_rows, n_rows):  # the last N mod 4 rows, one at a time
        row = x[n]
        for m in range(n_out):
            w0 = weight[m]
            total = zero
            for k in range(row.size):
                total += row[k] * w0[k]
            out[n, m] = total


@njit(cache=True, fastmath=FAST)
def add_weight_grad(dz, x, grad):
    """grad[m, k] += sum_n dz[n, m] x[n, k]; dz (N, M), x (N, K), grad (M, K), all C-contiguous."""
    n_rows = x.shape[0]
    n_out = grad.shape[0]
    full_rows, full_outs = n_rows - n_rows % GRAD_ROWS, n_out - n_out % 2
    for n in range(0, full_rows, GRAD_ROWS):
        x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
        x4, x5, x6, x7 = x[n + 4], x[n + 5], x[n + 6], x[n + 7]
        for m in range(0, full_outs, 2):
            d = dz[n:n + GRAD_ROWS, m]
            e = dz[n:n + GRAD_ROWS, m + 1]
            d0, d1, d2, d3, d4, d5, d6, d7 = d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
            e0, e1, e2, e3, e4, e5, e6, e7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
            g, h = grad[m], grad[m + 1]
            for k in range(g.size):
                g[k] += (d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
                         + d4 * x4[k] + d5 * x5[k] + d6 * x6[k] + d7 * x7[k])
                h[k] += (e0 * x0[k] + e1 * x1[k] + e2 * x2[k] + e3 * x3[k]
                         + e4 * x4[k] + e5 * x5[k] + e6 * x6[k] + e7 * x7[k])
        if full_outs < n_out:  # an odd M: the last gradient row alone
            d = dz[n:n + GRAD_ROWS, full_outs]
            d0, d1, d2, d3, d4, d5, d6, d7 = d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
            g = grad[full_outs]
            for k in range(g.size):
                g[k] += (d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
                         + d4 * x4[k] + d5 * x5[k] + d6 * x6[k] + d7 * x7[k])
    for n in range(full_rows, n_rows):  # the last N mod 8 rows, one at a time
        row = x[n]
        for m in range(n_out):
            d0 = dz[n, m]
            g = grad[m]
            for k in range(g.size):
                g[k] += d0 * row[k]
