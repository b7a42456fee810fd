"""A linear layer's GEMMs a block of weight rows at a time: for 16-bit weights, and for updates inside backward.

Legend as in npcpu.nn.linear: x (N, K), W (M, K), dz = dL/d(x W^T + b) (N, M); r is a block of R
consecutive rows of W, R * K <= BLOCK_ELEMENTS (unless R is the smallest aligned count).

BLAS multiplies float32 matrices, so a bfloat16 or float16 W must be widened before each GEMM.
Widening all of W at once takes a float32 buffer as large as W in float32 (64 MB at 4096 x 4096):
the memory that 16-bit storage is there to save. Here W is widened one block of rows at a time
into one small buffer per thread, and each GEMM runs block by block:

    forward    y[:, r] = x W[r]^T
    backward   dx     += dz[:, r] W[r]       (the first block overwrites: beta = 0)
               dW[r]   = dz[:, r]^T x        into the same buffer once dx has used W[r], handed at
                                             once to the parameter's updater when it updates
                                             inside backward (npcpu.nn.parameter.InBackwardUpdater)

Each block is updated after the dx GEMM that reads it, so dx sees the weights from before the step,
as in the usual order (backward, then step). Without an updater, dL/dW is one GEMM into W.grad as
for float32 weights (it does not read W). A float32 W updated inside backward takes the same loop
without the widening: no gradient the size of W is ever allocated. Blocks handed to an updater
start at a multiple of its `element_alignment` elements: R is a multiple of it.

Block size: large enough that each block's GEMM runs near BLAS's speed on the whole matrix, and
that the updater is called few times per weight (smaller blocks measured slower, for both
reasons); small against one widened large weight, which is the memory the blocks exist to save.

Under bf16 precision on a CPU with AVX512_BF16 (npcpu.backend.use_native_bf16_gemm), the GEMMs
run on bfloat16 operands instead (npcpu.blas_native.bf16): W is never widened, forward is one GEMM over
all of W, x is the bfloat16 copy the layer keeps for backward, and dz is rounded to bfloat16 once
for both backward GEMMs (the instruction multiplies bfloat16 only). The block loop is the same, on
W's rows in place, when the updates run inside backward.

The buffer is per thread (threading.local): a layer's GEMMs never overlap another layer's in one
thread, and models trained in two threads at once each widen into their own.
"""

from __future__ import annotations

import threading

import numpy as np

from npcpu import backend, blas, blas_native
from npcpu.dtypes import HALF_DTYPES, bfloat16
from npcpu.kernels import convert
from npcpu.nn.parameter import Parameter
from npcpu.precision import to_compute, to_storage

BLOCK_ELEMENTS = 1 << 22
"""Elements of W per block: 16 MB of float32, the size of each thread's buffer."""

_local = threading.local()  # .buffer: this thread's scratch, as bytes (float32, or float64 for fp64)


