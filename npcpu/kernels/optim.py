"""Fused optimizer updates: one multi-threaded pass per tensor that reads each array once and writes it once.

Legend: n = number of elements of one parameter tensor (every array here is a flat (n,) view);
BLOCK = 1024 elements, the unit of work of one prange iteration (the last block may be shorter);
T = the number of Numba threads. Every kernel takes `random`, a scratch from random_scratch().
Arrays are float32 or float64, or bfloat16 passed as its uint16 bits; `load` widens bf16 bits to
float32 and `store` rounds back (stochastically or to nearest even) with the shared helper of
npcpu.kernels.convert. Arithmetic runs in the dtype of the scalar hyperparameters, which the Python
side casts to the gradient's dtype (float32, or float64 for float64 parameters), so a float32
optimizer computes in float32 exactly as torch does.

Why it is written this way: an update is a few flops per 16-40 bytes moved, so it runs at memory
speed only if the element loop is SIMD-vectorized, and with bf16 states (fewer bytes, more integer
work per element) only if that loop is also short. What that takes in Numba:
- `error_model="numpy"`: with Numba's default ("python") every division by an array element is
  preceded by a zero check that raises, and that branch alone keeps LLVM from vectorizing.
  IEEE results are the same (the denominators here are never 0, and nothing else is checked).
- prange over blocks; each block is a plain `for j in range(count)` over views sliced to the block,
  so the indices are provably non-negative and consecutive.
- no loads under a condition (the random bits are read, then selected), no calls that are not
  inlined; options that change the loop's structure (AMSGrad, SGD's momentum) are decided at
  compile time by passing None, flags such as `maximize` are loop invariant.
- no allocation per block: the random bits of a block go to the thread's row of a scratch made once
  per call, drawn in a short vectorized loop just before the block's element loop (small blocks,
  so that this compute overlaps the memory traffic around it).
- LAMB's norms are running sums in the element loop (see reassociable_add).

Stochastic rounding takes its random bits from npcpu.kernels.rng, one 64-bit hash per 4 elements of
each array that is rounded: the array in slot s (PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT,
MAX_EXP_AVG_SQ_SLOT; SGD's momentum buffer takes EXP_AVG_SLOT) rounds element i with the 16-bit
field i mod 4 (bits 16k .. 16k + 15 for field k, on little-endian CPUs) of
hash_index(seed, stream, 4 * (i // 4) + s). The stream encodes (step, parameter index), so the bits
depend on neither thread count nor call order. The update kernels take `first`, the index in the
whole tensor of their arrays' first element (a multiple of 4): updating a tensor a block of rows at a
time (npcpu.optim.Optimizer.fuse_into_backward) draws the same bits as updating it whole.
"""

import numba
import numpy as np
from numba import njit, prange, types, uint32, uint64
from numba.extending import intrinsic, overload

from npcpu.kernels.convert import bf16_bits_to_f32, round_bf16_stochastic_with_bits
from npcpu.kernels.rng import hash_index

BLOCK = 1024
"""Elements per prange iteration, a multiple of 4 (one hash per 4 elements). Small, so that drawing
a block's random bits (compute only) overlaps the memory traffic of the blocks around it: at 54M
parameters bf16-state Adam takes about 15% longer with 4096. LAMB's per-block sums are what makes
its norms the same for any thread count: they are added in block order."""
ELEMENTS_PER_HASH = 4
"""Elements rounded with the bits of one 64-bit hash: a range of a tensor updated on its own must
start at a multiple of it to draw the same bits as the whole tensor's update."""
PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT, MAX_EXP_AVG_SQ_SLOT = 0, 1, 2, 3
SLOTS = 4


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


def draw_random_fields(fields, array, stochastic, seed, stream, slot, start):
    """Fill fields[: array.size] with the 16-bit random fields of the block `array` (its elements
    are start .. start + array.size - 1 of the tensor) when it holds bf16 bits and `stochastic`.

    `fields` is the thread's (BLOCK,) uint16 scratch row for this slot. Nothing is drawn for float
    arrays nor when rounding to nearest (`store` then reads the row but does not use it).
    """
    raise NotImplementedError("draw_random_fields is only callable from Numba-compiled code")


def block_of(array, start, stop):
    """array[start:stop], or None for None (an optional state such as AMSGrad's maximum)."""
    raise NotImplementedError("block_of is only callable from Numba-compiled code")


