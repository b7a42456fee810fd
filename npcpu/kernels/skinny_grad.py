"""dL/dW of a skinny linear layer (few outputs, a classifier head): grad += dz^T x, one thread.

Legend: x (N, K) the layer's input, dz (N, M) dL/d(x W^T + b), grad (M, K); M small (npcpu.blas
sends M <= SKINNY_OUTPUTS here when the product is small).

In the forward pass this was `y[n, m] = sum_k x[n, k] W[m, k]`, so row m of dL/dW collects
dz[n, m] * x[n, :] over the rows n. The loop takes 8 rows of x at a time and 2 gradient rows:
the innermost loop runs over the contiguous K dimension (LLVM vectorizes it), and each pass over a
pair of gradient rows loads and stores them once for 8 rows of x (10 loads and 2 stores per 16
multiply-adds; the 4-row tiles of npcpu.kernels.compiled_gemm.add_weight_grad, made for a
gathered subset of rows, load and store the gradient twice as often). `reassoc` lets LLVM keep
partial sums in any order and `contract` fuses multiply-adds: the sum over n is a float32 sum in
an order of LLVM's choosing, as a BLAS GEMM's is. Neither removes NaN or Inf.
"""

from numba import njit

ROW_TILE = 8


@njit(cache=True, fastmath={"contract", "reassoc"})
def add_weight_grad(dz, x, grad):
    """grad[m, k] += sum_n dz[n, m] x[n, k]; dz (N, M), x (N, K), grad (M, K), all C-contiguous."""
    n_rows = x.shape[0]
    n_out = grad.shape[0]
    full_rows, full_outs = n_rows - n_rows % ROW_TILE, n_out - n_out % 2
    for n in range(0, full_rows, ROW_TILE):
        x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
        x4, x5, x6, x7 = x[n + 4], x[n + 5], x[n + 6], x[n + 7]
        for m in range(0, full_outs, 2):
            d = dz[n:n + ROW_TILE, m]
            e = dz[n:n + ROW_TILE, m + 1]
            d0, d1, d2, d3, d4, d5, d6, d7 = d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
            e0, e1, e2, e3, e4, e5, e6, e7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
            g, h = grad[m], grad[m + 1]
            for k in range(g.size):
                g[k] += (d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
                         + d4 * x4[k] + d5 * x5[k] + d6 * x6[k] + d7 * x7[k])
                h[k] += (e0 * x0[k] + e1 * x1[k] + e2 * x2[k] + e3 * x3[k]
                         + e4 * x4[k] + e5 * x5[k] + e6 * x6[k] + e7 * x7[k])
        if full_outs < n_out:  # an odd M: the last gradient row alone
            d = dz[n:n + ROW_TILE, full_outs]
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
