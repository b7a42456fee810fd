"""The optimizer updates of the compiled training step (npcpu.kernels.compiled_step): SGD, Adam and
AdamW on one parameter (or a run of its elements), element by element with the reference
optimizers' own scalar rules (npcpu.kernels.optim), so that the two paths cannot drift apart.

Legend: P parameters (the weight of layer l is p = 2 l, its bias p = 2 l + 1). A ThreadModel
(npcpu.kernels.compiled_step) holds each parameter's optimizer state and settings:
    adam              bool: Adam / AdamW (else SGD)
    first_moments[p]  flat: SGD's momentum buffer ((0,) without momentum), or Adam's exp_avg
    second_moments[p] flat: Adam's exp_avg_sq ((0,) for SGD)
    hyper[p]          float64: SGD (lr unused, momentum, dampening, weight_decay);
                      Adam (beta1, beta2, eps, weight_decay)
    flags[p]          bool: SGD (nesterov, maximize); Adam (decoupled weight decay: AdamW, maximize)
    storage[p]        int64: how the parameter is stored (KEEP: float32/float64, updated as it is;
                      NEAREST / STOCHASTIC: bfloat16, the update rounded to nearest even or
                      stochastically, as npcpu.optim.Optimizer stores into a bf16 parameter)
    masters[p]        flat float32: the optimizer's fp32 master copy ("master_param"), updated
                      in its place and rounded to nearest into the parameter; (0,) without one
    tensor_index[p]   int64: the parameter's index in the optimizer (its state-dict position)
    seed              uint64: the optimizer's stochastic-rounding seed
Under bf16 the kernels' parameter arrays are float32 copies holding the bf16 values (widened);
an update computes in float32 as the reference does and stores back the bf16 value it rounds
to: the reference's stochastic bits are keyed by (seed, step, tensor index, element) alone
(npcpu.kernels.optim_io), so the compiled step draws the very same ones.
A step's per-parameter values come with the call: lr, and for Adam `corrections` = (1 - beta1^t,
sqrt(1 - beta2^t)) at the step t being taken, computed in Python by the formulas of
npcpu.optim.Adam (so the step sizes are the same float64 numbers before their rounding to the
compute dtype).
"""

from numba import njit, uint32, uint64

from npcpu.kernels.convert import (bf16_bits_to_f32, round_bf16_nearest_bits,
                                   round_bf16_stochastic_with_bits)
from npcpu.kernels.optim import (AdamHyper, SGDHyper, adam_apply, adam_gradient, adam_moments,
                                 sgd_apply, sgd_direction, sgd_gradient, sgd_momentum)
from npcpu.kernels.optim_io import ELEMENTS_PER_HASH, PARAM_SLOT
from npcpu.kernels.rng import hash_index

KEEP, NEAREST, STOCHASTIC = 0, 1, 2  # ThreadModel.storage: how a parameter stores its update


@njit(cache=True)
def sgd_update(param, grad, momentum_buffer, hyper):
    """One torch.optim.SGD step on flat param (n,) from grad (n,); momentum_buffer (n,), or (0,)
    without momentum; `hyper` an SGDHyper. Element by element the rules of npcpu.kernels.optim's
    sgd_step (float arrays, no rounding to do)."""
    for j in range(param.size):
        w = param[j]
        g = sgd_gradient(grad[j], w, hyper)
        if momentum_buffer.size:
            b = sgd_momentum(g, momentum_buffer[j], hyper)
            momentum_buffer[j] = b
            g = sgd_direction(g, b, hyper)
        param[j] = sgd_apply(w, g, hyper)


@njit(cache=True)
def adam_update(param, grad, exp_avg, exp_avg_sq, hyper):
    """One torch.optim.Adam / AdamW step (no AMSGrad) on flat param, exp_avg, exp_avg_sq (n,)
    from grad (n,); `hyper` an AdamHyper. Element by element the rules of npcpu.kernels.optim's
    adam_step."""
    use_decay = hyper.weight_decay != 0
    for j in range(param.size):
        w = param[j]
        g = adam_gradient(grad[j], w, hyper, use_decay)
        m, v = adam_moments(g, exp_avg[j], exp_avg_sq[j], hyper.one_minus_beta1, hyper.beta2,
                            hyper.one_minus_beta2)
        exp_avg[j], exp_avg_sq[j] = m, v
        param[j] = adam_apply(w, m, v, hyper)


@njit(cache=True)
def sgd_settings(model, p, lr, first_step, real):
    """Parameter p's SGDHyper for this step, in the compute dtype `real`, as npcpu.optim.SGD
    builds it."""
    hyper, flags = model.hyper[p], model.flags[p]
    return SGDHyper(real(lr), real(hyper[1]), real(1.0 - hyper[2]), real(hyper[3]), flags[0],
                    flags[1], first_step)


