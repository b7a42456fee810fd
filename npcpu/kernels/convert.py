"""Conversions between float32 and the 16-bit storage types (placeholder: ml_dtypes/NumPy casts).

TODO(issue 2): parallel Numba kernels over uint16 views; this placeholder keeps the interface.
"""

import numpy as np

from npcpu.precision import bfloat16


def bf16_to_f32(x):
    return x.astype(np.float32)


def f16_to_f32(x):
    return x.astype(np.float32)


def f32_to_bf16(x):
    return x.astype(bfloat16)


def f32_to_f16(x):
    return x.astype(np.float16)


def f32_to_bf16_stochastic(x, seed):
    return x.astype(bfloat16)
