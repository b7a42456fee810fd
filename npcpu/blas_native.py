"""The three GEMMs of a linear layer on npcpu's own AVX-512 kernels (npcpu.kernels.gemm_bf16), with
npcpu.blas's names and contracts, for two kinds of operands:

    bf16.*      bfloat16 x and W, float32 results, on AVX512_BF16's vdpbf16ps
    float32.*   float32 throughout, on AVX-512F's vfmadd231ps

    y  = x W^T     matmul_weight_transposed(x, W)     (N, K) @ (M, K)^T -> (N, M)
    dx = dz W      matmul_weight(dz, W[, out, beta])  (N, M) @ (M, K)   -> (N, K)
    dW += dz^T x   accumulate_weight_grad(dW, dz, x)  in place, beta = 1 (0 to overwrite dW)

bf16: x and W are bfloat16 arrays (ml_dtypes). dz may be float32: it is then rounded to the nearest
bfloat16 first (the instruction multiplies bfloat16 only), which is the one rounding this path
adds to the widened one (npcpu.blas on float32 copies of the same bfloat16 x and W). Products and
sums are float32. Only call these where npcpu.backend.native_bf16_gemm_unavailable() is None. An
odd K costs a padded bfloat16 copy of W in forward (pairs must not straddle two rows).

float32: every operand float32; each product is rounded once into its sum (a fused multiply-add),
so results equal BLAS sgemm's to float32 rounding of a sum taken in another order. No operand is
copied except the packing of B. Only call these where npcpu.backend.native_f32_gemm_unavailable()
is None; npcpu.blas sends float32 GEMMs here when npcpu.backend.use_native_f32_gemm() says so.

The two differ only in how an operand becomes the kernels' 32-bit words (`_Bfloat16Words`,
`_Float32Words`); the GEMMs themselves (`NativeGemms`) are one piece of code.
"""

from __future__ import annotations

import numba
import numpy as np

from npcpu.dtypes import bfloat16
from npcpu.kernels import convert
from npcpu.kernels import gemm_bf16 as kernels


def _check(gemm: str, name: str, shape: tuple, expected: tuple) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{gemm}: {name} must have shape {expected}, got {tuple(shape)}")


class _Bfloat16Words:
    """bfloat16 operands as uint16 bits, read by the kernels in 32-bit pairs."""

    gemm = "native bf16 GEMM"
    no_panels = np.empty(0, np.uint32)
    no_source = np.empty((0, 0), np.uint16)

    def operand(self, x: np.ndarray, name: str) -> np.ndarray:
        """x's bfloat16 bit patterns as a C-contiguous uint16 array (float32 rounded to nearest)."""
        if x.dtype == np.float32:
            x = convert.f32_to_bf16(x)
        if x.dtype != bfloat16:
            raise TypeError(f"{self.gemm}: {name} must be bfloat16 or float32, got {x.dtype}")
        return np.ascontiguousarray(x).view(np.uint16)

    @staticmethod
    def words(length: int) -> int:
        return (length + 1) // 2

    @staticmethod
    def row_words(bits: np.ndarray) -> np.ndarray:
        """The rows of a uint16 (rows, L) matrix as 32-bit pair words (rows, ceil(L / 2)), flat: a
        view for even L, a copy with a zero half after each row for odd L."""
        rows, length = bits.shape
        if length % 2:
            padded = np.zeros((rows, length + 1), np.uint16)
            padded[:, :length] = bits
            bits = padded
        return bits.view(np.uint32).reshape(-1)

    @staticmethod
    def transposed(bits: np.ndarray) -> tuple:
        """A = bits^T for gemm: (a_words, a_row_step, a_pair_step, pairs), the rows of `bits`
        interleaved in pairs (the pairs of A run down bits' columns)."""
        words = kernels.interleave_rows(bits)
        return words.reshape(-1), 1, words.shape[1], words.shape[0]


class _Float32Words:
    """float32 operands, one float32 per word: read in place, nothing padded or interleaved."""

    gemm = "native float32 GEMM"
    no_panels = np.empty(0, np.float32)
    no_source = np.empty((0, 0), np.float32)

    def operand(self, x: np.ndarray, name: str) -> np.ndarray:
        if x.dtype != np.float32:
            raise TypeError(f"{self.gemm}: {name} must be float32, got {x.dtype}")
        return np.ascontiguousarray(x)

    @staticmethod
    def words(length: int) -> int:
        return length

    @staticmethod
    def row_words(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1)

    @staticmethod
    def transposed(x: np.ndarray) -> tuple:
        """A = x^T read in place: row p of A is column p of x (step 1), its R elements x's rows."""
        return x.reshape(-1), 1, x.shape[1], x.shape[0]


