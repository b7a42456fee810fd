"""The three GEMMs of a linear layer, through SciPy's BLAS wrappers, without copies.

    y  = x W^T     matmul_weight_transposed(x, W)     (N, K) @ (M, K)^T -> (N, M)
    dx = dz W      matmul_weight(dz, W[, out, beta])  (N, M) @ (M, K)   -> (N, K)
    dW += dz^T x   accumulate_weight_grad(dW, dz, x)  in place, beta = 1 (0 to overwrite dW)

Every operand is passed as a Fortran-order view of a C-order array (A (r, c) C-order is A.T (c, r)
Fortran-order), so BLAS reads and writes NumPy's memory directly. All three go through SciPy's
BLAS: its `?gemm` accumulates into an existing array (beta = 1), and keeping all GEMMs in one BLAS
library keeps one thread pool busy instead of two (NumPy and SciPy each load their own OpenBLAS,
whose idle threads spin for a while after each call and would compete with the other's). The one
exception is attention's many tiny per-head products (`run_independent`): NumPy's batched matmul
loops over them in C, and there every BLAS call is on one thread, so no pool spins.

Small GEMMs run on one BLAS thread: below SMALL_GEMM multiply-adds, the cost of waking and joining
a second thread is larger than the work it takes over, and when the other core is busy the second
thread's share waits for a scheduler time slice (a small GEMM then takes orders of magnitude
longer on two threads than on one).

Skinny GEMMs, those of a layer with at most SKINNY_OUTPUTS outputs (a classifier head: 784 -> 10),
do not go to BLAS at all when small: y = x W^T and dW += dz^T x run on the register-tiled Numba
loops of the compiled training step (npcpu.kernels.compiled_gemm), one thread, no thread-count
switch. With M that small, BLAS's packing and blocking (made for large squarish products) cost more
than the arithmetic, and the loops, whose inner loop runs over the long K dimension, beat it.
dx = dz W (a sum over only M terms per element) stays with BLAS, which is as fast there.

float32 GEMMs of the three linear-layer names go to npcpu's own AVX-512 kernels
(npcpu.blas_native.float32) where npcpu.backend.use_native_f32_gemm() says so: on an AVX-512 CPU
whose OpenBLAS runs kernels without AVX-512 (a core type pinned by OPENBLAS_CORETYPE, say), they
are faster than its sgemm; npcpu.backend.f32_gemm_reason() says why the path is what it is. A small
one runs on one thread there too (`_native`).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import numpy as np
from scipy.linalg.blas import dgemm, sgemm

from npcpu import backend, blas_native
from npcpu.kernels import compiled_gemm
from npcpu.kernels import linear as linear_kernels
from npcpu.kernels.launch import for_size

SMALL_GEMM = 1 << 23  # multiply-adds: well under a millisecond on one core
SKINNY_OUTPUTS = 16
"""Weight rows M up to which a small x W^T or dz^T x runs on the Numba loops instead of BLAS (the
loops keep 2 weight rows x 4 input rows in registers; past a few dozen rows BLAS's blocking wins)."""


def _gemm(dtype: np.dtype):
    return dgemm if dtype == np.float64 else sgemm


def _call(macs: int, gemm, *args, **kwargs):
    """gemm(*args, **kwargs), one of SciPy's BLAS wrappers, on one BLAS thread when small. Only
    the library that runs it (SciPy's) is switched: each switch is a call into the library, which
    a small model's step would pay per GEMM."""
    library = backend.gemm_blas_controller() if macs < SMALL_GEMM else None
    if library is None:
        return gemm(*args, **kwargs)
    return _on_one_thread(library.get_num_threads, library.set_num_threads, gemm, *args, **kwargs)


def _on_one_thread(get_threads, set_threads, gemm, *args, **kwargs):
    """gemm(*args, **kwargs) with the thread count of its library (get_threads/set_threads) at
    one, switched only when it is not one already, and back afterwards."""
    threads = get_threads()
    if threads == 1:
        return gemm(*args, **kwargs)
    set_threads(1)
    try:
        return gemm(*args, **kwargs)
    finally:
        set_threads(threads)


def _skinny(weight: np.ndarray, other: np.ndarray) -> bool:
    """Whether a GEMM with this (M, K) weight and (N, .) other operand takes the Numba loops: few
    weight rows, few multiply-adds, both operands C-contiguous."""
    return (weight.shape[0] <= SKINNY_OUTPUTS and other.shape[0] * weight.size < SMALL_GEMM
            and weight.flags.c_contiguous and other.flags.c_contiguous)


def _native_f32(*operands: np.ndarray) -> bool:
    """Whether a GEMM on these operands runs on the native float32 kernels: all float32 and the
    path chosen (npcpu.backend.set_f32_gemm)."""
    return all(a.dtype == np.float32 for a in operands) and backend.use_native_f32_gemm()


def _native(macs: int, gemm, *args, **kwargs):
    """gemm(*args, **kwargs), one of npcpu.blas_native.float32's, on one Numba thread when small
    (as _call does for BLAS)."""
    if macs >= SMALL_GEMM:
        return gemm(*args, **kwargs)
    return _on_one_thread(numba.get_num_threads, numba.set_num_threads, gemm, *args, **kwargs)


@functools.cache
def _all_rows(n: int) -> np.ndarray:
    """0, 1, ..., n - 1: the row indices the compiled-step loops take, here every row in order."""
    rows = np.arange(n)
    rows.flags.writeable = False
    return rows


@functools.cache
def _no_bias(dtype: np.dtype) -> np.ndarray:
    return np.empty(0, dtype)


def matmul_weight_transposed(x: np.ndarray, weight: np.ndarray,
                             bias: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T, (N, K) @ (M, K)^T -> (N, M) C-order, plus b (M,) on every row when given: BLAS
    computes y.T = W x^T in Fortran order and b is added in a pass after it; the Numba loops
    compute y directly for a skinny W and add b as they write it (the same sums, the same bits)."""
    if _skinny(weight, x) and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype):
        y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
        compiled_gemm.linear_forward(x, _all_rows(x.shape[0]), weight,
                                     _no_bias(x.dtype) if bias is None else bias, False, y, 0,
                                     x.shape[1])
        return y
    if _native_f32(x, weight):
        y = _native(x.shape[0] * weight.size, blas_native.float32.matmul_weight_transposed, x,
                    weight)
    else:
        y = _call(x.shape[0] * weight.size, _gemm(x.dtype), 1.0, weight.T, x.T, trans_a=1).T
    if bias is not None:
        add_bias(y, bias)
    return y


def add_bias(y: np.ndarray, bias: np.ndarray) -> None:
    """y[i, :] += b for every row, in place: y (N, M) C-contiguous, b (M,); on this thread when
    y is small (npcpu.kernels.launch)."""
    for_size(linear_kernels.add_bias, linear_kernels.add_bias_serial, y.size)(y, bias)


def matmul_weight(dz: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None,
                  beta: float = 0.0) -> np.ndarray:
    """dx = dz W, (N, M) @ (M, K) -> (N, K) C-order: BLAS computes dx.T = W^T dz^T in Fortran order.

    With `out` (C-contiguous (N, K)): out = beta * out + dz W in place, and out is returned
    (beta = 0 does not read out)."""
    gemm = _gemm(dz.dtype)
    macs = dz.shape[0] * weight.size
    if _native_f32(dz, weight, dz if out is None else out):
        return _native(macs, blas_native.float32.matmul_weight, dz, weight, out, beta)
    if out is None:
        return _call(macs, gemm, 1.0, weight.T, dz.T).T
    result = _call(macs, gemm, 1.0, weight.T, dz.T, beta=beta, c=out.T, overwrite_c=1)
    if not np.shares_memory(result, out):  # the wrapper worked on a copy of out: copy it back
        out[...] = result.T
    return out


def accumulate_weight_grad(grad: np.ndarray, dy: np.ndarray, x: np.ndarray,
                           beta: float = 1.0) -> None:
    """grad = beta * grad + dy^T x in place, by one BLAS GEMM (no temporary of grad's size).
    beta = 1 accumulates; beta = 0 overwrites, and BLAS then does not read grad (even NaN there
    does not reach the result).

    grad (M, K) C-contiguous is grad.T (K, M) Fortran-contiguous, which is what BLAS writes:
    grad.T += x^T dy, with x^T (K, N) and dy.T (M, N) Fortran views of the C-contiguous x and dy.
    (The Numba loops add dy^T x into grad directly for a skinny grad.)
    """
    if _skinny(grad, x) and dy.flags.c_contiguous and x.dtype == dy.dtype == grad.dtype:
        # dy^T x is summed apart and then added, as BLAS does: adding it tile by tile onto what
        # grad holds would round an accumulated gradient differently from a sum of its parts
        product = grad if beta == 0.0 else np.empty_like(grad)
        product[...] = 0  # written, not scaled: with beta = 0, NaN in grad does not reach the result
        compiled_gemm.add_weight_grad(dy, x, _all_rows(x.shape[0]), product, 0, x.shape[1])
        if beta != 0.0:
            if beta != 1.0:
                grad *= beta
            grad += product
        return
    if _native_f32(grad, dy, x):
        return _native(x.shape[0] * grad.size, blas_native.float32.accumulate_weight_grad, grad, dy,
                       x, beta)
    result = _call(x.shape[0] * grad.size, _gemm(grad.dtype), 1.0, x.T, dy.T, beta=beta, c=grad.T,
                   trans_b=1, overwrite_c=1)
    if not np.shares_memory(result, grad):  # the wrapper worked on a copy of grad: copy it back
        grad[...] = result.T


def matmul(a: np.ndarray, b: np.ndarray, *, transpose_a: bool = False, transpose_b: bool = False,
           alpha: float = 1.0, out: np.ndarray | None = None, beta: float = 0.0) -> np.ndarray:
    """alpha op(a) op(b) (+ beta out) for C-contiguous 2-D a and b, op a transpose when asked.

    The attention GEMMs (one per batch and head) go through here. In Fortran order the C-order
    result is C^T = op(b)^T op(a)^T, and a C-order array's .T is its Fortran view: so BLAS gets
    b.T and a.T with the two transpose flags swapped, and no operand is copied. With `out`
    (C-contiguous, of the result's shape) the result is written there and `out` returned.
    """
    rows = a.shape[1] if transpose_a else a.shape[0]
    inner = a.shape[0] if transpose_a else a.shape[1]
    columns = b.shape[0] if transpose_b else b.shape[1]
    gemm = _gemm(a.dtype)
    macs = rows * inner * columns
    if out is None:
        return _call(macs, gemm, alpha, b.T, a.T, trans_a=int(transpose_b),
                     trans_b=int(transpose_a)).T
    result = _call(macs, gemm, alpha, b.T, a.T, beta=beta, c=out.T, trans_a=int(transpose_b),
                   trans_b=int(transpose_a), overwrite_c=1)
    if not np.shares_memory(result, out):  # the wrapper worked on a copy of out: copy it back
        out[...] = result.T
    return out


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def run_independent(task: Callable[[int], None], count: int) -> None:
    """task(i) for i in range(count), for many small independent GEMMs (attention's products per
    batch and head): spread over one Python thread per core (Numba's thread count), each running
    its GEMMs on one BLAS thread. SciPy's BLAS wrappers release the GIL, so the threads run at once.

    Why not one GEMM at a time on every BLAS thread: a (T, T) x (T, D) product is too small to be
    split well, and each split GEMM waits for its slowest thread (for a whole time slice when
    another process holds a core). Each task's result is its own single-threaded GEMMs', so it
    does not depend on the thread count.
    """
    threads = min(count, numba.get_num_threads())
    with backend.single_blas_thread():
        if threads <= 1:
            for i in range(count):
                task(i)
            return
        key = (os.getpid(), threads)  # a forked child has none of its parent's pool threads
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="npcpu-gemm")

        def every_threads_th(first: int) -> None:  # one submission per thread, not per task:
            for i in range(first, count, threads):  # a small model's step has hundreds of tasks
                task(i)
        for _ in pool.map(every_threads_th, range(threads)):  # re-raises a task's exception
            pass
