"""Adam (coupled L2 decay) and AdamW (decoupled decay), detail for detail as torch.optim."""

from __future__ import annotations

from npcpu.kernels import optim as kernels
from npcpu.checks import check_flag, check_real
from npcpu.optim.optimizer import Optimizer, check_betas, flat


def bias_corrections(betas: tuple, step: int) -> tuple[float, float]:
    """Adam's bias corrections at step t: (1 - beta1^t, sqrt(1 - beta2^t)), in float64 as torch
    computes them (the compiled small-model step takes them from here too)."""
    beta1, beta2 = betas
    return 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5


class Adam(Optimizer):
    """Adam (Kingma & Ba, arXiv 1412.6980) with torch.optim.Adam's details.

    For each parameter w with gradient g, at step t:

        g <- -g                                 if maximize
        g <- g + weight_decay * w               (coupled L2 decay; AdamW instead: w <- (1 - lr wd) w)
        m <- m + (1 - beta1) (g - m)            ("exp_avg", torch's lerp)
        v <- beta2 v + (1 - beta2) g^2          ("exp_avg_sq")
        v_max <- max(v_max, v)                  ("max_exp_avg_sq", amsgrad only: the raw v, not v_hat)
        w <- w - lr / (1 - beta1^t) * m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)

    eps is added after the bias-corrected square root, as torch does. The step runs as one fused
    kernel per tensor (npcpu.kernels.optim.adam_step): reads w, g, m, v and writes w, m, v once.
    See npcpu.optim.optimizer.Optimizer for `state_dtype`, `master_weights`,
    `stochastic_rounding` and `seed`.
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, maximize: bool = False, *,
                 state_dtype: str = "fp32", master_weights: bool = False,
                 stochastic_rounding: bool = True, seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)

    def _check_group(self, group: dict) -> None:
        owner = type(self).__name__
        check_real(owner, "lr", group["lr"], low=0.0)
        check_betas(owner, group["betas"])
        check_real(owner, "eps", group["eps"], low=0.0, low_open=True)
        check_real(owner, "weight_decay", group["weight_decay"], low=0.0)
        check_flag(owner, "amsgrad", group["amsgrad"])
        check_flag(owner, "maximize", group["maximize"])

    def _moment_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _update(self, weights, grad, state, group, rounding) -> None:
        real = grad.dtype.type
        lr, (beta1, beta2), weight_decay, step = group["lr"], group["betas"], group["weight_decay"], state["step"]
        if self.decoupled_weight_decay:
            coupled_decay, decay_factor = 0.0, 1 - lr * weight_decay
        else:
            coupled_decay, decay_factor = weight_decay, 1.0
        correction1, correction2_sqrt = bias_corrections(group["betas"], step)
        exp_avg, exp_avg_sq = flat(state["exp_avg"]), flat(state["exp_avg_sq"])
        max_exp_avg_sq = flat(state["max_exp_avg_sq"]) if group["amsgrad"] else None
        hyper = kernels.AdamHyper(
            one_minus_beta1=real(1 - beta1), beta2=real(beta2), one_minus_beta2=real(1 - beta2),
            eps=real(group["eps"]), weight_decay=real(coupled_decay), decay_factor=real(decay_factor),
            step_size=real(lr / correction1), bias_correction2_sqrt=real(correction2_sqrt),
            maximize=group["maximize"])
        step = kernels.for_size(kernels.adam_step, kernels.adam_step_serial, weights.size)
        step(weights, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, tuple(hyper), tuple(rounding))


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101): Adam with decoupled weight decay.

    As Adam, except that the decay does not enter the gradient (and so the moments): before the
    Adam update, w <- (1 - lr * weight_decay) w. Default weight_decay 1e-2, as in torch.
    """

    decoupled_weight_decay = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 state_dtype: str = "fp32", master_weights: bool = False,
                 stochastic_rounding: bool = True, seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize,
                         state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)
