"""The three GEMMs of a linear layer on bfloat16 operands, float32 results: npcpu.blas's names and
contracts, computed by the native AVX512_BF16 kernels (npcpu.kernels.gemm_bf16).

    y  = x W^T     matmul_weight_transposed(x, W)     (N, K) @ (M, K)^T -> (N, M)
    dx = dz W      matmul_weight(dz, W[, out, beta])  (N, M) @ (M, K)   -> (N, K)
    dW += dz^T x   accumulate_weight_grad(dW, dz, x)  in place, beta = 1 (0 to overwrite dW)

x and W are bfloat16 arrays (ml_dtypes). dz may be float32: it is then rounded to the nearest
bfloat16 first (the instruction multiplies bfloat16 only), which is the one rounding this path
adds to the widened one (npcpu.blas on float32 copies of the same bfloat16 x and W). Results,
products and sums are float32. Only call these where npcpu.backend.native_bf16_gemm_unavailable()
is None. An odd K costs a padded bfloat16 copy of W in forward (pairs must not straddle two rows).
"""

from __future__ import annotations

import numba
import numpy as np

from npcpu.dtypes import bfloat16
from npcpu.kernels import convert
from npcpu.kernels import gemm_bf16 as kernels

_NO_PANELS = np.empty(0, np.uint32)
_NO_SOURCE = np.empty((0, 0), np.uint16)


def _bits(x: np.ndarray, name: str) -> np.ndarray:
    """x's bfloat16 bit patterns as a C-contiguous uint16 array (float32 rounded to nearest)."""
    if x.dtype == np.float32:
        x = convert.f32_to_bf16(x)
    if x.dtype != bfloat16:
        raise TypeError(f"native bf16 GEMM: {name} must be bfloat16 or float32, got {x.dtype}")
    return np.ascontiguousarray(x).view(np.uint16)


def _row_words(bits: np.ndarray) -> np.ndarray:
    """The rows of a uint16 (rows, L) matrix as 32-bit pair words (rows, ceil(L / 2)), flat: a view
    for even L, a copy with a zero half after each row for odd L."""
    rows, length = bits.shape
    if length % 2:
        padded = np.zeros((rows, length + 1), np.uint16)
        padded[:, :length] = bits
        bits = padded
    return bits.view(np.uint32).reshape(-1)


def _check(name: str, shape: tuple, expected: tuple) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"native bf16 GEMM: {name} must have shape {expected}, got {tuple(shape)}")


def _output(out: np.ndarray | None, shape: tuple, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    _check(name, out.shape, shape)
    if out.dtype != np.float32:
        raise TypeError(f"native bf16 GEMM: {name} must be float32, got {out.dtype}")
    return out


def _empty_product(c: np.ndarray, beta: float, length: int) -> bool:
    """For a product with no element or an empty contraction (an empty batch): set c = beta * c
    (beta = 0: zeros) and return True; the kernels' blocking assumes at least one of each."""
    if c.size and length:
        return False
    if beta == 0.0:
        c[...] = 0.0
    else:
        c *= np.float32(beta)
    return True


def _b_operand(source: np.ndarray, pairs_down_columns: bool, rows_of_c: int):
    """gemm's (b_panels, b_source): B packed whole up front when C has several blocks of rows (each
    would otherwise pack all of B again), else packed a block at a time inside the tasks (no copy
    of B as large as B: W at mlp52m's batch 128)."""
    if rows_of_c > kernels.BLOCK_ROWS:
        return kernels.pack_panels(source, pairs_down_columns), _NO_SOURCE
    return _NO_PANELS, source


def matmul_weight_transposed(x: np.ndarray, weight: np.ndarray,
                             out: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T (N, M) float32.

    Few rows (N < K, as at batch 128): computed as y^T = W x^T, W's rows read in place as pairs,
    only x packed. Else as y = x W^T, x's rows read in place and W packed: the result is then
    written along its rows, and the packing of W is small beside N rows of work per element.
    """
    x_bits, w_bits = _bits(x, "x"), _bits(weight, "W")
    (rows, length), out_features = x_bits.shape, w_bits.shape[0]
    _check("W", w_bits.shape, (out_features, length))
    y = _output(out, (rows, out_features), "y")
    if _empty_product(y, 0.0, length):
        return y
    pairs = (length + 1) // 2
    if rows < length:
        kernels.gemm(y.T, 0.0, _row_words(w_bits), pairs, 1, pairs,
                     kernels.pack_panels(x_bits, False), _NO_SOURCE, False, numba.get_num_threads())
    else:
        kernels.gemm(y, 0.0, _row_words(x_bits), pairs, 1, pairs,
                     *_b_operand(w_bits, False, rows), False, numba.get_num_threads())
    return y


def matmul_weight(dz: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None,
                  beta: float = 0.0) -> np.ndarray:
    """dx = beta * out + dz W (N, K) float32; W's rows 2r, 2r + 1 interleaved in packing."""
    dz_bits, w_bits = _bits(dz, "dz"), _bits(weight, "W")
    rows, out_features = dz_bits.shape
    _check("W", w_bits.shape[:1], (out_features,))
    dx = _output(out, (rows, w_bits.shape[1]), "dx")
    if _empty_product(dx, beta, out_features):
        return dx
    pairs = (out_features + 1) // 2
    kernels.gemm(dx, float(beta), _row_words(dz_bits), pairs, 1, pairs,
                 *_b_operand(w_bits, True, rows), True, numba.get_num_threads())
    return dx


def accumulate_weight_grad(grad: np.ndarray, dz: np.ndarray, x: np.ndarray,
                           beta: float = 1.0) -> None:
    """grad = beta * grad + dz^T x in place (M, K) float32; beta = 0 does not read grad."""
    dz_bits, x_bits = _bits(dz, "dz"), _bits(x, "x")
    rows = dz_bits.shape[0]
    _check("x", x_bits.shape[:1], (rows,))
    _output(grad, (dz_bits.shape[1], x_bits.shape[1]), "dW")
    if _empty_product(grad, beta, rows):
        return
    a_words = kernels.interleave_rows(dz_bits)
    kernels.gemm(grad, float(beta), a_words.reshape(-1), 1, a_words.shape[1], a_words.shape[0],
                 kernels.pack_panels(x_bits, True), _NO_SOURCE, True, numba.get_num_threads())
