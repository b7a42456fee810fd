"""Fused optimizer updates: one multi-threaded pass per tensor that reads each array once and writes it once.

Legend: n = number of elements of one parameter tensor (every array here is a flat (n,) view).
Arrays are float32 or float64, or bfloat16 passed as its uint16 bits; `load` widens bf16 bits to
float32 and `store` rounds back (stochastically or to nearest even). Arithmetic runs in the dtype of
the scalar hyperparameters, which the Python side casts to the gradient's dtype (float32, or float64
for float64 parameters), so a float32 optimizer computes in float32 exactly as torch does.

Stochastic rounding takes its random bits from npcpu.kernels.rng: one 64-bit hash of
(seed, stream, element index) per element, split into four 16-bit fields, one per array the kernel
may round (parameter, first moment, second moment, AMSGrad maximum). The stream encodes
(step, parameter index), so the bits depend on neither thread count nor call order.

The bf16 bit helpers are written here because npcpu.kernels.convert did not yet provide them.
"""

import numpy as np
from numba import njit, prange, types, uint16, uint32, uint64
from numba.extending import overload

from npcpu.kernels.rng import hash_index

# Fields of the 64 random bits of one element (see the module docstring).
PARAM_BITS, EXP_AVG_BITS, EXP_AVG_SQ_BITS, MAX_EXP_AVG_SQ_BITS = 0, 16, 32, 48
# Block length of the deterministic LAMB norm reduction (same partial sums for any thread count).
NORM_BLOCK = 8192


# ---------------------------------------------------------------------------------------------
# bfloat16 bits <-> float32
# ---------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def bf16_bits_to_f32(bits):
    """The float32 with `bits` (uint16) as its upper half: exact, bf16 is a truncated float32."""
    return uint32(uint32(bits) << uint32(16)).view(np.float32)


@njit(inline="always", cache=True)
def f32_to_bf16_bits_nearest(x):
    """Round float32 `x` to bfloat16 bits, to nearest, ties to even; NaN stays a (quiet) NaN."""
    bits = np.float32(x).view(np.uint32)
    if (bits & uint32(0x7FFFFFFF)) > uint32(0x7F800000):
        return uint16((bits >> uint32(16)) | uint32(0x40))
    bias = uint32(0x7FFF) + ((bits >> uint32(16)) & uint32(1))
    return uint16((bits + bias) >> uint32(16))


@njit(inline="always", cache=True)
def f32_to_bf16_bits_stochastic(x, random16):
    """Round float32 `x` to bfloat16 bits, up with probability (dropped bits) / 2^16.

    Adding 16 uniform random bits below the kept ones and truncating rounds up exactly when the
    random number is below the dropped fraction, so E[round(x)] = x. Inf and NaN are kept as they are.
    """
    bits = np.float32(x).view(np.uint32)
    if (bits & uint32(0x7F800000)) == uint32(0x7F800000):
        return f32_to_bf16_bits_nearest(x)
    return uint16((bits + (uint32(random16) & uint32(0xFFFF))) >> uint32(16))


# ---------------------------------------------------------------------------------------------
# load / store: the same kernel body for float arrays and bf16 bits (Numba specializes per dtype)
# ---------------------------------------------------------------------------------------------
def load(array, i):
    """array[i] as a float: bf16 bits are widened to float32, floats are returned as they are."""
    raise NotImplementedError("load is only callable from Numba-compiled code")


def store(array, i, value, stochastic, random_bits, field):
    """array[i] = value, rounding to bf16 bits when `array` holds them.

    Rounding is stochastic (with bits `field`..`field`+15 of `random_bits`) when `stochastic`,
    else to nearest even. Float arrays take the value as it is.
    """
    raise NotImplementedError("store is only callable from Numba-compiled code")


@overload(load, inline="always")
def _load_overload(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: bf16_bits_to_f32(array[i])
    return lambda array, i: array[i]


@overload(store, inline="always")
def _store_overload(array, i, value, stochastic, random_bits, field):
    if array.dtype == types.uint16:
        def store_bf16(array, i, value, stochastic, random_bits, field):
            if stochastic:
                array[i] = f32_to_bf16_bits_stochastic(np.float32(value), random_bits >> uint64(field))
            else:
                array[i] = f32_to_bf16_bits_nearest(np.float32(value))
        return store_bf16

    def store_float(array, i, value, stochastic, random_bits, field):
        array[i] = value
    return store_float


@njit(inline="always", cache=True)
def _random_bits(stochastic, seed, stream, i):
    """The element's 64 random bits when any rounding is stochastic (else 0, and no hashing)."""
    if stochastic:
        return hash_index(seed, stream, i)
    return uint64(0)


# ---------------------------------------------------------------------------------------------
# SGD (torch.optim.SGD, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def sgd_step(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay,
             nesterov, maximize, first_step, stochastic, seed, stream):
    """One SGD step in place on `param` (n,) and `momentum_buffer` (n,; unused when momentum == 0).

    g = -grad if maximize else grad
    g = g + weight_decay * w                                   (when weight_decay != 0)
    b = g on the first step, else momentum * b + (1 - dampening) * g   (when momentum != 0)
    g = g + momentum * b if nesterov else b                   (when momentum != 0)
    w = w - lr * g
    """
    use_momentum = momentum != 0
    use_decay = weight_decay != 0
    for i in prange(param.size):
        bits = _random_bits(stochastic, seed, stream, i)
        g = -grad[i] if maximize else grad[i]
        w = load(param, i)
        if use_decay:
            g = g + weight_decay * w
        if use_momentum:
            if first_step:
                b = g
            else:
                b = load(momentum_buffer, i) * momentum + one_minus_dampening * g
            store(momentum_buffer, i, b, stochastic, bits, EXP_AVG_BITS)
            if nesterov:
                g = g + momentum * b
            else:
                g = b
        store(param, i, w + (-lr) * g, stochastic, bits, PARAM_BITS)


