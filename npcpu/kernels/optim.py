"""Fused optimizer updates: one multi-threaded pass per tensor that reads each array once and writes it once.

Legend and storage as in npcpu.kernels.optim_io (n elements, BLOCK-element blocks, T threads,
float arrays or bf16 bits). Every update kernel takes its arrays, a named tuple of hyperparameters
(SGDHyper, AdamHyper, LambHyper) and a `Rounding`, so that no two same-typed arguments can be
swapped by position. Arithmetic runs in the dtype of the hyperparameters, which the Python side
casts to the gradient's dtype (float32, or float64 for float64 parameters), so a float32
optimizer computes in float32 exactly as torch does.

Why it is written this way: an update is a few flops per 16-40 bytes moved, so it runs at memory
speed only if the element loop is SIMD-vectorized, and with bf16 states (fewer bytes, more integer
work per element) only if that loop is also short. What that takes in Numba:
- `error_model="numpy"`: with Numba's default ("python") every division by an array element is
  preceded by a zero check that raises, and that branch alone keeps LLVM from vectorizing.
  IEEE results are the same (the denominators here are never 0, and nothing else is checked).
- prange over blocks; each block is a plain `for j in range(count)` over views sliced to the block,
  so the indices are provably non-negative and consecutive. Tensors under PARALLEL_ELEMENTS go to
  the `*_serial` twins, which run the same blocks in a plain loop on the calling thread
  (npcpu.kernels.launch).
- no loads under a condition (the random bits are read, then selected), no calls that are not
  inlined; options that change the loop's structure (AMSGrad, SGD's momentum) are decided at
  compile time by passing None, flags such as `maximize` are loop invariant.
- no allocation per block: the random bits of a block go to the thread's row of a scratch made once
  per call, drawn in a short vectorized loop just before the block's element loop (small blocks,
  so that this compute overlaps the memory traffic around it).
- LAMB's norms are running sums in the element loop (see reassociable_add).

The per-element rules (`sgd_*`, `adam_moments`, `lamb_direction`) are plain scalar functions, so
that the compiled training step (npcpu.kernels.compiled_step) applies the very same arithmetic.

Plain tuples: `sgd_step` and `adam_step` (and their serial twins) also take their settings and
Rounding as plain tuples of the same fields, in the same order, and rebuild the named tuples
inside. Numba types a named-tuple argument by Python code on every call (about half a microsecond
each), a plain tuple in its C dispatcher: for a small model that is a good part of an update. The
optimizers build the named tuples by keyword, then pass them on as plain tuples.
"""

from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from npcpu.kernels.launch import PARALLEL_ELEMENTS, for_size  # noqa: F401 (the optimizers' choice)
from npcpu.kernels.optim_io import (BLOCK, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT, MAX_EXP_AVG_SQ_SLOT,
                                    PARAM_SLOT, Rounding, block_count, block_of,
                                    draw_random_fields, fma, load, store)

SGDHyper = namedtuple("SGDHyper", ["lr", "momentum", "one_minus_dampening", "weight_decay",
                                   "nesterov", "maximize", "first_step"])
"""torch.optim.SGD's settings for one step: floats in the compute dtype, then three bools
(`first_step`: the momentum buffer is set to the gradient instead of updated)."""
AdamHyper = namedtuple("AdamHyper", ["one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                                     "weight_decay", "decay_factor", "step_size",
                                     "bias_correction2_sqrt", "maximize"])
"""Adam/AdamW's settings for one step (see adam_step): floats in the compute dtype, then a bool."""
LambHyper = namedtuple("LambHyper", ["one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                                     "weight_decay", "inverse_bias_correction1",
                                     "inverse_bias_correction2", "maximize"])
"""LAMB's settings for one step (see lamb_moments): floats in the compute dtype, then a bool."""


# ---------------------------------------------------------------------------------------------
# SGD (torch.optim.SGD, single-tensor algorithm), its per-element rule shared with compiled_step
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def sgd_gradient(grad, w, hyper):
    """g = -grad if maximize else grad, plus weight_decay * w: torch's grad.add(param, alpha=wd)."""
    g = -grad if hyper.maximize else grad
    return fma(hyper.weight_decay, w, g) if hyper.weight_decay != 0 else g


@njit(cache=True, error_model="numpy")
def sgd_momentum(g, buffer, hyper):
    """The new momentum buffer: g on the first step, else buf.mul_(momentum).add_(g, alpha=1 - dampening)."""
    return g if hyper.first_step else fma(hyper.one_minus_dampening, g, buffer * hyper.momentum)