@njit(cache=True)
def adam_settings(model, p, lr, corrections, real):
    """Parameter p's AdamHyper for this step, in the compute dtype `real`, as npcpu.optim.Adam
    builds it: coupled decay for Adam, the decay factor 1 - lr wd for AdamW."""
    (beta1, beta2, eps, weight_decay), (decoupled, maximize) = model.hyper[p], model.flags[p]
    coupled_decay = 0.0 if decoupled else weight_decay
    decay_factor = 1.0 - lr * weight_decay if decoupled else 1.0
    return AdamHyper(real(1.0 - beta1), real(beta2), real(1.0 - beta2), real(eps),
                     real(coupled_decay), real(decay_factor), real(lr / corrections[0]),
                     real(corrections[1]), maximize)


@njit(cache=True)
def stored_bf16(value, storage, seed, stream, element):
    """`value` as a bfloat16 parameter stores it, widened back to float32: rounded to nearest
    even (NEAREST), or stochastically (STOCHASTIC) with the 16 random bits the reference
    optimizer's kernels draw for element `element` of the tensor in `stream` (field element mod 4
    of hash_index(seed, stream, 4 (element // 4) + PARAM_SLOT), npcpu.kernels.optim_io)."""
    if storage == NEAREST:
        return bf16_bits_to_f32(round_bf16_nearest_bits(value))
    first = uint64(element - element % ELEMENTS_PER_HASH)
    random = hash_index(seed, stream, first + uint64(PARAM_SLOT))
    field = uint32((random >> uint64(16 * (element % ELEMENTS_PER_HASH))) & uint64(0xFFFF))
    return bf16_bits_to_f32(round_bf16_stochastic_with_bits(value, field))


@njit(cache=True)
def store_rows_bf16(values, param, first_col, stop_col, storage, seed, stream):
    """param[r, k] = stored_bf16(values[r, k]) for columns first_col <= k < stop_col of every row
    (values and param (R, N) float32, the same array when the parameter is updated in place);
    element r N + k of the tensor draws its own random bits."""
    n_cols = param.shape[1]
    for r in range(param.shape[0]):
        for k in range(first_col, stop_col):
            param[r, k] = stored_bf16(values[r, k], storage, seed, stream, r * n_cols + k)


@njit(cache=True)
def update_parameter(model, p, param, grad, first_col, stop_col, lr, corrections, step):
    """One optimizer step on columns first_col <= k < stop_col of every row of parameter p:
    param and grad (R, N) (a weight, or a bias as one row (1, n)); the state arrays, flat, are
    viewed in that shape. lr and corrections (2,) are this step's (see the module docstring);
    `step` the optimizer's count of p's steps with this one (1: SGD creates its momentum buffer).

    The settings are built once per call, and each row's run of columns is a plain element loop
    (sgd_update / adam_update): W_0 is updated in one call per thread and step, over the
    thread's columns of all its rows. A bf16 parameter (model.storage[p]) is updated in its
    master copy, or in param itself, and then stored back rounded (store_rows_bf16)."""
    storage, master = model.storage[p], model.masters[p]
    weights = master.reshape(param.shape) if master.size else param
    _update_rows(model, p, weights, grad, first_col, stop_col, lr, corrections, step == 1)
    if storage != KEEP:
        stream = (uint64(step) << uint64(32)) | uint64(model.tensor_index[p])
        store_rows_bf16(weights, param, first_col, stop_col, storage, model.seed, stream)


@njit(cache=True)
def _update_rows(model, p, param, grad, first_col, stop_col, lr, corrections, first_step):
    """update_parameter's optimizer step on the float array `param` (the parameter or its master)."""
    real = param.dtype.type
    first_moment = model.first_moments[p]
    if model.adam:
        hyper = adam_settings(model, p, lr, corrections, real)
        exp_avg = first_moment.reshape(param.shape)
        exp_avg_sq = model.second_moments[p].reshape(param.shape)
        for r in range(param.shape[0]):
            adam_update(param[r, first_col:stop_col], grad[r, first_col:stop_col],
                        exp_avg[r, first_col:stop_col], exp_avg_sq[r, first_col:stop_col], hyper)
        return
    hyper = sgd_settings(model, p, lr, first_step, real)
    if first_moment.size:
        momentum_buffer = first_moment.reshape(param.shape)
        for r in range(param.shape[0]):
            sgd_update(param[r, first_col:stop_col], grad[r, first_col:stop_col],
                       momentum_buffer[r, first_col:stop_col], hyper)
    else:
        for r in range(param.shape[0]):
            sgd_update(param[r, first_col:stop_col], grad[r, first_col:stop_col], first_moment,
                       hyper)
