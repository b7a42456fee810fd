"""Fused optimizer updates: one multi-threaded pass per tensor that reads each array once and writes it once.

Legend: n = number of elements of one parameter tensor (every array here is a flat (n,) view);
BLOCK = 4096 elements, the unit of work of one prange iteration (the last block may be shorter).
Arrays are float32 or float64, or bfloat16 passed as its uint16 bits; `load` widens bf16 bits to
float32 and `store` rounds back (stochastically or to nearest even) with the shared helpers of
npcpu.kernels.convert. Arithmetic runs in the dtype of the scalar hyperparameters, which the Python
side casts to the gradient's dtype (float32, or float64 for float64 parameters), so a float32
optimizer computes in float32 exactly as torch does.

Why blocks: these updates are a few flops per 16-28 bytes moved, so they run at memory speed only
when the element loop is SIMD-vectorized. Each prange iteration hands views sliced to its block
(`param[start:stop]`) to a plain loop `for j in range(count)`: indices LLVM can prove non-negative
and consecutive, no calls, no branches on data (flags such as `maximize` are loop invariant and
NaN handling is a select), so the loop vectorizes. Per-block work that is not elementwise (random
bits, norms) is done in short vectorizable loops over block-sized scratch arrays.

Stochastic rounding takes its random bits from npcpu.kernels.rng, one 64-bit hash per 4 elements of
each array that is rounded: the array in slot s (PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT,
MAX_EXP_AVG_SQ_SLOT; SGD's momentum buffer takes EXP_AVG_SLOT) rounds element i with the 16-bit
field i mod 4 (bits 16k .. 16k + 15 for field k) of hash_index(seed, stream, 4 * (i // 4) + s). The
stream encodes (step, parameter index), so the bits depend on neither thread count nor call order.
"""

import numpy as np
from numba import njit, prange, types, uint16, uint64
from numba.extending import intrinsic, overload

from npcpu.kernels.convert import bf16_bits_to_f32, round_bf16_nearest_bits, round_bf16_stochastic_with_bits
from npcpu.kernels.rng import hash_index

BLOCK = 4096
"""Elements per prange iteration; a power of two (LAMB's norms sum each block's squares pairwise)
and a multiple of 4 (one hash per 4 elements). LAMB's block sums are what makes its norms the same
for any thread count: they are added in block order, in float64."""
PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT, MAX_EXP_AVG_SQ_SLOT = 0, 1, 2, 3