@njit(cache=True, error_model="numpy")
def sgd_direction(g, buffer, hyper):
    """What the step follows with momentum: g + momentum * buf (nesterov) or buf."""
    return fma(hyper.momentum, buffer, g) if hyper.nesterov else buffer


@njit(cache=True, error_model="numpy")
def sgd_apply(w, direction, hyper):
    """w - lr * direction, as torch's param.add_(direction, alpha=-lr) (one rounding)."""
    return fma(-hyper.lr, direction, w)


@njit(cache=True, error_model="numpy")
def _sgd_block(param, grad, momentum_buffer, hyper, rounding, random, start):
    """sgd_step on one block: views of elements start .. start + count - 1, `random` the thread's
    (SLOTS, BLOCK) scratch; momentum_buffer is None without momentum (decided at compile time)."""
    stochastic, seed, stream = rounding.stochastic, rounding.seed, rounding.stream
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    exp_avg_random = random[EXP_AVG_SLOT]
    draw_random_fields(param_random, param, stochastic, seed, stream, PARAM_SLOT, start)
    draw_random_fields(exp_avg_random, momentum_buffer, stochastic, seed, stream,
                       EXP_AVG_SLOT, start)
    for j in range(param.size):
        w = load(param, j)
        g = sgd_gradient(grad[j], w, hyper)
        if momentum_buffer is not None:
            b = sgd_momentum(g, load(momentum_buffer, j), hyper)
            store(momentum_buffer, j, b, stochastic, exp_avg_random)
            g = sgd_direction(g, b, hyper)
        store(param, j, sgd_apply(w, g, hyper), stochastic, param_random)


@njit(cache=True, error_model="numpy")
def _sgd_block_of(param, grad, momentum_buffer, hyper, rounding, block, thread):
    """_sgd_block on block number `block` of the whole arrays, with thread `thread`'s scratch."""
    start, stop = block * BLOCK, min(param.size, (block + 1) * BLOCK)
    _sgd_block(param[start:stop], grad[start:stop], block_of(momentum_buffer, start, stop), hyper,
               rounding, rounding.random[thread], rounding.first + start)


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_step(param, grad, momentum_buffer, hyper, rounding):
    """One SGD step in place on `param` (n,) and `momentum_buffer` ((n,), or None without momentum),
    with `hyper` an SGDHyper and `rounding` a Rounding.

    g = -grad if maximize else grad
    g = g + weight_decay * w                                   (when weight_decay != 0)
    b = g on the first step, else momentum * b + (1 - dampening) * g   (with a momentum buffer)
    g = g + momentum * b if nesterov else b                   (with a momentum buffer)
    w = w - lr * g
    """
    hyper, rounding = SGDHyper(*hyper), Rounding(*rounding)  # see "Plain tuples" above
    for block in prange(block_count(param.size)):
        _sgd_block_of(param, grad, momentum_buffer, hyper, rounding, block, numba.get_thread_id())


@njit(cache=True, error_model="numpy")
def sgd_step_serial(param, grad, momentum_buffer, hyper, rounding):
    """sgd_step on the calling thread alone (the same blocks, so the same bits): for tensors under
    PARALLEL_ELEMENTS, where waking the other threads costs more than they save. It takes the
    scratch's row 0 (numba.get_thread_id outside a parallel kernel may run before Numba's threads
    exist: a crash when this kernel is loaded from the cache)."""
    hyper, rounding = SGDHyper(*hyper), Rounding(*rounding)
    for block in range(block_count(param.size)):
        _sgd_block_of(param, grad, momentum_buffer, hyper, rounding, block, 0)


# ---------------------------------------------------------------------------------------------
# Adam / AdamW (torch.optim.Adam / AdamW, single-tensor algorithm)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's moment updates, as torch writes them: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)."""
    return fma(one_minus_beta1, g - m, m), fma(one_minus_beta2 * g, g, v * beta2)


@njit(cache=True, error_model="numpy")
def adam_gradient(grad, w, hyper, use_decay):
    """g = -grad if maximize else grad, plus Adam's coupled weight_decay * w when `use_decay`
    (torch's grad.add(param, alpha=weight_decay)). A per-element rule, as `adam_moments` and
    `adam_apply`: the compiled training step applies them too (npcpu.kernels.compiled_update)."""
    g = -grad if hyper.maximize else grad
    return fma(hyper.weight_decay, w, g) if use_decay else g


