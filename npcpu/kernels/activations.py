"""Elementwise kernels of the activation layers (ReLU, GELU, Tanh) and of Dropout, forward and backward.

Every array is 1-D: the layers pass flat views of contiguous arrays, so one kernel serves any shape.
    x   (n,)            the input           y   (n,)   the output
    dy  (n,)            dL/dy from above    dx  (n,)   dL/dx, written (not accumulated)
    mask (ceil(n/8),)   uint8, bit k of mask[b] is (x[8b + k] > 0)
Arithmetic runs in the arrays' dtype (float32, or float64 for gradient checks).
"""

import math

import numpy as np
from numba import njit, prange

from npcpu.kernels.fastexp import exp32
from npcpu.kernels.rng import uniform

SQRT_HALF = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
GELU_TANH_KAPPA = 0.044715


# -- ReLU: y = max(x, 0); dx = dy where x > 0, else 0 -----------------------------------------------
@njit(parallel=True, cache=True)
def relu_forward(x, y, mask):
    """y = max(x, 0), NaN where x is NaN (as torch.relu); mask bit i = (x[i] > 0)."""
    n = x.size
    zero = x.dtype.type(0)
    for byte in prange(mask.size):
        bits = 0
        for k in range(min(8, n - 8 * byte)):
            i = 8 * byte + k
            if x[i] > zero:
                bits |= 1 << k
                y[i] = x[i]
            else:
                y[i] = zero if x[i] <= zero else x[i]  # NaN fails both tests and stays
        mask[byte] = bits


@njit(parallel=True, cache=True)
def relu_backward(dy, mask, dx):
    """dx = dy where the mask bit is set, else 0 (a select: NaN in dy at a masked place gives 0)."""
    n = dy.size
    zero = dy.dtype.type(0)
    for byte in prange(mask.size):
        bits = mask[byte]
        for k in range(min(8, n - 8 * byte)):
            i = 8 * byte + k
            dx[i] = dy[i] if (bits >> k) & 1 else zero


# -- GELU, exact: y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 -----------------------------------
# Numba calls the C library's scalar erf once per element; in float32 the kernels use instead the
# classical rational approximation of Abramowitz and Stegun, Handbook of Mathematical Functions,
# formula 7.1.26 (after Hastings): for z >= 0,
#     erfc(z) = 1 - erf(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2) + e(z),
#     t = 1 / (1 + p z),   |e(z)| <= 1.5e-7,
# which is plain arithmetic and npcpu.kernels.fastexp's exp32, so the loops vectorize. It gives
# Phi for both signs (Phi(x) = erfc(|x| / sqrt 2) / 2 for x < 0, 1 - that for x >= 0; the error
# is absolute, so far in the left tail Phi is small but not accurate relative to itself, as
# x Phi(x) there is below anything a float32 GELU output resolves next to 0), and exp(-z^2) with
# z = |x| / sqrt 2 is also the normal density's exp(-x^2 / 2), which backward needs: one
# exponential per element for both. Below z = 1, where
# erfc is close to 1 and float32 rounding of its terms would cost several ulp of erf, erf comes
# from its Maclaurin series instead, 2/sqrt(pi) sum_n (-1)^n z^(2n+1) / (n! (2n+1)), through
# n = 10 (the first term left out is below 2e-9 at z = 1). Both are computed and one selected:
# a select, not a branch, keeps the loop vectorized.
# float64 arrays (gradient checks, "fp64" precision) keep math.erf: this is a float32 accuracy.
ERFC_P = np.float32(0.3275911)
ERFC_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027,
                                       1.061405429))
ERF_SERIES = tuple(np.float32((-1) ** n * 2 / math.sqrt(math.pi) / (math.factorial(n) * (2 * n + 1)))
                   for n in reversed(range(11)))
"""Coefficients of z^(2n+1) in erf's Maclaurin series, n = 10 down to 0 (Horner's order)."""


@njit(inline="always", cache=True)
def erfc_nonnegative32(z, gaussian):
    """erfc(z) for float32 z >= 0 by A&S 7.1.26, given gaussian = exp(-z^2)."""
    a1, a2, a3, a4, a5 = ERFC_A
    t = np.float32(1.0) / (np.float32(1.0) + ERFC_P * z)
    return t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * gaussian


@njit(inline="always", cache=True)
def erf_series32(z):
    """erf(z) for float32 |z| <= 1 by its Maclaurin series (the coefficients in Horner's order)."""
    z_sq = z * z
    total = np.float32(0.0)
    for coefficient in ERF_SERIES:
        total = total * z_sq + coefficient
    return z * total


@njit(inline="always", cache=True)
def erf32(x):
    """erf(x) for a float32 x: the series below |x| = 1, else 1 - erfc(|x|) with the sign of x."""
    z = abs(np.float32(x))
    tail = np.float32(1.0) - erfc_nonnegative32(z, exp32(-z * z))
    magnitude = erf_series32(z) if z < np.float32(1.0) else tail
    return magnitude if x >= 0 else -magnitude