@njit(cache=True, error_model="numpy")
def block_count(n):
    """The number of BLOCK-element blocks that cover n elements (LAMB's partial-sum scratch length)."""
    return -(-n // BLOCK)


# ---------------------------------------------------------------------------------------------
# fused multiply-add, as torch's vectorized CPU kernels compute add(alpha=), lerp and addcmul
# ---------------------------------------------------------------------------------------------
@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's llvm.fma; one instruction on CPUs with FMA).

    torch's CPU kernels compute x.add_(y, alpha=a) as fma(a, y, x), x.lerp_(y, w) (w < 0.5) as
    fma(w, y - x, x) and x.addcmul_(y, z, value=c) as fma(c * y, z, x); writing the same here makes
    the updates bit-identical to torch.optim's, not merely close.
    """
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


# ---------------------------------------------------------------------------------------------
# load / store / random bits: one kernel body for float arrays and bf16 bits (Numba specializes
# per dtype, so a float32 state costs nothing for the bf16 case and the other way round)
# ---------------------------------------------------------------------------------------------
def load(array, j):
    """array[j] as a float: bf16 bits are widened to float32, floats are returned as they are."""
    raise NotImplementedError("load is only callable from Numba-compiled code")


def store(array, j, value, stochastic, random16):
    """array[j] = value; returns the value as stored (after rounding, widened back to a float).

    bf16 bits are rounded stochastically with the 16 random bits random16[j] when `stochastic`,
    else to nearest even. Float arrays take the value as it is (and ignore `random16`).
    """
    raise NotImplementedError("store is only callable from Numba-compiled code")


def random_fields(array, stochastic, seed, stream, slot, start):
    """The 16-bit random fields for the block `array` (elements start .. start + array.size - 1).

    A uint16 array with one field per element when `array` holds bf16 bits (zeros when not
    `stochastic`, so that `store` may read it unconditionally); an empty one for float arrays.
    """
    raise NotImplementedError("random_fields is only callable from Numba-compiled code")


@overload(load)
def _load_overload(array, j):
    if array.dtype == types.uint16:
        return lambda array, j: bf16_bits_to_f32(array[j])
    return lambda array, j: array[j]


@overload(store)
def _store_overload(array, j, value, stochastic, random16):
    if array.dtype == types.uint16:
        def store_bf16(array, j, value, stochastic, random16):
            # both roundings are a few integer operations: a select, not a branch, in the SIMD loop
            rounded_up_or_down = round_bf16_stochastic_with_bits(value, random16[j])
            bits = rounded_up_or_down if stochastic else round_bf16_nearest_bits(value)
            array[j] = bits
            return bf16_bits_to_f32(bits)
        return store_bf16

    def store_float(array, j, value, stochastic, random16):
        array[j] = value
        return array[j]
    return store_float


@overload(random_fields)
def _random_fields_overload(array, stochastic, seed, stream, slot, start):
    if array.dtype == types.uint16:
        def draw(array, stochastic, seed, stream, slot, start):
            groups = (array.size + 3) // 4
            fields = np.zeros(4 * groups, dtype=np.uint16)
            if stochastic:
                for q in range(groups):
                    bits = hash_index(seed, stream, uint64(start + 4 * q + slot))
                    fields[4 * q] = uint16(bits & uint64(0xFFFF))
                    fields[4 * q + 1] = uint16((bits >> uint64(16)) & uint64(0xFFFF))
                    fields[4 * q + 2] = uint16((bits >> uint64(32)) & uint64(0xFFFF))
                    fields[4 * q + 3] = uint16(bits >> uint64(48))
            return fields
        return draw
    return lambda array, stochastic, seed, stream, slot, start: np.empty(0, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# SGD (torch.optim.SGD, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _sgd_block(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay,
               nesterov, maximize, first_step, stochastic, seed, stream, start):
    """sgd_step on one block (views of length count; momentum_buffer empty when momentum == 0)."""
    use_momentum = momentum != 0
    use_decay = weight_decay != 0
    param_random = random_fields(param, stochastic, seed, stream, PARAM_SLOT, start)
    buffer_random = random_fields(momentum_buffer, stochastic, seed, stream, EXP_AVG_SLOT, start)
    for j in range(param.size):
        g = -grad[j] if maximize else grad[j]
        w = load(param, j)
        if use_decay:
            g = fma(weight_decay, w, g)                       # grad.add(param, alpha=weight_decay)
        if use_momentum:
            if first_step:
                b = g
            else:                                             # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                b = fma(one_minus_dampening, g, load(momentum_buffer, j) * momentum)
            store(momentum_buffer, j, b, stochastic, buffer_random)
            if nesterov:
                g = fma(momentum, b, g)                       # grad.add(buf, alpha=momentum)
            else:
                g = b
        store(param, j, fma(-lr, g, w), stochastic, param_random)  # param.add_(grad, alpha=-lr)


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_step(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay,
             nesterov, maximize, first_step, stochastic, seed, stream):
    """One SGD step in place on `param` (n,) and `momentum_buffer` (n,; empty when momentum == 0).

    g = -grad if maximize else grad
    g = g + weight_decay * w                                   (when weight_decay != 0)
    b = g on the first step, else momentum * b + (1 - dampening) * g   (when momentum != 0)
    g = g + momentum * b if nesterov else b                   (when momentum != 0)
    w = w - lr * g
    """
    n = param.size
    buffer_size = momentum_buffer.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _sgd_block(param[start:stop], grad[start:stop], momentum_buffer[start:min(stop, buffer_size)],
                   lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize, first_step,
                   stochastic, seed, stream, start)


# ---------------------------------------------------------------------------------------------
# Adam / AdamW (torch.optim.Adam / AdamW, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's moment updates, as torch writes them: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)."""
    return fma(one_minus_beta1, g - m, m), fma(one_minus_beta2 * g, g, v * beta2)


@njit(cache=True, error_model="numpy")
def _adam_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2,
                one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
                amsgrad, maximize, stochastic, seed, stream, start):
    """adam_step on one block (views of length count; max_exp_avg_sq empty unless amsgrad)."""
    use_decay = weight_decay != 0
    param_random = random_fields(param, stochastic, seed, stream, PARAM_SLOT, start)
    exp_avg_random = random_fields(exp_avg, stochastic, seed, stream, EXP_AVG_SLOT, start)
    exp_avg_sq_random = random_fields(exp_avg_sq, stochastic, seed, stream, EXP_AVG_SQ_SLOT, start)
    max_random = random_fields(max_exp_avg_sq, stochastic, seed, stream, MAX_EXP_AVG_SQ_SLOT, start)
    for j in range(param.size):
        g = -grad[j] if maximize else grad[j]
        w = load(param, j)
        if use_decay:
            g = fma(weight_decay, w, g)                       # grad.add(param, alpha=weight_decay)
        w = w * decay_factor
        m, v = adam_moments(g, load(exp_avg, j), load(exp_avg_sq, j), one_minus_beta1, beta2,
                            one_minus_beta2)
        store(exp_avg, j, m, stochastic, exp_avg_random)
        store(exp_avg_sq, j, v, stochastic, exp_avg_sq_random)
        if amsgrad:
            v = max(load(max_exp_avg_sq, j), v)
            store(max_exp_avg_sq, j, v, stochastic, max_random)
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        store(param, j, w + ((-step_size) * m) / denom, stochastic, param_random)  # addcdiv_


