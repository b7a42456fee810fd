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
A step's per-parameter values come with the call: lr, and for Adam `corrections` = (1 - beta1^t,
sqrt(1 - beta2^t)) at the step t being taken, computed in Python by the formulas of
npcpu.optim.Adam (so the step sizes are the same float64 numbers before their rounding to the
compute dtype).
"""

from numba import njit

from npcpu.kernels.optim import (AdamHyper, SGDHyper, adam_apply, adam_gradient, adam_moments,
                                 sgd_apply, sgd_direction, sgd_gradient, sgd_momentum)


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
def update_parameter(model, p, param, grad, first_col, stop_col, lr, corrections, first_step):
    """One optimizer step on columns first_col <= k < stop_col of every row of parameter p:
    param and grad (R, N) (a weight, or a bias as one row (1, n)); the state arrays, flat, are
    viewed in that shape. lr and corrections (2,) are this step's (see the module docstring);
    `first_step`: SGD creates its momentum buffer.

    The settings are built once per call, and each row's run of columns is a plain element loop
    (sgd_update / adam_update): W_0 is updated in one call per thread and step, over the
    thread's columns of all its rows."""
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
