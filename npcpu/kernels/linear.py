"""Kernels between the GEMMs of Linear and FusedLinearReLU: bias (+ ReLU) forward, bias gradient backward.

Legend: N rows (the batch, leading dimensions flattened), M = out_features.
    y     (N, M)            the GEMM output x W^T, turned in place into the layer output
    bias  (M,)
    mask  (N, ceil(M/8))    uint8, bit k of mask[i, b] is (y[i, 8b + k] > 0): packed per row, so a
                            thread owns whole rows in forward and whole bytes in backward
    dy    (N, M)            dL/dy from above
    db    (M,)              the bias gradient accumulator (+=), compute dtype

The backward reductions split the columns into blocks of `COLUMN_BLOCK`; each column is summed over
the rows in order 0..N-1 by one thread, so db is bit-identical for any thread count, and to the
serial `add_row_sums` over all columns at once, which a small layer takes (npcpu.kernels.launch).
"""

import numpy as np
from numba import njit, prange

COLUMN_BLOCK = 512  # a multiple of 8: a block owns whole mask bytes


def mask_shape(rows: int, columns: int) -> tuple[int, int]:
    """The shape of the bit-packed ReLU mask of a (rows, columns) output."""
    return rows, (columns + 7) // 8


@njit(cache=True, inline="always")
def _add_bias_row(y, bias, i):
    """y[i, j] += bias[j] for every j (a loop: a serial `y[i, :] += bias` would allocate).
    Inlined into its callers: a call per row costs more than a short row's additions."""
    for j in range(y.shape[1]):
        y[i, j] += bias[j]


@njit(parallel=True, cache=True)
def add_bias(y, bias):
    """y[i, j] += bias[j], in place."""
    for i in prange(y.shape[0]):
        _add_bias_row(y, bias, i)


@njit(cache=True)
def add_bias_serial(y, bias):
    """add_bias on the calling thread, for a small y (npcpu.kernels.launch)."""
    for i in range(y.shape[0]):
        _add_bias_row(y, bias, i)


@njit(parallel=True, cache=True)
def add_bias_relu(y, bias, mask):
    """y[i, j] = max(y[i, j] + bias[j], 0) in place, NaN staying NaN (as torch.relu); mask bit
    (i, j) = (y[i, j] + bias[j] > 0)."""
    n_rows, n_cols = y.shape
    zero = y.dtype.type(0)
    for i in prange(n_rows):
        for byte in range(mask.shape[1]):
            bits = 0
            for k in range(min(8, n_cols - 8 * byte)):
                j = 8 * byte + k
                v = y[i, j] + bias[j]
                if v > zero:
                    bits |= 1 << k
                elif v <= zero:  # NaN fails both tests and stays
                    v = zero
                y[i, j] = v
            mask[i, byte] = bits


@njit(cache=True)
def add_row_sums(dy, db):
    """db[j] += sum_i dy[i, j]: the rows summed in order 0..N-1 apart, then added to db once.
    The bias gradient of a Linear layer, here by column blocks and in the compiled training step
    (npcpu.kernels.compiled_step) for a row group."""
    total = np.zeros(db.size, db.dtype)
    for i in range(dy.shape[0]):
        total += dy[i]
    db += total


@njit(parallel=True, cache=True)
def bias_grad(dy, db):
    """db[j] += sum_i dy[i, j] (each column summed in row order by one thread)."""
    n_rows, n_cols = dy.shape
    n_blocks = (n_cols + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    for block in prange(n_blocks):
        j0 = block * COLUMN_BLOCK
        j1 = min(n_cols, j0 + COLUMN_BLOCK)
        add_row_sums(dy[:, j0:j1], db[j0:j1])


@njit(parallel=True, cache=True)
def relu_mask_grad_and_bias_grad(dy, mask, dy_masked, db):
    """dy_masked = dy where the mask bit is set, else 0; db[j] += sum_i dy_masked[i, j].

    In the forward pass this was `y = max(x W^T + b, 0)`, so dL/d(x W^T + b) is dy where the
    pre-activation was positive and 0 elsewhere (a select, not a product: NaN or Inf in dy at a
    masked position gives 0, as in torch).
    """
    n_rows, n_cols = dy.shape
    zero = dy.dtype.type(0)
    n_blocks = (n_cols + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    for block in prange(n_blocks):
        j0 = block * COLUMN_BLOCK
        j1 = min(n_cols, j0 + COLUMN_BLOCK)
        width = j1 - j0
        total = np.zeros(width, db.dtype)
        keep = np.empty(width, np.bool_)
        for i in range(n_rows):
            row_mask = mask[i, j0 >> 3:]
            for j in range(width):
                keep[j] = (row_mask[j >> 3] >> (j & 7)) & 1
            row_dy = dy[i, j0:j1]
            row_out = dy_masked[i, j0:j1]
            for j in range(width):
                g = row_dy[j] if keep[j] else zero
                row_out[j] = g
                total[j] += g
        db[j0:j1] += total
