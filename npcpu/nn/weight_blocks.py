"""A linear layer's GEMMs a block of weight rows at a time: for 16-bit weights, and for updates inside backward.

Legend as in npcpu.nn.linear: x (N, K), W (M, K), dz = dL/d(x W^T + b) (N, M); r is a block of R
consecutive rows of W, R * K <= BLOCK_ELEMENTS and R a multiple of 4 (so that every block starts
at an element index that is a multiple of 4, as Optimizer.begin_update asks).

BLAS multiplies float32 matrices, so a bfloat16 or float16 W must be widened before each GEMM.
Widening all of W at once takes a float32 buffer as large as W in float32 (64 MB at 4096 x 4096):
the memory that 16-bit storage is there to save. Here W is widened one block of rows at a time
into one small buffer shared by every layer, and each GEMM runs block by block:

    forward    y[:, r] = x W[r]^T
    backward   dx     += dz[:, r] W[r]       (the first block overwrites: beta = 0)
               dW[r]   = dz[:, r]^T x        into the same buffer once dx has used W[r], handed at
                                             once to the parameter's optimizer when it updates
                                             inside backward (Optimizer.fuse_into_backward)

Each block is updated after the dx GEMM that reads it, so dx sees the weights from before the step,
as in the usual order (backward, then step). Without an optimizer inside backward, dL/dW is one
GEMM into W.grad as for float32 weights (it does not read W). A float32 W updated inside backward
takes the same loop without the widening: no gradient the size of W is ever allocated.

Block size: at 4096 x 4096 and batch 128 a block is a 128 x 1024 x 4096 GEMM, near BLAS's speed on
the whole matrix. Measured on the project's 2-core machine, mlp52m in bf16 with Adam inside
backward, 3 alternating runs: blocks of 2^22 elements (16 MB) 521-559 ms a step, of 2^20 (4 MB)
568-657 ms (smaller GEMMs, and four times the kernel launches for the updates). The buffer is
what the blocks cost in memory: 16 MB, against 64 MB for one widened 4096 x 4096 weight.
"""

from __future__ import annotations

import numpy as np

from npcpu import blas
from npcpu.kernels import convert
from npcpu.nn.parameter import Parameter
from npcpu.precision import HALF_DTYPES, bfloat16

BLOCK_ELEMENTS = 1 << 22
"""Elements of W per block: 16 MB of float32, the size of the shared buffer."""

_buffer = np.empty(0, dtype=np.uint8)  # the shared buffer, as bytes (float32, or float64 for fp64)


def block_rows(out_features: int, in_features: int) -> int:
    """R, the rows per block: a multiple of 4 with R * in_features <= BLOCK_ELEMENTS (at least 4),
    or all rows when they fit in one block."""
    return min(out_features, max(4, BLOCK_ELEMENTS // in_features // 4 * 4))


def _scratch(rows: int, columns: int, dtype: np.dtype) -> np.ndarray:
    """A (rows, columns) view of the shared buffer, grown when too small. Valid until the next call."""
    global _buffer
    size = rows * columns * dtype.itemsize
    if _buffer.size < size:
        _buffer = np.empty(size, dtype=np.uint8)
    return _buffer[:size].view(dtype).reshape(rows, columns)


def _rows(weight: Parameter, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
    """W[start:stop] in the compute dtype: widened into `scratch` for 16-bit storage, else a view."""
    rows = weight.data[start:stop]
    if rows.dtype == bfloat16:
        return convert.bf16_to_f32(rows, out=scratch)
    if rows.dtype in HALF_DTYPES:
        return convert.f16_to_f32(rows, out=scratch)
    return rows


def _blocks(weight: Parameter):
    """(start, stop, scratch) over the blocks of W's rows, scratch an (stop - start, K) view of the
    shared buffer in W's compute dtype."""
    out_features, in_features = weight.shape
    rows = block_rows(out_features, in_features)
    scratch = _scratch(rows, in_features, weight.compute_dtype)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        yield start, stop, scratch[:stop - start]


def forward(x: np.ndarray, weight: Parameter) -> np.ndarray:
    """y = x W^T, (N, K) -> (N, M): one GEMM for a float weight, one per block for a 16-bit one."""
    if weight.data.dtype not in HALF_DTYPES:
        return blas.matmul_weight_transposed(x, weight.data)
    y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    for start, stop, scratch in _blocks(weight):
        y[:, start:stop] = blas.matmul_weight_transposed(x, _rows(weight, start, stop, scratch))
    return y


def backward(dz: np.ndarray, x: np.ndarray, weight: Parameter, need_dx: bool) -> np.ndarray | None:
    """dL/dW for an unfrozen W, and dx = dz W (N, K) when `need_dx` (else None is returned).

    dL/dW is added into W.grad (one GEMM, beta 0 after zero_grad), or, when W has an updater
    (Optimizer.fuse_into_backward) and this is its last use in the backward pass (a tied W has
    two, see Parameter.complete_use), computed a block of rows at a time, added to what the
    earlier uses accumulated, and handed to it: W is then updated when this returns, and W.grad
    is None.
    """
    in_backward = weight.updater is not None and not weight.frozen and weight.complete_use()
    if not weight.frozen and not in_backward:
        grad, beta = weight.grad_for_gemm()  # beta 0 right after zero_grad()
        blas.accumulate_weight_grad(grad, dz, x, beta)
    if not in_backward and weight.data.dtype not in HALF_DTYPES:
        return blas.matmul_weight(dz, weight.data) if need_dx else None
    dx = np.empty((dz.shape[0], weight.shape[1]), dtype=dz.dtype) if need_dx else None
    update = weight.updater.begin_update(weight) if in_backward else None
    earlier = weight.grad if in_backward else None  # the other uses' gradient (a tied W)
    for start, stop, scratch in _blocks(weight):
        dz_rows = np.ascontiguousarray(dz[:, start:stop])
        if need_dx:
            blas.matmul_weight(dz_rows, _rows(weight, start, stop, scratch), out=dx,
                               beta=0.0 if start == 0 else 1.0)
        if update is not None:
            blas.accumulate_weight_grad(scratch, dz_rows, x, 0.0)  # dW[r], over W[r] widened
            if earlier is not None:
                scratch += earlier[start:stop]
            update(scratch.reshape(-1), start * weight.shape[1])
    if in_backward:
        weight.grad = None
    return dx
