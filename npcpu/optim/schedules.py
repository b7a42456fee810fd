"""Learning-rate schedules as pure functions of the step, in the style of optax.

Each constructor checks its arguments and returns ``schedule(step: int) -> float``: no state, the
same value for the same step however often and in whatever order it is asked. Step 0 is the first
optimizer step. Schedules compose with `join_schedules`, which is how warmups are built: a warmup
followed by a cosine is a linear schedule joined to a cosine schedule at the warmup boundary.

The torch-named schedulers in npcpu.optim.lr_scheduler evaluate these functions and write the
result into ``param_group["lr"]``. Each formula is the closed form of the torch scheduler it backs,
in float64: OneCycleLR's in the very same operations (same bits), the others to within a few
roundings (torch itself updates those recursively; see npcpu/optim/lr_scheduler.py).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Callable, Sequence

from npcpu.checks import check_int, check_real

Schedule = Callable[[int], float]


# ---------------------------------------------------------------- argument checks


def _check_step(step) -> int:
    return check_int("schedule", "step", step, 0)


# ---------------------------------------------------------------- interpolations


def _cosine_interpolation(start: float, end: float, fraction: float) -> float:
    """``end + (start - end) / 2 * (1 + cos(pi * fraction))``: start at 0, end at 1, not clamped."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def _linear_interpolation(start: float, end: float, fraction: float) -> float:
    """``(end - start) * fraction + start``: start at 0, end at 1, not clamped."""
    return (end - start) * fraction + start


_INTERPOLATIONS = {"cos": _cosine_interpolation, "linear": _linear_interpolation}


# ---------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    """``lr(t) = value``."""
    value = check_real("constant_schedule", "value", value)

    def schedule(step: int) -> float:
        _check_step(step)
        return value

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """A linear ramp from `init_value` at step 0 to `end_value` at `transition_steps`, then flat.

    ``lr(t) = init + (end - init) * min(t, T) / T`` with ``T = transition_steps``; T = 0 gives
    `end_value` from step 0. (torch's LinearLR is this with ``init = base_lr * start_factor``.)
    """
    init_value = check_real("linear_schedule", "init_value", init_value)
    end_value = check_real("linear_schedule", "end_value", end_value)
    transition_steps = check_int("linear_schedule", "transition_steps", transition_steps, 0)

    def schedule(step: int) -> float:
        step = _check_step(step)
        if transition_steps == 0:
            return end_value
        return init_value + (end_value - init_value) * min(step, transition_steps) / transition_steps

    return schedule


def cosine_annealing_schedule(init_value: float, end_value: float, half_period: int) -> Schedule:
    """Cosine from `init_value` down to `end_value` over `half_period` steps, and back up, periodically.

    ``lr(t) = end + (init - end) / 2 * (1 + cos(pi * t / T))`` with ``T = half_period``, not clamped:
    after T it climbs back to `init_value` at 2T, and so on. This is the closed form of torch's
    CosineAnnealingLR (``T = T_max``, ``end = eta_min``), which is stepped past T_max that way.
    """
    init_value = check_real("cosine_annealing_schedule", "init_value", init_value)
    end_value = check_real("cosine_annealing_schedule", "end_value", end_value)
    half_period = check_int("cosine_annealing_schedule", "half_period", half_period, 1)

    def schedule(step: int) -> float:
        return _cosine_interpolation(init_value, end_value, _check_step(step) / half_period)

    return schedule


def _held_after(schedule: Schedule, last_step: int) -> Schedule:
    """`schedule` up to `last_step`, then its value at `last_step` for ever."""
    return lambda step: schedule(min(_check_step(step), last_step))


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from `init_value` to ``alpha * init_value`` over `decay_steps`, then flat.

    ``lr(t) = end + (init - end) / 2 * (1 + cos(pi * min(t, T) / T))`` with ``end = alpha * init``
    and ``T = decay_steps`` (SGDR without restarts, Loshchilov & Hutter 2016; optax's
    cosine_decay_schedule).
    """
    init_value = check_real("cosine_decay_schedule", "init_value", init_value)
    alpha = check_real("cosine_decay_schedule", "alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cosine_decay_schedule alpha must be in [0, 1], got {alpha}")
    return _held_after(cosine_annealing_schedule(init_value, alpha * init_value, decay_steps), decay_steps)


def warmup_cosine_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                                 decay_steps: int, end_value: float = 0.0) -> Schedule:
    """Linear warmup from `init_value` to `peak_value`, then cosine decay to `end_value`.

    As optax's: `decay_steps` counts the warmup too, so the cosine runs for
    ``decay_steps - warmup_steps`` steps starting at step `warmup_steps`::

        join_schedules([linear_schedule(init, peak, warmup_steps),
                        cosine from peak to end over decay_steps - warmup_steps], [warmup_steps])
    """
    peak_value = check_real("warmup_cosine_decay_schedule", "peak_value", peak_value)
    end_value = check_real("warmup_cosine_decay_schedule", "end_value", end_value)
    warmup_steps = check_int("warmup_cosine_decay_schedule", "warmup_steps", warmup_steps, 0)
    decay_steps = check_int("warmup_cosine_decay_schedule", "decay_steps", decay_steps, 1)
    if decay_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine_decay_schedule decay_steps ({decay_steps}) must exceed "
                         f"warmup_steps ({warmup_steps})")
    return join_schedules(
        [linear_schedule(init_value, peak_value, warmup_steps),
         _held_after(cosine_annealing_schedule(peak_value, end_value, decay_steps - warmup_steps),
                     decay_steps - warmup_steps)],
        [warmup_steps])


def step_decay_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``lr(t) = init * gamma ** (t // step_size)``: multiply by `gamma` every `step_size` steps (StepLR)."""
    init_value = check_real("step_decay_schedule", "init_value", init_value)
    step_size = check_int("step_decay_schedule", "step_size", step_size, 1)
    gamma = check_real("step_decay_schedule", "gamma", gamma)

    def schedule(step: int) -> float:
        return init_value * gamma ** (_check_step(step) // step_size)

    return schedule


def exponential_decay_schedule(init_value: float, gamma: float) -> Schedule:
    """``lr(t) = init * gamma ** t``: multiply by `gamma` every step (ExponentialLR)."""
    init_value = check_real("exponential_decay_schedule", "init_value", init_value)
    gamma = check_real("exponential_decay_schedule", "gamma", gamma)

    def schedule(step: int) -> float:
        return init_value * gamma ** _check_step(step)

    return schedule


def warmup_step_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                               decay_steps: int, decay_factor: float) -> Schedule:
    """Linear warmup to `peak_value`, then multiply by `decay_factor` every `decay_steps` steps.

    ``lr(t) = init + (peak - init) * t / W`` for ``t < W = warmup_steps``, else
    ``peak * decay_factor ** ((t - W) // decay_steps)`` (e.g. W = 4000, factor 0.5 every 50,000).
    """
    warmup_steps = check_int("warmup_step_decay_schedule", "warmup_steps", warmup_steps, 0)
    return join_schedules(
        [linear_schedule(init_value, peak_value, warmup_steps),
         step_decay_schedule(peak_value, decay_steps, decay_factor)],
        [warmup_steps])


