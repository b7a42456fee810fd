"""A counter-based random generator: the n-th number of stream (seed, stream) is a pure hash.

Same number for the same (seed, stream, index) in any order, any thread, any process: this is what
makes dropout masks, stochastic rounding and the synthetic data set independent of thread
scheduling and of batch boundaries. The hash is SplitMix64's finalizer (Steele et al., 2014),
applied twice so that neighbouring seeds and indices give unrelated outputs.

All arithmetic is uint64 (Numba turns int64 * uint64 into float64, so every operand is cast).
"""

import numpy as np
from numba import njit, uint64

_GOLDEN = uint64(0x9E3779B97F4A7C15)
_MUL1 = uint64(0xBF58476D1CE4E5B9)
_MUL2 = uint64(0x94D049BB133111EB)


@njit(uint64(uint64), inline="always", cache=True)
def mix64(z):
    """SplitMix64's finalizer: a bijection on 64-bit integers with full avalanche."""
    z = (z ^ (z >> uint64(30))) * _MUL1
    z = (z ^ (z >> uint64(27))) * _MUL2
    return z ^ (z >> uint64(31))


@njit(inline="always", cache=True)
def hash_index(seed, stream, index):
    """64 random bits for element `index` of stream `stream` under `seed` (all taken as uint64)."""
    key = mix64(uint64(seed) * _GOLDEN + uint64(stream))
    return mix64(key ^ (uint64(index) * _GOLDEN))


@njit(inline="always", cache=True)
def uniform(seed, stream, index):
    """A float64 uniform on [0, 1) with 53 random bits."""
    return np.float64(hash_index(seed, stream, index) >> uint64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always", cache=True)
def normal(seed, stream, index):
    """A standard normal by Box-Muller from two uniforms of the same counter."""
    u1 = 1.0 - uniform(seed, stream, uint64(2) * uint64(index))  # in (0, 1]: log is finite
    u2 = uniform(seed, stream, uint64(2) * uint64(index) + uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