@overload(load)
def _load_overload(array, j):
    if array.dtype == types.uint16:
        return lambda array, j: bf16_bits_to_f32(array[j])
    return lambda array, j: array[j]


@overload(store)
def _store_overload(array, j, value, stochastic, random16):
    if array.dtype == types.uint16:
        def store_bf16(array, j, value, stochastic, random16):
            # round_bf16_stochastic_with_bits adds its second argument to the 16 dropped bits and
            # truncates; with 0x7fff + (the last kept bit) that is round-to-nearest-even, bit for bit
            # round_bf16_nearest_bits (NaN and Inf included). One rounding for both modes keeps the
            # SIMD loop short: the select is on the addend, not between two roundings. (random16 is
            # read unconditionally: a load under a condition would keep LLVM from vectorizing.)
            random = uint32(random16[j])
            kept_lsb = (np.float32(value).view(np.uint32) >> uint32(16)) & uint32(1)
            addend = random if stochastic else uint32(0x7FFF) + kept_lsb
            bits = round_bf16_stochastic_with_bits(value, addend)
            array[j] = bits
            return bf16_bits_to_f32(bits)
        return store_bf16

    def store_float(array, j, value, stochastic, random16):
        array[j] = value
        return array[j]
    return store_float


@overload(draw_random_fields)
def _draw_random_fields_overload(fields, array, stochastic, seed, stream, slot, start):
    if isinstance(array, types.Array) and array.dtype == types.uint16:
        def draw(fields, array, stochastic, seed, stream, slot, start):
            if stochastic:
                hashes = fields.view(np.uint64)  # field k of hash q is element 4 q + k
                for q in range((array.size + 3) // 4):
                    hashes[q] = hash_index(seed, stream, uint64(start + 4 * q + slot))
        return draw
    return lambda fields, array, stochastic, seed, stream, slot, start: None


@overload(block_of)
def _block_of_overload(array, start, stop):
    if isinstance(array, types.NoneType):
        return lambda array, start, stop: None
    return lambda array, start, stop: array[start:stop]


def random_scratch():
    """A (T, SLOTS, BLOCK) uint16 scratch for the kernels' `random` argument: one row per thread
    and slot for draw_random_fields. Made in Python (numba.get_num_threads in a kernel would keep
    it from being cached); its contents never matter (rows are drawn before they are read, and
    round-to-nearest ignores them), so one scratch may serve any number of calls."""
    return np.empty((numba.get_num_threads(), SLOTS, BLOCK), dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# SGD (torch.optim.SGD, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _sgd_block(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay,
               nesterov, maximize, first_step, stochastic, seed, stream, random, start):
    """sgd_step on one block: views of elements start .. start + count - 1, `random` the thread's
    (SLOTS, BLOCK) scratch; momentum_buffer is None without momentum (decided at compile time)."""
    use_decay = weight_decay != 0
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    exp_avg_random = random[EXP_AVG_SLOT]
    draw_random_fields(param_random, param, stochastic, seed, stream, PARAM_SLOT, start)
    draw_random_fields(exp_avg_random, momentum_buffer, stochastic, seed, stream,
                       EXP_AVG_SLOT, start)
    for j in range(param.size):
        g = -grad[j] if maximize else grad[j]
        w = load(param, j)
        if use_decay:
            g = fma(weight_decay, w, g)                       # grad.add(param, alpha=weight_decay)
        if momentum_buffer is not None:
            if first_step:
                b = g
            else:                                             # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                b = fma(one_minus_dampening, g, load(momentum_buffer, j) * momentum)
            store(momentum_buffer, j, b, stochastic, exp_avg_random)
            if nesterov:
                g = fma(momentum, b, g)                       # grad.add(buf, alpha=momentum)
            else:
                g = b
        store(param, j, fma(-lr, g, w), stochastic, param_random)  # param.add_(grad, alpha=-lr)


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_step(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay,
             nesterov, maximize, first_step, stochastic, seed, stream, first, random):
    """One SGD step in place on `param` (n,) and `momentum_buffer` ((n,), or None without momentum).

    g = -grad if maximize else grad
    g = g + weight_decay * w                                   (when weight_decay != 0)
    b = g on the first step, else momentum * b + (1 - dampening) * g   (with a momentum buffer)
    g = g + momentum * b if nesterov else b                   (with a momentum buffer)
    w = w - lr * g
    """
    n = param.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _sgd_block(param[start:stop], grad[start:stop], block_of(momentum_buffer, start, stop), lr,
                   momentum, one_minus_dampening, weight_decay, nesterov, maximize, first_step,
                   stochastic, seed, stream, random[numba.get_thread_id()], first + start)


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
                maximize, stochastic, seed, stream, random, start):
    """adam_step on one block (views, as in _sgd_block); max_exp_avg_sq is None without AMSGrad,
    so that loop carries no trace of it."""
    use_decay = weight_decay != 0
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    exp_avg_random = random[EXP_AVG_SLOT]
    exp_avg_sq_random = random[EXP_AVG_SQ_SLOT]
    max_random = random[MAX_EXP_AVG_SQ_SLOT]
    draw_random_fields(param_random, param, stochastic, seed, stream, PARAM_SLOT, start)
    draw_random_fields(exp_avg_random, exp_avg, stochastic, seed, stream, EXP_AVG_SLOT, start)
    draw_random_fields(exp_avg_sq_random, exp_avg_sq, stochastic, seed, stream,
                       EXP_AVG_SQ_SLOT, start)
    draw_random_fields(max_random, max_exp_avg_sq, stochastic, seed, stream,
                       MAX_EXP_AVG_SQ_SLOT, start)
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
        if max_exp_avg_sq is not None:
            v = max(load(max_exp_avg_sq, j), v)
            store(max_exp_avg_sq, j, v, stochastic, max_random)
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        store(param, j, w + ((-step_size) * m) / denom, stochastic, param_random)  # addcdiv_