def block_rows(out_features: int, in_features: int, alignment: int = 1) -> int:
    """R, the rows per block: a multiple of `alignment` with R * in_features <= BLOCK_ELEMENTS
    (at least `alignment`), or all rows when they fit in one block."""
    return min(out_features, max(alignment, BLOCK_ELEMENTS // in_features // alignment * alignment))


def _scratch(rows: int, columns: int, dtype: np.dtype) -> np.ndarray:
    """A (rows, columns) view of this thread's buffer, grown when too small. Valid until the
    thread's next call."""
    size = rows * columns * dtype.itemsize
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _local.buffer = np.empty(size, dtype=np.uint8)
    return buffer[:size].view(dtype).reshape(rows, columns)


def native(weight: Parameter) -> bool:
    """Whether W's GEMMs run on the native bfloat16 kernels: a bfloat16 W where they can run."""
    return weight.data.dtype == bfloat16 and backend.use_native_bf16_gemm()


def _rows(weight: Parameter, start: int, stop: int, scratch: np.ndarray, native: bool) -> np.ndarray:
    """W[start:stop] as its GEMMs take it: a view for the native bf16 GEMMs and for float32/float64,
    else widened into `scratch`."""
    rows = weight.data[start:stop]
    if native:
        return rows
    if rows.dtype == bfloat16:
        return convert.bf16_to_f32(rows, out=scratch)
    if rows.dtype in HALF_DTYPES:
        return convert.f16_to_f32(rows, out=scratch)
    return rows


def _blocks(weight: Parameter, alignment: int = 1):
    """(start, stop, scratch) over the blocks of W's rows (R a multiple of `alignment`), scratch an
    (stop - start, K) view of this thread's buffer in W's compute dtype."""
    out_features, in_features = weight.shape
    rows = block_rows(out_features, in_features, alignment)
    scratch = _scratch(rows, in_features, weight.compute_dtype)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        yield start, stop, scratch[:stop - start]


def forward(x: np.ndarray, weight: Parameter, x_stored: np.ndarray | None = None,
            bias: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T (+ b when `bias` is given, in x's dtype), (N, K) -> (N, M): one GEMM for a float
    weight or the native bf16 path (on `x_stored`, x in W's storage dtype, when the caller has
    it), one per block for a widened one."""
    use_native = native(weight)
    if not use_native and weight.data.dtype not in HALF_DTYPES:
        return blas.matmul_weight_transposed(x, weight.data, bias)  # b added as y is written
    if use_native:
        y = blas_native.bf16.matmul_weight_transposed(x if x_stored is None else x_stored, weight.data)
    else:
        y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
        for start, stop, scratch in _blocks(weight):
            y[:, start:stop] = blas.matmul_weight_transposed(
                x, _rows(weight, start, stop, scratch, False))
    if bias is not None:
        blas.add_bias(y, bias)
    return y


def backward(dz: np.ndarray, x: np.ndarray, weight: Parameter, need_dx: bool) -> np.ndarray | None:
    """dL/dW for an unfrozen W, and dx = dz W (N, K) when `need_dx` (else None is returned).

    x is the layer's input as kept for backward (W's storage dtype), dz in the compute dtype.
    dL/dW is added into W.grad (one GEMM, beta 0 after zero_grad); or, when this is the use of W
    that takes its update (`Parameter.takes_update`: W has an updater and this is its last use in
    the backward pass), computed a block of rows at a time, added to what earlier uses accumulated,
    and handed to the updater: W is then updated when this returns, and W.grad is None.
    """
    in_backward = weight.takes_update()
    use_native = native(weight)
    gemms = blas_native.bf16 if use_native else blas
    dz_output = dz
    if use_native:
        dz = to_storage(dz, bfloat16)
    elif not weight.frozen:
        x = to_compute(x, weight.compute_dtype)
    if not weight.frozen and not in_backward:
        grad, beta = weight.grad_for_gemm()  # beta 0 right after zero_grad()
        gemms.accumulate_weight_grad(grad, dz, x, beta)
    if not in_backward and (use_native or weight.data.dtype not in HALF_DTYPES):
        return gemms.matmul_weight(dz, weight.data) if need_dx else None
    dx = np.empty((dz.shape[0], weight.shape[1]), dtype=dz_output.dtype) if need_dx else None
    update = weight.updater.begin_update(weight) if in_backward else None
    earlier = weight.grad if in_backward else None  # the sum of W's earlier uses (a tied weight)
    alignment = weight.updater.element_alignment if in_backward else 1
    for start, stop, scratch in _blocks(weight, alignment):
        dz_rows = np.ascontiguousarray(dz[:, start:stop])
        if need_dx:
            gemms.matmul_weight(dz_rows, _rows(weight, start, stop, scratch, use_native), out=dx,
                                beta=0.0 if start == 0 else 1.0)
        if update is not None:
            if earlier is not None:
                scratch[...] = earlier[start:stop]
            gemms.accumulate_weight_grad(scratch, dz_rows, x, 0.0 if earlier is None else 1.0)
            update(scratch.reshape(-1), start * weight.shape[1])  # dW[r] (over W[r] widened)
    if in_backward:
        weight.grad = None
    return dx
