"""torch-named learning-rate schedulers that write the value of a pure schedule into each param group.

Same constructors, defaults, call order and learning-rate sequence as torch.optim.lr_scheduler:
construct after the optimizer (the constructor sets step 0's lr), call ``scheduler.step()`` after
each ``optimizer.step()``. A scheduler keeps ``last_epoch`` (the step whose lr is in force) and, for
each param group, evaluates the closed-form schedule from npcpu.optim.schedules at ``last_epoch``,
starting from the group's ``initial_lr``, and writes it to ``group["lr"]``, where the optimizer
reads it. That is all a scheduler does.

Difference from torch, in float arithmetic only: torch updates StepLR, ExponentialLR, LinearLR and
CosineAnnealingLR recursively (``lr_t = lr_{t-1} * ratio``); the recursion equals the closed form
in exact arithmetic, and in float64 drifts from it by about one rounding per step (under 1e-12
relative over thousands of steps, which the tests check against torch). The closed form used here
does not drift. CosineAnnealingLR's recursive ratio
``(1 + cos(pi t / T)) / (1 + cos(pi (t-1) / T))`` telescopes to the closed form exactly when each
cosine is rounded the same way, which it is, so no error grows near T where 1 + cos is tiny.

Resuming through the constructor's ``last_epoch`` argument gives the closed form at
``last_epoch + 1``; torch's recursive schedulers instead keep the optimizer's current lr there. Use
``state_dict()``/``load_state_dict()`` to resume: the state is plain numbers, lists and strings
(JSON-serializable); LambdaLR's functions are not saved, as in torch.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Sequence

from npcpu.checks import check_int, check_real
from npcpu.optim.schedules import (
    Schedule,
    cosine_annealing_schedule,
    exponential_decay_schedule,
    linear_schedule,
    step_decay_schedule,
    three_point_cycle_schedule,
)


def _check_optimizer(owner: str, optimizer) -> None:
    if not isinstance(getattr(optimizer, "param_groups", None), list):
        raise TypeError(f"{owner}: optimizer must have a list of param_groups, got {type(optimizer).__name__}")


def _per_group(owner: str, name: str, optimizer, value) -> list:
    """`value` once per param group: a list/tuple of that length, or a scalar repeated."""
    n_groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise ValueError(f"{owner}: expected {n_groups} values of {name}, got {len(value)}")
        return list(value)
    return [value] * n_groups


def _scaled(base_lr: float, factor: Callable[[int], float]) -> Schedule:
    """``lr(t) = base_lr * factor(t)``: how torch's closed forms apply a multiplicative factor."""
    return lambda step: base_lr * factor(step)


class LRScheduler:
    """Base class: writes ``lr_schedules()[i](last_epoch)`` into ``optimizer.param_groups[i]["lr"]``.

    Parameters
    ----------
    optimizer
        Anything with ``param_groups``, a list of dicts with an ``"lr"`` each.
    last_epoch : int
        -1 (default) to start: each group's current lr is stored as its ``"initial_lr"`` (unless a
        scheduler constructed earlier on the same optimizer already stored one). A value >= 0
        resumes: the groups must already have ``"initial_lr"``.

    Attributes
    ----------
    base_lrs : list of float
        Each group's ``initial_lr``, where every schedule starts.
    last_epoch : int
        The step whose learning rate is in force: 0 after construction, +1 per `step()`.
    """

    def __init__(self, optimizer, last_epoch: int = -1):
        owner = type(self).__name__
        _check_optimizer(owner, optimizer)
        last_epoch = check_int(owner, "last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"{owner}: param_groups[{i}] has no 'initial_lr' to resume from "
                               f"(last_epoch={last_epoch}); load the optimizer's state first")
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.last_epoch = int(last_epoch)
        self.step()

    def lr_schedules(self) -> list[Schedule]:
        """One schedule per param group, built from `base_lrs` and the scheduler's settings."""
        raise NotImplementedError(f"{type(self).__name__} does not define lr_schedules()")

    def get_lr(self) -> list[float]:
        """Each group's learning rate at `last_epoch` (use `get_last_lr()` for the one in force)."""
        return [schedule(self.last_epoch) for schedule in self.lr_schedules()]

    def get_last_lr(self) -> list[float]:
        """The learning rates this scheduler last wrote, one per param group."""
        return list(self._last_lr)

    def step(self) -> None:
        """Advance one step and write that step's learning rates. Call after ``optimizer.step()``."""
        self._set_epoch(self.last_epoch + 1)

    def _set_epoch(self, epoch: int) -> None:
        self.last_epoch = epoch
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Every attribute but the optimizer, as plain numbers, strings and lists."""
        return {key: list(value) if isinstance(value, list) else value
                for key, value in vars(self).items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; the optimizer's own state is loaded separately."""
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected keys {sorted(expected)}, "
                             f"got {sorted(state_dict)}")
        for key, value in state_dict.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)