@njit(parallel=True, cache=True, error_model="numpy")
def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2,
              one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
              maximize, stochastic, seed, stream, first, random):
    """One Adam (AdamW when `decay_factor` != 1) step in place on param, exp_avg, exp_avg_sq (n,).

    g = -grad if maximize else grad
    g = g + weight_decay * w              (Adam's coupled L2; pass weight_decay = 0 for AdamW)
    w = decay_factor * w                  (AdamW's decoupled decay: decay_factor = 1 - lr * wd)
    m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
    v_max = max(v_max, v)                 (AMSGrad: the max of the raw second moment)
    w = w - step_size * m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)
    with step_size = lr / (1 - beta1^t).  `max_exp_avg_sq` is (n,) for AMSGrad, else None.
    """
    n = param.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _adam_block(param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
                    block_of(max_exp_avg_sq, start, stop), one_minus_beta1, beta2, one_minus_beta2,
                    eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt, maximize,
                    stochastic, seed, stream, random[numba.get_thread_id()], first + start)


# ---------------------------------------------------------------------------------------------
# LAMB (arXiv 1904.00962, Algorithm 2): moments and norms in pass 1, the scaled update in pass 2
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def lamb_direction(m, v, w, inverse_bias_correction1, inverse_bias_correction2, eps, weight_decay):
    """r + lambda w with r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).

    The bias corrections come as their reciprocals 1 / (1 - beta^t) (computed once per step in
    float64): a multiplication instead of a division, within an ulp of it, and one division per
    element instead of three in a loop that both LAMB passes run.
    """
    return (m * inverse_bias_correction1) / (np.sqrt(v * inverse_bias_correction2) + eps) + weight_decay * w


@njit(cache=True, fastmath={"reassoc"})
def reassociable_add(total, term):
    """total + term, the one addition LLVM may reassociate: a running sum in a loop becomes SIMD
    partial sums (a strict left-to-right sum cannot vectorize). The order of the additions is then
    the compiler's: fixed for a given build and CPU, the same for any thread count."""
    return total + term


