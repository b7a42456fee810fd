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
@njit(parallel=True, cache=True)
def gelu_forward(x, y):
    """y = 0.5 x (1 + erf(x / sqrt(2)))."""
    for i in prange(x.size):
        y[i] = 0.5 * x[i] * (1.0 + math.erf(x[i] * SQRT_HALF))


@njit(parallel=True, cache=True)
def gelu_backward(x, dy, dx):
    """dx = dy (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi): the derivative of x Phi(x)."""
    for i in prange(x.size):
        cdf = 0.5 * (1.0 + math.erf(x[i] * SQRT_HALF))
        pdf = math.exp(-0.5 * x[i] * x[i]) * INV_SQRT_2PI
        dx[i] = dy[i] * (cdf + x[i] * pdf)


# -- GELU, tanh form: y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3) ----------------------
@njit(parallel=True, cache=True)
def gelu_tanh_forward(x, y):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    for i in prange(x.size):
        inner = GELU_TANH_BETA * (x[i] + GELU_TANH_KAPPA * x[i] * x[i] * x[i])
        y[i] = 0.5 * x[i] * (1.0 + math.tanh(inner))


@njit(parallel=True, cache=True)
def gelu_tanh_backward(x, dy, dx):
    """dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)), t = tanh(u).

    Product rule on the forward line `0.5 x (1 + tanh(u))`, with du/dx = sqrt(2/pi)(1 + 3 kappa x^2).
    """
    for i in prange(x.size):
        x_sq = x[i] * x[i]
        t = math.tanh(GELU_TANH_BETA * (x[i] + GELU_TANH_KAPPA * x_sq * x[i]))
        du_dx = GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * x_sq)
        dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * x[i] * (1.0 - t * t) * du_dx)


# -- Tanh: y = tanh(x); dx = dy (1 - y^2), from the output -------------------------------------------
@njit(parallel=True, cache=True)
def tanh_forward(x, y):
    for i in prange(x.size):
        y[i] = math.tanh(x[i])


@njit(parallel=True, cache=True)
def tanh_backward(y, dy, dx):
    """dx = dy (1 - y^2), y = tanh(x) the forward output."""
    for i in prange(y.size):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


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