def one_cycle_schedule(total_steps: int, max_lr: float, pct_start: float = 0.3,
                       anneal_strategy: str = "cos", div_factor: float = 25.0,
                       final_div_factor: float = 1e4, three_phase: bool = False) -> Schedule:
    """The 1cycle policy (Smith & Topin 2017) in torch's OneCycleLR formula.

    ``initial = max_lr / div_factor``, ``min = initial / final_div_factor``, and with
    ``P = pct_start * total_steps`` the phases (anneal = cosine or linear interpolation):

    - two phases (default): initial -> max_lr over steps [0, P - 1], then max_lr -> min over
      [P - 1, total_steps - 1];
    - three phases: initial -> max_lr over [0, P - 1], max_lr -> initial over [P - 1, 2P - 2],
      initial -> min over [2P - 2, total_steps - 1].

    Defined for steps 0 ... total_steps (the last one extrapolates the last phase by one step, as
    torch allows); a later step raises ValueError, as in torch.
    """
    max_lr = check_real("one_cycle_schedule", "max_lr", max_lr)
    div_factor = check_real("one_cycle_schedule", "div_factor", div_factor)
    final_div_factor = check_real("one_cycle_schedule", "final_div_factor", final_div_factor)
    initial_lr = max_lr / div_factor
    return three_point_cycle_schedule(total_steps, initial_lr, max_lr, initial_lr / final_div_factor,
                                      pct_start, anneal_strategy, three_phase)


def three_point_cycle_schedule(total_steps: int, start_value: float, peak_value: float,
                               end_value: float, pct_start: float = 0.3,
                               anneal_strategy: str = "cos", three_phase: bool = False) -> Schedule:
    """start -> peak -> end in OneCycleLR's phases (see `one_cycle_schedule`).

    With `three_phase` the middle phase returns to `start_value` and a third goes from
    `start_value` to `end_value`. OneCycleLR cycles momentum with this too: start = max_momentum,
    peak = base_momentum, end = max_momentum.
    """
    total_steps = check_int("one-cycle", "total_steps", total_steps, 1)
    pct_start = check_real("one-cycle", "pct_start", pct_start)
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"one-cycle pct_start must be in [0, 1], got {pct_start}")
    if anneal_strategy not in _INTERPOLATIONS:
        raise ValueError(f"one-cycle anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    anneal = _INTERPOLATIONS[anneal_strategy]
    rise_end = float(pct_start * total_steps) - 1
    if three_phase:
        phases = [(rise_end, start_value, peak_value),
                  (float(2 * pct_start * total_steps) - 2, peak_value, start_value),
                  (total_steps - 1, start_value, end_value)]
    else:
        phases = [(rise_end, start_value, peak_value), (total_steps - 1, peak_value, end_value)]

    def schedule(step: int) -> float:
        step = _check_step(step)
        if step > total_steps:
            raise ValueError(f"one-cycle schedule of {total_steps} total_steps asked for step {step}")
        phase_start = 0.0
        for i, (phase_end, start, end) in enumerate(phases):
            if step <= phase_end or i == len(phases) - 1:
                return anneal(start, end, (step - phase_start) / (phase_end - phase_start))
            phase_start = phase_end
        raise AssertionError("unreachable: the last phase always returns")

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule i from step ``boundaries[i-1]`` on, evaluated at ``step - boundaries[i-1]``.

    As optax's join_schedules: ``schedules[0]`` runs from step 0 and sees the step unchanged; at
    step ``b = boundaries[i-1]`` schedule i takes over and sees 0. `boundaries` must be
    non-decreasing, non-negative integers, one fewer than `schedules`.
    """
    schedules = list(schedules)
    boundaries = [check_int("join_schedules", "boundary", b, 0) for b in boundaries]
    if len(boundaries) != len(schedules) - 1 or not schedules:
        raise ValueError(f"join_schedules needs one boundary fewer than schedules, got "
                         f"{len(schedules)} schedules and {len(boundaries)} boundaries")
    if any(b1 > b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"join_schedules boundaries must be non-decreasing, got {boundaries}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"join_schedules schedules[{i}] must be callable, got {type(s).__name__}")

    def schedule(step: int) -> float:
        step = _check_step(step)
        i = bisect_right(boundaries, step)
        return schedules[i](step - boundaries[i - 1] if i > 0 else step)

    return schedule
