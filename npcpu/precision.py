"""Precision policies: how parameters and saved activations are stored, and what arithmetic runs in.

| policy | storage (parameters, saved activations) | arithmetic, gradients |
| ------ | --------------------------------------- | --------------------- |
| fp64   | float64 (for gradient checks)           | float64               |
| fp32   | float32                                 | float32               |
| bf16   | ml_dtypes.bfloat16                      | float32               |
| fp16   | float16 (with a dynamic loss scaler)    | float32               |

GEMMs always run on float32 (float64 under fp64) working copies; gradients always accumulate in the
compute dtype. Conversions go through the Numba kernels in `npcpu.kernels.convert`.
"""

from __future__ import annotations

import numpy as np

from npcpu.dtypes import bfloat16, float16
from npcpu.kernels import convert

STORAGE_DTYPES = {
    "fp64": np.dtype(np.float64),
    "fp32": np.dtype(np.float32),
    "bf16": bfloat16,
    "fp16": float16,
}


def check_precision(precision: str) -> str:
    if precision not in STORAGE_DTYPES:
        raise ValueError(f"precision must be one of {sorted(STORAGE_DTYPES)}, got {precision!r}")
    return precision


def storage_dtype(precision: str) -> np.dtype:
    """The dtype parameters and saved activations are stored in under `precision`."""
    return STORAGE_DTYPES[check_precision(precision)]


def compute_dtype(precision: str) -> np.dtype:
    """The dtype arithmetic and gradients use under `precision`: float64 for fp64, else float32."""
    return STORAGE_DTYPES["fp64" if check_precision(precision) == "fp64" else "fp32"]


def to_compute(x: np.ndarray, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """`x` as a `dtype` (float32 or float64) array; no copy when it already is one.

    bfloat16 and float16 are widened exactly by the parallel conversion kernels.
    """
    if x.dtype == dtype:
        return x
    dtype = np.dtype(dtype)
    if x.dtype == bfloat16 and dtype == np.float32:
        return convert.bf16_to_f32(x)
    if x.dtype == float16 and dtype == np.float32:
        return convert.f16_to_f32(x)
    return x.astype(dtype)


def overflow_threshold(dtype: np.dtype) -> float:
    """The smallest magnitude that rounds to Inf in the 16-bit `dtype` (round to nearest even):
    the largest finite value plus half its ulp, 2**maxexp (1 - 2**-(mantissa bits + 2));
    65520 for float16, about 3.3961e38 for bfloat16."""
    info = np.finfo(np.dtype(dtype)) if np.dtype(dtype) != bfloat16 else _bf16_finfo()
    return 2.0 ** info.maxexp * (1 - 2.0 ** -(info.nmant + 2))


def _bf16_finfo():
    import ml_dtypes
    return ml_dtypes.finfo(bfloat16)


def to_storage(x: np.ndarray, dtype: np.dtype, *, seed: int | None = None) -> np.ndarray:
    """Round `x` into the storage `dtype`; no copy when it already is one.

    Round-to-nearest-even by default; with a `seed`, bfloat16 uses stochastic rounding from a
    counter-based hash of (seed, element index), so results do not depend on thread scheduling.
    """
    if x.dtype == dtype:
        return x
    dtype = np.dtype(dtype)
    if dtype == bfloat16:
        x32 = to_compute(x, np.dtype(np.float32))
        if seed is None:
            return convert.f32_to_bf16(x32)
        return convert.f32_to_bf16_stochastic(x32, seed)
    if dtype == float16:
        return convert.f32_to_f16(to_compute(x, np.dtype(np.float32)))
    return x.astype(dtype)