@njit(cache=True, error_model="numpy")
def _lamb_moments_block(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2,
                        eps, weight_decay, inverse_bias_correction1, inverse_bias_correction2,
                        maximize, stochastic, seed, stream, random, start):
    """lamb_moments on one block (views, as in _sgd_block): (sum w^2, sum u^2) of the block, summed
    in the compute dtype (float32: SIMD-wide partial sums of at most BLOCK / 16 terms each)."""
    exp_avg_random = random[EXP_AVG_SLOT]  # this thread's row (a view made once, not per element)
    exp_avg_sq_random = random[EXP_AVG_SQ_SLOT]
    draw_random_fields(exp_avg_random, exp_avg, stochastic, seed, stream, EXP_AVG_SLOT, start)
    draw_random_fields(exp_avg_sq_random, exp_avg_sq, stochastic, seed, stream,
                       EXP_AVG_SQ_SLOT, start)
    weight_sq = eps - eps  # 0 in the compute dtype (eps is finite)
    update_sq = eps - eps
    for j in range(param.size):
        g = -grad[j] if maximize else grad[j]
        m, v = adam_moments(g, load(exp_avg, j), load(exp_avg_sq, j), one_minus_beta1, beta2,
                            one_minus_beta2)
        m = store(exp_avg, j, m, stochastic, exp_avg_random)
        v = store(exp_avg_sq, j, v, stochastic, exp_avg_sq_random)
        w = load(param, j)
        u = lamb_direction(m, v, w, inverse_bias_correction1, inverse_bias_correction2, eps,
                           weight_decay)
        weight_sq = reassociable_add(weight_sq, w * w)
        update_sq = reassociable_add(update_sq, u * u)
    return weight_sq, update_sq


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_moments(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
                 weight_decay, inverse_bias_correction1, inverse_bias_correction2, maximize,
                 stochastic, seed, stream, first, random, partial_sums):
    """Pass 1: update exp_avg, exp_avg_sq in place; return (||w||^2, ||r + lambda w||^2) as float64.

    The direction is computed from the moments as stored (after any bf16 rounding), so that pass 2,
    which reads them back, moves along exactly the direction whose norm is returned here.
    `partial_sums` is a (2, block_count(n)) float64 scratch: one sum per block, added in block order
    in float64 afterwards, so the norms do not depend on the thread count.
    """
    n = param.size
    blocks = partial_sums.shape[1]
    for block in prange(blocks):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        weight_sq, update_sq = _lamb_moments_block(
            param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, inverse_bias_correction1,
            inverse_bias_correction2, maximize, stochastic, seed, stream,
            random[numba.get_thread_id()], first + start)
        partial_sums[0, block] = weight_sq
        partial_sums[1, block] = update_sq
    total_weight_sq = 0.0
    total_update_sq = 0.0
    for block in range(blocks):
        total_weight_sq += partial_sums[0, block]
        total_update_sq += partial_sums[1, block]
    return total_weight_sq, total_update_sq


@njit(cache=True, error_model="numpy")
def _lamb_apply_block(param, exp_avg, exp_avg_sq, scaled_lr, eps, weight_decay,
                      inverse_bias_correction1, inverse_bias_correction2, stochastic, seed, stream,
                      random, start):
    """lamb_apply on one block (views, as in _sgd_block)."""
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    draw_random_fields(param_random, param, stochastic, seed, stream, PARAM_SLOT, start)
    for j in range(param.size):
        w = load(param, j)
        u = lamb_direction(load(exp_avg, j), load(exp_avg_sq, j), w, inverse_bias_correction1,
                           inverse_bias_correction2, eps, weight_decay)
        store(param, j, w - scaled_lr * u, stochastic, param_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_apply(param, exp_avg, exp_avg_sq, scaled_lr, eps, weight_decay, inverse_bias_correction1,
               inverse_bias_correction2, stochastic, seed, stream, first, random):
    """Pass 2: w = w - scaled_lr * (r + lambda w), with scaled_lr = lr * trust ratio."""
    n = param.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lamb_apply_block(param[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop], scaled_lr,
                          eps, weight_decay, inverse_bias_correction1, inverse_bias_correction2,
                          stochastic, seed, stream, random[numba.get_thread_id()], first + start)


# ---------------------------------------------------------------------------------------------
# Lookahead (arXiv 1907.08610, Algorithm 1): the slow-weight sync every k steps
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _lookahead_block(fast, slow, alpha, stochastic, seed, stream, random, start):
    """lookahead_sync on one block (views, as in _sgd_block)."""
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    draw_random_fields(param_random, fast, stochastic, seed, stream, PARAM_SLOT, start)
    for j in range(slow.size):
        s = slow[j] + alpha * (load(fast, j) - slow[j])
        slow[j] = s
        store(fast, j, s, stochastic, param_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lookahead_sync(fast, slow, alpha, stochastic, seed, stream, random):
    """slow = slow + alpha (fast - slow); fast = slow (rounded when `fast` holds bf16 bits)."""
    n = slow.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lookahead_block(fast[start:stop], slow[start:stop], alpha, stochastic, seed, stream,
                         random[numba.get_thread_id()], start)
