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
    return np.dtype(np.float64) if check_precision(precision) == "fp64" else np.dtype(np.float32)


def to_compute(x: np.ndarray, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """`x` as a `dtype` (float32 or float64) array; no copy when it already is one.

    bfloat16 and float16 are widened exactly by the parallel conversion kernels.
    """
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if x.dtype == bfloat16 and dtype == np.float32:
        return convert.bf16_to_f32(x)
    if x.dtype == float16 and dtype == np.float32:
        return convert.f16_to_f32(x)
    return x.astype(dtype)


def to_storage(x: np.ndarray, dtype: np.dtype, *, seed: int | None = None) -> np.ndarray:
    """Round `x` into the storage `dtype`; no copy when it already is one.

    Round-to-nearest-even by default; with a `seed`, bfloat16 uses stochastic rounding from a
    counter-based hash of (seed, element index), so results do not depend on thread scheduling.
    """
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype == bfloat16:
        x32 = to_compute(x, np.dtype(np.float32))
        if seed is None:
            return convert.f32_to_bf16(x32)
        return convert.f32_to_bf16_stochastic(x32, seed)
    if dtype == float16:
        return convert.f32_to_f16(to_compute(x, np.dtype(np.float32)))
    return x.astype(dtype)