@njit(cache=True, error_model="numpy")
def adam_apply(w, m, v, hyper):
    """The new weight: decay_factor * w (AdamW's decoupled decay; 1 for Adam), then torch's
    addcdiv_ w - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)."""
    denom = np.sqrt(v) / hyper.bias_correction2_sqrt + hyper.eps
    return w * hyper.decay_factor + ((-hyper.step_size) * m) / denom


@njit(cache=True, error_model="numpy")
def _adam_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding, random, start):
    """adam_step on one block (views, as in _sgd_block); max_exp_avg_sq is None without AMSGrad,
    so that loop carries no trace of it."""
    stochastic, seed, stream = rounding.stochastic, rounding.seed, rounding.stream
    use_decay = hyper.weight_decay != 0
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
        w = load(param, j)
        g = adam_gradient(grad[j], w, hyper, use_decay)
        m, v = adam_moments(g, load(exp_avg, j), load(exp_avg_sq, j), hyper.one_minus_beta1,
                            hyper.beta2, hyper.one_minus_beta2)
        store(exp_avg, j, m, stochastic, exp_avg_random)
        store(exp_avg_sq, j, v, stochastic, exp_avg_sq_random)
        if max_exp_avg_sq is not None:
            v = max(load(max_exp_avg_sq, j), v)
            store(max_exp_avg_sq, j, v, stochastic, max_random)
        store(param, j, adam_apply(w, m, v, hyper), stochastic, param_random)


@njit(cache=True, error_model="numpy")
def _adam_block_of(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding, block,
                   thread):
    """_adam_block on block number `block` of the whole arrays, with thread `thread`'s scratch."""
    start, stop = block * BLOCK, min(param.size, (block + 1) * BLOCK)
    _adam_block(param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
                block_of(max_exp_avg_sq, start, stop), hyper, rounding, rounding.random[thread],
                rounding.first + start)


@njit(parallel=True, cache=True, error_model="numpy")
def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding):
    """One Adam (AdamW when `decay_factor` != 1) step in place on param, exp_avg, exp_avg_sq (n,),
    with `hyper` an AdamHyper and `rounding` a Rounding.

    g = -grad if maximize else grad
    g = g + weight_decay * w              (Adam's coupled L2; pass weight_decay = 0 for AdamW)
    w = decay_factor * w                  (AdamW's decoupled decay: decay_factor = 1 - lr * wd)
    m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
    v_max = max(v_max, v)                 (AMSGrad: the max of the raw second moment)
    w = w - step_size * m / (sqrt(v or v_max) / bias_correction2_sqrt + eps)
    with step_size = lr / (1 - beta1^t) and bias_correction2_sqrt = sqrt(1 - beta2^t).
    `max_exp_avg_sq` is (n,) for AMSGrad, else None.
    """
    hyper, rounding = AdamHyper(*hyper), Rounding(*rounding)  # see "Plain tuples" above
    for block in prange(block_count(param.size)):
        _adam_block_of(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding, block,
                       numba.get_thread_id())


@njit(cache=True, error_model="numpy")
def adam_step_serial(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding):
    """adam_step on the calling thread alone, with the scratch's row 0 (see sgd_step_serial)."""
    hyper, rounding = AdamHyper(*hyper), Rounding(*rounding)
    for block in range(block_count(param.size)):
        _adam_block_of(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, rounding, block, 0)


# ---------------------------------------------------------------------------------------------
# LAMB (arXiv 1904.00962, Algorithm 2): moments and norms in pass 1, the scaled update in pass 2
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def lamb_direction(m, v, w, hyper):
    """r + lambda w with r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).

    The bias corrections come as their reciprocals 1 / (1 - beta^t) (computed once per step in
    float64): a multiplication instead of a division, within an ulp of it, and one division per
    element instead of three in a loop that both LAMB passes run.
    """
    return ((m * hyper.inverse_bias_correction1)
            / (np.sqrt(v * hyper.inverse_bias_correction2) + hyper.eps) + hyper.weight_decay * w)


@njit(cache=True, fastmath={"reassoc"})
def reassociable_add(total, term):
    """total + term, the one addition LLVM may reassociate: a running sum in a loop becomes SIMD
    partial sums (a strict left-to-right sum cannot vectorize). The order of the additions is then
    the compiler's: fixed for a given build and CPU, the same for any thread count."""
    return total + term