@njit(inline="always", cache=True)
def normal_cdf_pdf32(x):
    """(Phi(x), phi(x)) for a float32 x, with z = |x| / sqrt 2: Phi(-|x|) = (1 - erf(z)) / 2
    (the series) below z = 1, erfc(z) / 2 above; Phi(|x|) = 1 - Phi(-|x|); phi(x) =
    exp(-x^2 / 2) / sqrt(2 pi) = exp(-z^2) / sqrt(2 pi) from the exponential erfc(z) uses."""
    half, one = np.float32(0.5), np.float32(1.0)
    z = abs(np.float32(x)) * np.float32(SQRT_HALF)
    gaussian = exp32(-z * z)
    erfc_z = erfc_nonnegative32(z, gaussian)
    left_tail = half * (one - erf_series32(z)) if z < one else half * erfc_z
    cdf = one - left_tail if x >= 0 else left_tail
    return cdf, gaussian * np.float32(INV_SQRT_2PI)


@njit(inline="always", cache=True)
def gelu32(x):
    """x Phi(x) for a float32 x."""
    cdf, _ = normal_cdf_pdf32(x)
    return x * cdf


@njit(inline="always", cache=True)
def gelu_slope32(x):
    """d(x Phi(x))/dx = Phi(x) + x phi(x) for a float32 x."""
    cdf, pdf = normal_cdf_pdf32(x)
    return cdf + x * pdf


@njit(inline="always", cache=True)
def gelu64(x):
    """0.5 x (1 + erf(x / sqrt 2)) for a float64 x."""
    return 0.5 * x * (1.0 + math.erf(x * SQRT_HALF))


@njit(inline="always", cache=True)
def gelu_slope64(x):
    """Phi(x) + x phi(x) for a float64 x."""
    cdf = 0.5 * (1.0 + math.erf(x * SQRT_HALF))
    pdf = math.exp(-0.5 * x * x) * INV_SQRT_2PI
    return cdf + x * pdf


@njit(parallel=True, cache=True)
def gelu_forward(x, y):
    """y = 0.5 x (1 + erf(x / sqrt(2))) = x Phi(x)."""
    if x.itemsize == 4:
        for i in prange(x.size):
            y[i] = gelu32(x[i])
    else:
        for i in prange(x.size):
            y[i] = gelu64(x[i])


@njit(parallel=True, cache=True)
def gelu_backward(x, dy, dx):
    """dx = dy (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi): the derivative of x Phi(x)."""
    if x.itemsize == 4:
        for i in prange(x.size):
            dx[i] = dy[i] * gelu_slope32(x[i])
    else:
        for i in prange(x.size):
            dx[i] = dy[i] * gelu_slope64(x[i])


# -- GELU, tanh form: y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3) ----------------------
@njit(inline="always", cache=True)
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x)
    return 0.5 * x * (1.0 + math.tanh(inner))


@njit(inline="always", cache=True)
def gelu_tanh_slope(x):
    """0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(u).

    Product rule on the forward line `0.5 x (1 + tanh(u))`, with du/dx = sqrt(2/pi)(1 + 3 kappa x^2).
    """
    x_sq = x * x
    t = math.tanh(GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x_sq * x))
    du_dx = GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * x_sq)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx


@njit(parallel=True, cache=True)
def gelu_tanh_forward(x, y):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    for i in prange(x.size):
        y[i] = gelu_tanh(x[i])


@njit(parallel=True, cache=True)
def gelu_tanh_backward(x, dy, dx):
    """dx = dy gelu_tanh_slope(x)."""
    for i in prange(x.size):
        dx[i] = dy[i] * gelu_tanh_slope(x[i])


# -- Tanh: y = tanh(x); dx = dy (1 - y^2), from the output -------------------------------------------
@njit(inline="always", cache=True)
def tanh_slope(y):
    """d tanh(x)/dx = 1 - y^2, from the output y = tanh(x)."""
    return 1.0 - y * y


@njit(parallel=True, cache=True)
def tanh_forward(x, y):
    for i in prange(x.size):
        y[i] = math.tanh(x[i])


@njit(parallel=True, cache=True)
def tanh_backward(y, dy, dx):
    """dx = dy (1 - y^2), y = tanh(x) the forward output."""
    for i in prange(y.size):
        dx[i] = dy[i] * tanh_slope(y[i])


# -- Dropout: the mask is a pure function of (seed, stream, index) -----------------------------------
@njit(parallel=True, cache=True)
def dropout_apply(x, y, p, scale, seed, stream, first):
    """y[i] = x[i] * scale where uniform(seed, stream, first + i) >= p (kept with probability
    1 - p), else 0. `first` is the global index of x[0]: 0 in one process; in data-parallel
    training the elements of the global batch before this process's rows, so that every element
    gets the mask it would get in one process.

    Forward applies it to x and backward to dy with the same (seed, stream): dL/dx = dy * mask * scale,
    the same mask regenerated instead of stored.
    """
    zero = x.dtype.type(0)
    for i in prange(x.size):
        y[i] = x[i] * scale if uniform(seed, stream, first + i) >= p else zero
