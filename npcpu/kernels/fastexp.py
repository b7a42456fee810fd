"""exp(x - shift) over a row, in a form LLVM vectorizes: the exponentials of the softmaxes.

Numba calls the C library's scalar expf once per element, and no vector math library is assumed
(Numba's SVML path needs Intel's runtime): the exponentials then cost more than everything else
in the cross-entropy over a large vocabulary. This is the textbook range reduction, written as
plain arithmetic on arrays so that every step is a vector instruction:

    k = round(x log2(e))                           x = k ln2 + r,  |r| <= ln2 / 2
    r = (x - k ln2_hi) - k ln2_lo                  Cody-Waite: ln2 in two parts, r exact to rounding
    exp(r) = sum_{j <= 7} r^j / j!                 Taylor, truncation error < 1e-9 relative
    exp(x) = exp(r) * 2^k                          2^k built from its bits: (k + 127) << 23

Accuracy in float32: within 2 units in the last place of exp (tested against NumPy's float64
exp). x is clamped to [-88, 88.5]: below e^-87.3 the result is 0 instead of a subnormal (a
softmax term below 1e-38 of the largest is zero to float32 anyway), above it inf. NaN stays NaN.
float64 arrays (gradient checks) take np.exp itself: this polynomial is a float32 one.
"""

import numpy as np
from numba import njit

from npcpu.kernels.intrinsics import float32_from_bits

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693145751953125)  # the leading bits of ln 2: k * LN2_HI is exact
LN2_LO = np.float32(1.428606765330187e-06)  # ln 2 - LN2_HI
INV_FACTORIALS = tuple(np.float32(1.0 / f) for f in (2, 6, 24, 120, 720, 5040))


@njit(inline="always", cache=True)
def _clamp(x):
    """x as float32 clamped to [-88, 88.5]; NaN stays NaN."""
    return min(max(np.float32(x), np.float32(-88.0)), np.float32(88.5))


@njit(inline="always", cache=True)
def _reduced_exp(v):
    """(exp(r), k) with exp(v) = exp(r) 2^k, for float32 v in [-88, 88.5]: the range reduction and
    Taylor sum of the module docstring; k is returned as an integral float32."""
    c2, c3, c4, c5, c6, c7 = INV_FACTORIALS
    one = np.float32(1.0)
    k = np.floor(v * LOG2E + np.float32(0.5))
    r = (v - k * LN2_HI) - k * LN2_LO
    return one + r * (one + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7)))))), k


@njit(inline="always", cache=True)
def exp32(x):
    """exp(x) in float32 for a scalar x, the same values as exp_shifted (x clamped to [-88, 88.5]);
    2^k is built in a register, so a loop that calls it vectorizes without a scratch array."""
    value, k = _reduced_exp(_clamp(x))
    return value * float32_from_bits(np.int32((np.int32(k) + np.int32(127)) << 23))


@njit(inline="always", cache=True)
def exp_shifted(out, x, n, shift, bits):
    """out[i] = exp(x[i] - shift) for i < n, out and x 1-D (out may be x itself); `bits` is an
    int32 scratch array of at least n elements (overwritten). Pass whole rows and a count, not
    slices: a slice of a row loses its contiguous layout in Numba's types, and the loops then do
    not vectorize."""
    if x.itemsize != 4:
        for i in range(n):
            out[i] = np.exp(x[i] - shift)
        return
    for i in range(n):
        out[i], k = _reduced_exp(_clamp(x[i] - shift))
        bits[i] = (np.int32(k) + np.int32(127)) << 23
    scale = bits[:n].view(np.float32)
    for i in range(n):
        out[i] *= scale[i]


@njit(cache=True)
def exp_in_place(values):
    """values[i] = exp(values[i]) over a 1-D array: exp32 for float32 (the values of exp_shifted),
    np.exp for float64."""
    if values.itemsize != 4:
        for i in range(values.size):
            values[i] = np.exp(values[i])
        return
    for i in range(values.size):
        values[i] = exp32(values[i])


@njit(cache=True, fastmath={"reassoc"})
def row_sum(values, n):
    """sum(values[:n]) in float64, in any order (so that it vectorizes); NaN and Inf still
    propagate, since reassociation alone assumes neither away."""
    total = 0.0
    for i in range(n):
        total += values[i]
    return total