class NativeGemms:
    """npcpu.blas's three linear-layer GEMMs on the native kernels, for one kind of operand."""

    def __init__(self, words) -> None:
        self._words = words

    def _output(self, out: np.ndarray | None, shape: tuple, name: str) -> np.ndarray:
        if out is None:
            return np.empty(shape, np.float32)
        _check(self._words.gemm, name, out.shape, shape)
        if out.dtype != np.float32:
            raise TypeError(f"{self._words.gemm}: {name} must be float32, got {out.dtype}")
        return out

    @staticmethod
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

    def _transposed_b_operand(self, source: np.ndarray, rows_of_c: int):
        """gemm's (b_panels, b_source) for B = source^T (a transpose of words): packed whole up
        front when C has several blocks of rows (each would otherwise transpose all of B again),
        else a block at a time inside the tasks (no copy of B as large as B)."""
        if rows_of_c > kernels.BLOCK_ROWS:
            return kernels.pack_panels(source, False), self._words.no_source
        return self._words.no_panels, source

    def matmul_weight_transposed(self, x: np.ndarray, weight: np.ndarray,
                                 out: np.ndarray | None = None) -> np.ndarray:
        """y = x W^T (N, M) float32.

        Few rows (N < K, as at batch 128): computed as y^T = W x^T, W's rows read in place, only x
        packed. Else as y = x W^T, x's rows read in place and W packed: the result is then written
        along its rows, and the packing of W is small beside N rows of work per element.
        """
        words = self._words
        x, weight = words.operand(x, "x"), words.operand(weight, "W")
        (rows, length), out_features = x.shape, weight.shape[0]
        _check(words.gemm, "W", weight.shape, (out_features, length))
        y = self._output(out, (rows, out_features), "y")
        if self._empty_product(y, 0.0, length):
            return y
        pairs = words.words(length)
        if rows < length:
            kernels.gemm(y.T, 0.0, words.row_words(weight), pairs, 1, pairs,
                         kernels.pack_panels(x, False), words.no_source, False,
                         numba.get_num_threads())
        else:
            kernels.gemm(y, 0.0, words.row_words(x), pairs, 1, pairs,
                         *self._transposed_b_operand(weight, rows), False, numba.get_num_threads())
        return y

    def matmul_weight(self, dz: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None,
                      beta: float = 0.0) -> np.ndarray:
        """dx = beta * out + dz W (N, K) float32 (beta = 0 does not read out); W packed down its
        columns (for bfloat16, rows 2r, 2r + 1 interleaved) a block at a time inside the tasks,
        however many blocks of rows C has: that packing reads W's rows along their memory while
        the tiles compute, and costs less than reading back a packed copy of all of W."""
        words = self._words
        dz, weight = words.operand(dz, "dz"), words.operand(weight, "W")
        rows, out_features = dz.shape
        _check(words.gemm, "W", weight.shape[:1], (out_features,))
        dx = self._output(out, (rows, weight.shape[1]), "dx")
        if self._empty_product(dx, beta, out_features):
            return dx
        pairs = words.words(out_features)
        kernels.gemm(dx, float(beta), words.row_words(dz), pairs, 1, pairs,
                     words.no_panels, weight, True, numba.get_num_threads())
        return dx

    def accumulate_weight_grad(self, grad: np.ndarray, dz: np.ndarray, x: np.ndarray,
                               beta: float = 1.0) -> None:
        """grad = beta * grad + dz^T x in place (M, K) float32; beta = 0 does not read grad.

        The narrower of dz and x is packed as B (packing is the dearer way to prepare an
        operand): grad = dz^T x when x has no more columns than dz, else grad^T = x^T dz,
        written through grad's transposed view."""
        words = self._words
        dz, x = words.operand(dz, "dz"), words.operand(x, "x")
        rows = dz.shape[0]
        _check(words.gemm, "x", x.shape[:1], (rows,))
        self._output(grad, (dz.shape[1], x.shape[1]), "dW")
        if self._empty_product(grad, beta, rows):
            return
        c, a, b = (grad, dz, x) if x.shape[1] <= dz.shape[1] else (grad.T, x, dz)
        kernels.gemm(c, float(beta), *words.transposed(a), kernels.pack_panels(b, True),
                     words.no_source, True, numba.get_num_threads())


bf16 = NativeGemms(_Bfloat16Words())
float32 = NativeGemms(_Float32Words())
