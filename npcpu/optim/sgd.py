"""SGD with momentum, dampening, Nesterov momentum, L2 weight decay and maximize (torch.optim.SGD)."""

from __future__ import annotations

import functools

from npcpu.kernels import optim as kernels
from npcpu.checks import check_flag, check_real
from npcpu.optim.optimizer import Optimizer, flat


class SGD(Optimizer):
    """Stochastic gradient descent, detail for detail as torch.optim.SGD.

    For each parameter w with gradient g, at step t:

        g <- -g                                   if maximize
        g <- g + weight_decay * w                 if weight_decay != 0
        b <- g                                    if momentum != 0 and t == 1 (no dampening yet)
        b <- momentum * b + (1 - dampening) * g   if momentum != 0 and t > 1
        g <- g + momentum * b  if nesterov,  else  g <- b      (if momentum != 0)
        w <- w - lr * g

    State per parameter: "step" and, when momentum != 0, "momentum_buffer" (b; a momentum switched
    on mid-run starts from a zero buffer rather than from g).
    See npcpu.optim.optimizer.Optimizer for `state_dtype`, `master_weights`,
    `stochastic_rounding` and `seed`.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 nesterov: bool = False, weight_decay: float = 0, maximize: bool = False, *,
                 state_dtype: str = "fp32", master_weights: bool = False,
                 stochastic_rounding: bool = True, seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)

    def _check_group(self, group: dict) -> None:
        check_real("SGD", "lr", group["lr"], low=0.0)
        check_real("SGD", "momentum", group["momentum"], low=0.0)
        check_real("SGD", "dampening", group["dampening"], low=0.0, high=1.0)
        check_real("SGD", "weight_decay", group["weight_decay"], low=0.0)
        check_flag("SGD", "maximize", group["maximize"])
        if check_flag("SGD", "nesterov", group["nesterov"]) and (
                group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: nesterov requires momentum > 0 and dampening = 0, got "
                             f"momentum={group['momentum']!r}, dampening={group['dampening']!r}")

    def _moment_names(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, weights, grad, state, group, rounding) -> None:
        buffer = flat(state["momentum_buffer"]) if group["momentum"] != 0 else None
        # float(): the cache's key must be hashable whatever number type a user put in the group
        hyper = _hyper(float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                       float(group["weight_decay"]), group["nesterov"], group["maximize"],
                       state["step"] == 1, grad.dtype.type)
        step = kernels.for_size(kernels.sgd_step, kernels.sgd_step_serial, weights.size)
        step(weights, grad, buffer, hyper, tuple(rounding))  # plain tuples: see kernels.optim


@functools.lru_cache(maxsize=256)
def _hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, real) -> tuple:
    """The kernels' SGDHyper for a group's settings, in the compute dtype `real`, as the plain
    tuple the kernels take: made once per distinct setting (a small model's step is a few
    microseconds per tensor, and building the tuple was a good part of it; a schedule that changes
    lr every step just misses the cache)."""
    return tuple(kernels.SGDHyper(lr=real(lr), momentum=real(momentum),
                                  one_minus_dampening=real(1 - dampening),
                                  weight_decay=real(weight_decay), nesterov=nesterov,
                                  maximize=maximize, first_step=first_step))