@njit(parallel=True, cache=True, error_model="numpy")
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
    with step_size = lr / (1 - beta1^t).  `max_exp_avg_sq` is (n,) with amsgrad, else empty.
    """
    n = param.size
    max_size = max_exp_avg_sq.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _adam_block(param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
                    max_exp_avg_sq[start:min(stop, max_size)], one_minus_beta1, beta2,
                    one_minus_beta2, eps, weight_decay, decay_factor, step_size,
                    bias_correction2_sqrt, amsgrad, maximize, stochastic, seed, stream, start)


# ---------------------------------------------------------------------------------------------
# LAMB (arXiv 1904.00962, Algorithm 2): moments and norms in pass 1, the scaled update in pass 2
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def lamb_direction(m, v, w, bias_correction1, bias_correction2, eps, weight_decay):
    """r + lambda w with r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)."""
    return (m / bias_correction1) / (np.sqrt(v / bias_correction2) + eps) + weight_decay * w


@njit(cache=True, error_model="numpy")
def pairwise_sum(values):
    """The sum of `values` (length a power of two) added pairwise: a[j] += a[j + half], halving.

    Each halving is a loop without a carried dependence, so it vectorizes without letting the
    compiler reassociate; the order of the additions is fixed by this code. Overwrites `values`.
    """
    width = values.size
    while width > 1:
        width //= 2
        for j in range(width):
            values[j] += values[j + width]
    return values[0]


@njit(cache=True, error_model="numpy")
def _lamb_moments_block(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2,
                        eps, weight_decay, bias_correction1, bias_correction2, maximize, stochastic,
                        seed, stream, start):
    """lamb_moments on one block (views of length count <= BLOCK): (sum w^2, sum u^2) of the block."""
    count = param.size
    exp_avg_random = random_fields(exp_avg, stochastic, seed, stream, EXP_AVG_SLOT, start)
    exp_avg_sq_random = random_fields(exp_avg_sq, stochastic, seed, stream, EXP_AVG_SQ_SLOT, start)
    weight_squares = np.empty(BLOCK, dtype=grad.dtype)
    update_squares = np.empty(BLOCK, dtype=grad.dtype)
    for j in range(count):
        g = -grad[j] if maximize else grad[j]
        m, v = adam_moments(g, load(exp_avg, j), load(exp_avg_sq, j), one_minus_beta1, beta2,
                            one_minus_beta2)
        m = store(exp_avg, j, m, stochastic, exp_avg_random)
        v = store(exp_avg_sq, j, v, stochastic, exp_avg_sq_random)
        w = load(param, j)
        u = lamb_direction(m, v, w, bias_correction1, bias_correction2, eps, weight_decay)
        weight_squares[j] = w * w
        update_squares[j] = u * u
    weight_squares[count:] = 0
    update_squares[count:] = 0
    return pairwise_sum(weight_squares), pairwise_sum(update_squares)


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_moments(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
                 weight_decay, bias_correction1, bias_correction2, maximize, stochastic, seed,
                 stream, partial_sums):
    """Pass 1: update exp_avg, exp_avg_sq in place; return (||w||^2, ||r + lambda w||^2) as float64.

    The direction is computed from the moments as stored (after any bf16 rounding), so that pass 2,
    which reads them back, moves along exactly the direction whose norm is returned here.
    `partial_sums` is a (2, block_count(n)) float64 scratch: each block's squares are summed
    pairwise in the compute dtype, and the block sums added in block order in float64, so the
    norms do not depend on the thread count.
    """
    n = param.size
    blocks = partial_sums.shape[1]
    for block in prange(blocks):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        weight_sq, update_sq = _lamb_moments_block(
            param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, bias_correction1,
            bias_correction2, maximize, stochastic, seed, stream, start)
        partial_sums[0, block] = weight_sq
        partial_sums[1, block] = update_sq
    total_weight_sq = 0.0
    total_update_sq = 0.0
    for block in range(blocks):
        total_weight_sq += partial_sums[0, block]
        total_update_sq += partial_sums[1, block]
    return total_weight_sq, total_update_sq


@njit(cache=True, error_model="numpy")
def _lamb_apply_block(param, exp_avg, exp_avg_sq, scaled_lr, eps, weight_decay, bias_correction1,
                      bias_correction2, stochastic, seed, stream, start):
    """lamb_apply on one block (views of length count)."""
    param_random = random_fields(param, stochastic, seed, stream, PARAM_SLOT, start)
    for j in range(param.size):
        w = load(param, j)
        u = lamb_direction(load(exp_avg, j), load(exp_avg_sq, j), w, bias_correction1,
                           bias_correction2, eps, weight_decay)
        store(param, j, w - scaled_lr * u, stochastic, param_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_apply(param, exp_avg, exp_avg_sq, scaled_lr, eps, weight_decay, bias_correction1,
               bias_correction2, stochastic, seed, stream):
    """Pass 2: w = w - scaled_lr * (r + lambda w), with scaled_lr = lr * trust ratio."""
    n = param.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lamb_apply_block(param[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop], scaled_lr,
                          eps, weight_decay, bias_correction1, bias_correction2, stochastic, seed,
                          stream, start)


# ---------------------------------------------------------------------------------------------
# Lookahead (arXiv 1907.08610, Algorithm 1): the slow-weight sync every k steps
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _lookahead_block(fast, slow, alpha, stochastic, seed, stream, start):
    """lookahead_sync on one block (views of length count)."""
    fast_random = random_fields(fast, stochastic, seed, stream, PARAM_SLOT, start)
    for j in range(slow.size):
        s = slow[j] + alpha * (load(fast, j) - slow[j])
        slow[j] = s
        store(fast, j, s, stochastic, fast_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lookahead_sync(fast, slow, alpha, stochastic, seed, stream):
    """slow = slow + alpha (fast - slow); fast = slow (rounded when `fast` holds bf16 bits)."""
    n = slow.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lookahead_block(fast[start:stop], slow[start:stop], alpha, stochastic, seed, stream, start)