class LambdaLR(LRScheduler):
    """``lr = initial_lr * lr_lambda(last_epoch)``, one function or one per param group.

    The functions are not part of the state dict (``"lr_lambdas"`` holds None for each, as torch's
    does for plain functions): pass the same ones when rebuilding the scheduler.
    """

    def __init__(self, optimizer, lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
                 last_epoch: int = -1):
        _check_optimizer("LambdaLR", optimizer)
        lr_lambdas = _per_group("LambdaLR", "lr_lambda", optimizer, lr_lambda)
        for i, fn in enumerate(lr_lambdas):
            if not callable(fn):
                raise TypeError(f"LambdaLR: lr_lambda[{i}] must be callable, got {type(fn).__name__}")
        self.lr_lambdas = lr_lambdas
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        return [_scaled(base_lr, fn) for base_lr, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]

    def state_dict(self) -> dict:
        state = {key: value for key, value in super().state_dict().items() if key != "lr_lambdas"}
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        lr_lambdas = self.lr_lambdas
        super().load_state_dict(state_dict)
        self.lr_lambdas = lr_lambdas


class StepLR(LRScheduler):
    """``lr = initial_lr * gamma ** (last_epoch // step_size)`` (schedules.step_decay_schedule)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        return [step_decay_schedule(base_lr, self.step_size, self.gamma) for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    """``lr = initial_lr * gamma ** last_epoch`` (schedules.exponential_decay_schedule)."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        return [exponential_decay_schedule(base_lr, self.gamma) for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    """``lr = initial_lr * (start + (end - start) * min(last_epoch, total_iters) / total_iters)``.

    The factor runs linearly from `start_factor` to `end_factor` over `total_iters` steps
    (schedules.linear_schedule), then stays at `end_factor`. As torch: 0 < start_factor <= 1,
    0 <= end_factor <= 1; here total_iters >= 1 too.
    """

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1):
        self.start_factor = check_real("LinearLR", "start_factor", start_factor, low=0.0, low_open=True, high=1.0)
        self.end_factor = check_real("LinearLR", "end_factor", end_factor, low=0.0, high=1.0)
        self.total_iters = check_int("LinearLR", "total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        factor = linear_schedule(self.start_factor, self.end_factor, self.total_iters)
        return [_scaled(base_lr, factor) for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``.

    SGDR without restarts (Loshchilov & Hutter 2016), through schedules.cosine_annealing_schedule;
    past T_max the lr climbs back with period 2 T_max, as torch's does. torch computes this
    recursively; see the module docstring for why the closed form matches it.
    """

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        return [cosine_annealing_schedule(base_lr, self.eta_min, self.T_max) for base_lr in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2017), torch's OneCycleLR (schedules.one_cycle_schedule).

    Each group's lr goes from ``max_lr / div_factor`` up to `max_lr` over the first `pct_start` of
    `total_steps` (or ``epochs * steps_per_epoch``), then down to
    ``max_lr / div_factor / final_div_factor``; `three_phase` returns to the initial lr first. With
    `cycle_momentum` the group's ``"momentum"`` (or ``betas[0]`` for Adam-like groups) moves the
    opposite way between `max_momentum` and `base_momentum`. As in torch, the groups also get
    ``"initial_lr"``, ``"max_lr"``, ``"min_lr"`` (and ``"max_momentum"``, ``"base_momentum"``),
    and stepping past `total_steps` raises ValueError.
    """

    def __init__(self, optimizer, max_lr: float | Sequence[float], total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | Sequence[float] = 0.85, max_momentum: float | Sequence[float] = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1):
        _check_optimizer("OneCycleLR", optimizer)
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("OneCycleLR: give total_steps, or epochs and steps_per_epoch")
            total_steps = (check_int("OneCycleLR", "epochs", epochs, 1)
                           * check_int("OneCycleLR", "steps_per_epoch", steps_per_epoch, 1))
        self.total_steps = total_steps
        self.pct_start = pct_start
        self.anneal_strategy = anneal_strategy
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.three_phase = three_phase
        self.max_lrs = [float(v) for v in _per_group("OneCycleLR", "max_lr", optimizer, max_lr)]
        self._cycle(1.0, 1.0, 1.0)  # check the settings before writing to the param groups
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group, group_max_lr in zip(groups, self.max_lrs, strict=True):
                group["initial_lr"] = group_max_lr / div_factor
                group["max_lr"] = group_max_lr
                group["min_lr"] = group["initial_lr"] / final_div_factor

        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            defaults = getattr(optimizer, "defaults", groups[0] if groups else {})
            if "momentum" not in defaults and "betas" not in defaults:
                raise ValueError("OneCycleLR: cycle_momentum=True needs an optimizer with 'momentum' "
                                 "or 'betas'; pass cycle_momentum=False")
            self.use_beta1 = "betas" in defaults
            self.max_momentums = [float(v) for v in
                                  _per_group("OneCycleLR", "max_momentum", optimizer, max_momentum)]
            self.base_momentums = [float(v) for v in
                                   _per_group("OneCycleLR", "base_momentum", optimizer, base_momentum)]
            if last_epoch == -1:
                for group, high, low in zip(groups, self.max_momentums, self.base_momentums, strict=True):
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        super().__init__(optimizer, last_epoch)

    def lr_schedules(self) -> list[Schedule]:
        return [self._cycle(max_lr / self.div_factor, max_lr, max_lr / self.div_factor / self.final_div_factor)
                for max_lr in self.max_lrs]

    def momentum_schedules(self) -> list[Schedule]:
        """Momentum goes max -> base while the lr rises, and back (stays at max in a third phase)."""
        return [self._cycle(high, low, high) for high, low in zip(self.max_momentums, self.base_momentums)]

    def _cycle(self, start: float, peak: float, end: float) -> Schedule:
        return three_point_cycle_schedule(self.total_steps, start, peak, end, self.pct_start,
                                          self.anneal_strategy, self.three_phase)

    def _set_epoch(self, epoch: int) -> None:
        super()._set_epoch(epoch)
        if not self.cycle_momentum:
            return
        for group, schedule in zip(self.optimizer.param_groups, self.momentum_schedules(), strict=True):
            momentum = schedule(epoch)
            if self.use_beta1:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum


class SequentialLR:
    """Run ``schedulers[i]`` from step ``milestones[i-1]`` on, restarted at its own step 0 there.

    As torch's SequentialLR: the schedulers are constructed first (each on `optimizer`), then this
    undoes their first steps, restores each group's ``initial_lr`` and starts ``schedulers[0]``. At
    a milestone the next scheduler is set to its step 0; between milestones the current one steps.
    Warmup + cosine is ``SequentialLR(opt, [LinearLR(opt, ...), CosineAnnealingLR(opt, ...)],
    milestones=[warmup_steps])``.
    """

    def __init__(self, optimizer, schedulers: Sequence, milestones: Sequence[int], last_epoch: int = -1):
        _check_optimizer("SequentialLR", optimizer)
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("SequentialLR: expected at least one scheduler, got none")
        for i, scheduler in enumerate(schedulers):
            if getattr(scheduler, "optimizer", None) is not optimizer:
                raise ValueError(f"SequentialLR: schedulers[{i}] ({type(scheduler).__name__}) belongs to "
                                 f"another optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: expected {len(schedulers) - 1} milestones for "
                             f"{len(schedulers)} schedulers, got {len(milestones)}")
        self.optimizer = optimizer
        self._schedulers = schedulers
        self._milestones = [int(m) for m in milestones]
        self.last_epoch = last_epoch + 1
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self._undo_first_steps(self)
        current = self._schedulers[bisect_right(self._milestones, 0)]
        current.step()
        self._last_lr = current.get_last_lr()

    @staticmethod
    def _undo_first_steps(scheduler) -> None:
        """Take back the step each (nested) scheduler's constructor made."""
        if hasattr(scheduler, "_schedulers"):
            for inner in scheduler._schedulers:
                SequentialLR._undo_first_steps(inner)
        else:
            scheduler.last_epoch -= 1

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def step(self) -> None:
        self.last_epoch += 1
        i = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[i]
        if i > 0 and self._milestones[i - 1] == self.last_epoch:
            scheduler._set_epoch(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_milestones": list(self._milestones),
                "_last_lr": list(self._last_lr),
                "_schedulers": [scheduler.state_dict() for scheduler in self._schedulers]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["_schedulers"]) != len(self._schedulers):
            raise ValueError(f"SequentialLR.load_state_dict: expected {len(self._schedulers)} scheduler "
                             f"states, got {len(state_dict['_schedulers'])}")
        self.last_epoch = state_dict["last_epoch"]
        self._milestones = list(state_dict["_milestones"])
        self._last_lr = list(state_dict["_last_lr"])
        for scheduler, state in zip(self._schedulers, state_dict["_schedulers"], strict=True):
            scheduler.load_state_dict(state)
