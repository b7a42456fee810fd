"""The 16-bit floating-point dtypes npcpu stores, and how Numba kernels see them.

Numba knows neither ml_dtypes' bfloat16 nor float16 scalars, so kernels take a 16-bit array as its
uint16 bit patterns (`as_bits`). This module imports nothing of npcpu: both npcpu.precision (the
policies) and npcpu.kernels.convert (the conversions the policies call) build on it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
HALF_DTYPES = (bfloat16, float16)


def as_bits(x: np.ndarray) -> np.ndarray:
    """A bfloat16 or float16 array as a uint16 view of its bits (never a copy); others unchanged."""
    return x.view(np.uint16) if x.dtype in HALF_DTYPES else x
