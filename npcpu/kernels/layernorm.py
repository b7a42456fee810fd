"""LayerNorm forward and backward over the rows of a 2-D array.

Dimension legend: R rows (every leading dimension flattened: batch * time), C the normalized size.
Arrays are float32 or float64 (Numba specializes per dtype); the layer widens 16-bit storage first.

forward, for each row r (llm.c's `layernorm_forward`, with xhat kept instead of the input):

    mean[r] = sum_c x[r, c] / C
    var[r]  = sum_c (x[r, c] - mean[r])^2 / C          (biased, as torch)
    rstd[r] = 1 / sqrt(var[r] + eps)
    xhat[r, c] = (x[r, c] - mean[r]) * rstd[r]
    out[r, c]  = xhat[r, c] * weight[c] + bias[c]

The variance is two-pass (mean first, then squared deviations) with float64 accumulators, so a row
of mean 1e4 and standard deviation 1e-1 loses nothing to cancellation.
"""

import numpy as np
from numba import njit, prange

# Rows per block of the parameter-gradient reduction. Fixed (not one block per thread) so that
# dweight and dbias are the same bits whatever the thread count.
ROWS_PER_BLOCK = 32

_SAFE_MATH = {"contract", "reassoc", "arcp"}


@njit(parallel=True, cache=True, fastmath=_SAFE_MATH)
def layernorm_forward(out, xhat, rstd, inp, weight, bias, eps, save_xhat, addend, total):
    """Normalize each row of `inp` (R, C) and apply weight (C,) and bias (C,).

    Writes out (R, C) and rstd (R,); writes xhat (R, C) only when `save_xhat` (else pass any
    array, e.g. shape (0, 0): it is not touched). With a non-empty `addend` (R, C), the rows
    normalized are those of total = inp + addend, written into `total` (R, C) in the same pass: a
    residual connection's sum and the LayerNorm after it (pass empty (0, 0) arrays otherwise).
    """
    rows, size = inp.shape
    adding = addend.size > 0
    for r in prange(rows):
        if adding:
            for c in range(size):
                total[r, c] = inp[r, c] + addend[r, c]
        x = total[r] if adding else inp[r]
        row_total = 0.0  # float64 accumulators, whatever the input dtype
        for c in range(size):
            row_total += x[c]
        mean = row_total / size
        squares = 0.0
        for c in range(size):
            deviation = x[c] - mean
            squares += deviation * deviation
        row_rstd = 1.0 / np.sqrt(squares / size + eps)
        rstd[r] = row_rstd
        for c in range(size):
            normalized = (x[c] - mean) * row_rstd
            if save_xhat:
                xhat[r, c] = normalized
            out[r, c] = normalized * weight[c] + bias[c]


@njit(parallel=True, cache=True, fastmath=_SAFE_MATH)
def layernorm_backward(dinp, dweight, dbias, dout, xhat, rstd, weight, need_dinp, need_dparams,
                       residual):
    """Gradients of `layernorm_forward` from dout (R, C), xhat (R, C), rstd (R,), weight (C,).

    Writes dinp (R, C) when `need_dinp`; ADDS into dweight (C,) and dbias (C,) when `need_dparams`.
    With a non-empty `residual` (R, C), dinp is the formula below plus residual, in the same pass:
    the gradient of a residual stream that feeds both this LayerNorm and the identity path
    (pass an empty (0, 0) array otherwise).

    In the forward pass `out = xhat * weight + bias` and `xhat = (x - mean) * rstd`, so

        dbias[c]   += sum_r dout[r, c]
        dweight[c] += sum_r dout[r, c] * xhat[r, c]
        dxhat[r, c] = dout[r, c] * weight[c]
        dinp[r, c]  = rstd[r] * (dxhat[r, c] - mean_c(dxhat[r]) - xhat[r, c] * mean_c(dxhat[r] * xhat[r]))

    (the two means are the gradient flowing through `mean` and through `rstd`). The sums over rows
    go into per-block partial sums (blocks of ROWS_PER_BLOCK rows, run in parallel), then the blocks
    are added in order: no two threads write the same element.
    """
    rows, size = dout.shape
    blocks = (rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    partial_dweight = np.zeros((blocks, size), dtype=dweight.dtype)
    partial_dbias = np.zeros((blocks, size), dtype=dbias.dtype)
    for b in prange(blocks):
        for r in range(b * ROWS_PER_BLOCK, min(rows, (b + 1) * ROWS_PER_BLOCK)):
            dy, xh = dout[r], xhat[r]
            if need_dparams:
                for c in range(size):
                    partial_dbias[b, c] += dy[c]
                    partial_dweight[b, c] += dy[c] * xh[c]
            if need_dinp:
                # the two row means of the dx formula, in float64
                dxhat_mean = 0.0
                dxhat_xhat_mean = 0.0
                for c in range(size):
                    dxhat = dy[c] * weight[c]
                    dxhat_mean += dxhat
                    dxhat_xhat_mean += dxhat * xh[c]
                dxhat_mean /= size
                dxhat_xhat_mean /= size
                for c in range(size):
                    dxhat = dy[c] * weight[c]
                    dinp[r, c] = rstd[r] * (dxhat - dxhat_mean - xh[c] * dxhat_xhat_mean)
                if residual.size > 0:
                    for c in range(size):
                        dinp[r, c] += residual[r, c]
    if need_dparams:
        for b in range(blocks):
            for c in range(size):
                dweight[c] += partial_dweight[b, c]
                dbias[c] += partial_dbias[b, c]