@njit(cache=True, error_model="numpy")
def _lamb_moments_block(param, grad, exp_avg, exp_avg_sq, hyper, rounding, random, start):
    """lamb_moments on one block (views, as in _sgd_block): (sum w^2, sum u^2) of the block, summed
    in the compute dtype (float32: SIMD-wide partial sums of at most BLOCK / 16 terms each)."""
    stochastic, seed, stream = rounding.stochastic, rounding.seed, rounding.stream
    exp_avg_random = random[EXP_AVG_SLOT]  # this thread's row (a view made once, not per element)
    exp_avg_sq_random = random[EXP_AVG_SQ_SLOT]
    draw_random_fields(exp_avg_random, exp_avg, stochastic, seed, stream, EXP_AVG_SLOT, start)
    draw_random_fields(exp_avg_sq_random, exp_avg_sq, stochastic, seed, stream,
                       EXP_AVG_SQ_SLOT, start)
    weight_sq = hyper.eps - hyper.eps  # 0 in the compute dtype (eps is finite)
    update_sq = hyper.eps - hyper.eps
    for j in range(param.size):
        g = -grad[j] if hyper.maximize else grad[j]
        m, v = adam_moments(g, load(exp_avg, j), load(exp_avg_sq, j), hyper.one_minus_beta1,
                            hyper.beta2, hyper.one_minus_beta2)
        m = store(exp_avg, j, m, stochastic, exp_avg_random)
        v = store(exp_avg_sq, j, v, stochastic, exp_avg_sq_random)
        w = load(param, j)
        u = lamb_direction(m, v, w, hyper)
        weight_sq = reassociable_add(weight_sq, w * w)
        update_sq = reassociable_add(update_sq, u * u)
    return weight_sq, update_sq


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_moments(param, grad, exp_avg, exp_avg_sq, hyper, rounding, partial_sums):
    """Pass 1: update exp_avg, exp_avg_sq in place; return (||w||^2, ||r + lambda w||^2) as float64.
    `hyper` is a LambHyper, `rounding` a Rounding.

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
            param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop], hyper,
            rounding, rounding.random[numba.get_thread_id()], rounding.first + start)
        partial_sums[0, block] = weight_sq
        partial_sums[1, block] = update_sq
    total_weight_sq = 0.0
    total_update_sq = 0.0
    for block in range(blocks):
        total_weight_sq += partial_sums[0, block]
        total_update_sq += partial_sums[1, block]
    return total_weight_sq, total_update_sq


@njit(cache=True, error_model="numpy")
def _lamb_apply_block(param, exp_avg, exp_avg_sq, scaled_lr, hyper, rounding, random, start):
    """lamb_apply on one block (views, as in _sgd_block)."""
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    draw_random_fields(param_random, param, rounding.stochastic, rounding.seed, rounding.stream,
                       PARAM_SLOT, start)
    for j in range(param.size):
        w = load(param, j)
        u = lamb_direction(load(exp_avg, j), load(exp_avg_sq, j), w, hyper)
        store(param, j, w - scaled_lr * u, rounding.stochastic, param_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lamb_apply(param, exp_avg, exp_avg_sq, scaled_lr, hyper, rounding):
    """Pass 2: w = w - scaled_lr * (r + lambda w), with scaled_lr = lr * trust ratio (the
    LambHyper and Rounding of pass 1)."""
    n = param.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lamb_apply_block(param[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop], scaled_lr,
                          hyper, rounding, rounding.random[numba.get_thread_id()],
                          rounding.first + start)


# ---------------------------------------------------------------------------------------------
# Lookahead (arXiv 1907.08610, Algorithm 1): the slow-weight sync every k steps
# ---------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _lookahead_block(fast, slow, alpha, rounding, random, start):
    """lookahead_sync on one block (views, as in _sgd_block)."""
    param_random = random[PARAM_SLOT]  # this thread's row (a view made once, not per element)
    draw_random_fields(param_random, fast, rounding.stochastic, rounding.seed, rounding.stream,
                       PARAM_SLOT, start)
    for j in range(slow.size):
        s = slow[j] + alpha * (load(fast, j) - slow[j])
        slow[j] = s
        store(fast, j, s, rounding.stochastic, param_random)


@njit(parallel=True, cache=True, error_model="numpy")
def lookahead_sync(fast, slow, alpha, rounding):
    """slow = slow + alpha (fast - slow); fast = slow (rounded when `fast` holds bf16 bits)."""
    n = slow.size
    for block in prange(block_count(n)):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        _lookahead_block(fast[start:stop], slow[start:stop], alpha, rounding,
                         rounding.random[numba.get_thread_id()], rounding.first + start)