# ---------------------------------------------------------------------------------------------
# Adam / AdamW (torch.optim.Adam / AdamW, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's moment updates, as torch writes them: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)."""
    return m + one_minus_beta1 * (g - m), v * beta2 + one_minus_beta2 * (g * g)


@njit(parallel=True, cache=True)
def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2,
              one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
              amsgrad, maximize, stochastic, seed, stream):
    """One Adam (AdamW when `decay_factor` != 1) step in place on param, exp_avg, exp_avg_sq (n,).

    g = -grad if maximize else grad
    g = g + weight_decay * w              (Adam's coupled L2; pass weight_decay = 0 for AdamW)
    w = decay_factor * w                  (AdamW's decoupled decay: decay_factor = 1 - lr * wd)
    m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
    v_max = max(v_max, v)                 (AMSGrad: the max of the raw second moment)
    w = w - step_size * m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)
    with step_size = lr / (1 - beta1^t).  `max_exp_avg_sq` is unused unless `amsgrad`.
    """
    use_decay = weight_decay != 0
    for i in prange(param.size):
        bits = _random_bits(stochastic, seed, stream, i)
        g = -grad[i] if maximize else grad[i]
        w = load(param, i)
        if use_decay:
            g = g + weight_decay * w
        w = w * decay_factor
        m, v = adam_moments(g, load(exp_avg, i), load(exp_avg_sq, i), one_minus_beta1, beta2,
                            one_minus_beta2)
        store(exp_avg, i, m, stochastic, bits, EXP_AVG_BITS)
        store(exp_avg_sq, i, v, stochastic, bits, EXP_AVG_SQ_BITS)
        if amsgrad:
            v = max(load(max_exp_avg_sq, i), v)
            store(max_exp_avg_sq, i, v, stochastic, bits, MAX_EXP_AVG_SQ_BITS)
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        store(param, i, w + (-step_size) * (m / denom), stochastic, bits, PARAM_BITS)


# ---------------------------------------------------------------------------------------------
# LAMB (arXiv 1904.00962, Algorithm 2): moments and norms in pass 1, the scaled update in pass 2
# ---------------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def lamb_direction(m, v, w, bias_correction1, bias_correction2, eps, weight_decay):
    """r + lambda w with r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)."""
    return (m / bias_correction1) / (np.sqrt(v / bias_correction2) + eps) + weight_decay * w


@njit(parallel=True, cache=True)
def lamb_moments(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
                 weight_decay, bias_correction1, bias_correction2, maximize, stochastic, seed,
                 stream, partial_sums):
    """Pass 1: update exp_avg, exp_avg_sq in place; return (||w||^2, ||r + lambda w||^2) as float64.

    The direction is computed from the moments as stored (after any bf16 rounding), so that pass 2,
    which reads them back, moves along exactly the direction whose norm is returned here.
    `partial_sums` is a (2, ceil(n / NORM_BLOCK)) float64 scratch: one partial sum per fixed block,
    added in order afterwards, so the norms do not depend on the thread count.
    """
    n = param.size
    blocks = partial_sums.shape[1]
    for block in prange(blocks):
        weight_sq = 0.0
        update_sq = 0.0
        for i in range(block * NORM_BLOCK, min(n, (block + 1) * NORM_BLOCK)):
            bits = _random_bits(stochastic, seed, stream, i)
            g = -grad[i] if maximize else grad[i]
            m, v = adam_moments(g, load(exp_avg, i), load(exp_avg_sq, i), one_minus_beta1, beta2,
                                one_minus_beta2)
            store(exp_avg, i, m, stochastic, bits, EXP_AVG_BITS)
            store(exp_avg_sq, i, v, stochastic, bits, EXP_AVG_SQ_BITS)
            w = load(param, i)
            u = lamb_direction(load(exp_avg, i), load(exp_avg_sq, i), w, bias_correction1,
                               bias_correction2, eps, weight_decay)
            weight_sq += np.float64(w) * np.float64(w)
            update_sq += np.float64(u) * np.float64(u)
        partial_sums[0, block] = weight_sq
        partial_sums[1, block] = update_sq
    total_weight_sq = 0.0
    total_update_sq = 0.0
    for block in range(blocks):
        total_weight_sq += partial_sums[0, block]
        total_update_sq += partial_sums[1, block]
    return total_weight_sq, total_update_sq


@njit(parallel=True, cache=True)
def lamb_apply(param, exp_avg, exp_avg_sq, scaled_lr, eps, weight_decay, bias_correction1,
               bias_correction2, stochastic, seed, stream):
    """Pass 2: w = w - scaled_lr * (r + lambda w), with scaled_lr = lr * trust ratio."""
    for i in prange(param.size):
        bits = _random_bits(stochastic, seed, stream, i)
        w = load(param, i)
        u = lamb_direction(load(exp_avg, i), load(exp_avg_sq, i), w, bias_correction1,
                           bias_correction2, eps, weight_decay)
        store(param, i, w - scaled_lr * u, stochastic, bits, PARAM_BITS)


# ---------------------------------------------------------------------------------------------
# Lookahead (arXiv 1907.08610, Algorithm 1): the slow-weight sync every k steps
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def lookahead_sync(fast, slow, alpha, stochastic, seed, stream):
    """slow = slow + alpha (fast - slow); fast = slow (rounded when `fast` holds bf16 bits)."""
    for i in prange(slow.size):
        bits = _random_bits(stochastic, seed, stream, i)
        s = slow[i] + alpha * (load(fast, i) - slow[i])
        slow[i] = s
        store(fast, i, s, stochastic, bits, PARAM_BITS)
