"""Pure schedules against their formulas, written out here independently of the implementation."""

import math

import numpy as np
import pytest

from npcpu.optim.schedules import (
    constant_schedule,
    cosine_annealing_schedule,
    cosine_decay_schedule,
    exponential_decay_schedule,
    join_schedules,
    linear_schedule,
    one_cycle_schedule,
    step_decay_schedule,
    warmup_cosine_decay_schedule,
    warmup_step_decay_schedule,
)

STEPS = range(0, 3001, 7)


def values(schedule, steps=STEPS):
    return np.array([schedule(t) for t in steps])


def test_constant():
    assert set(values(constant_schedule(0.25))) == {0.25}


def test_linear_ramps_then_holds():
    got = values(linear_schedule(0.0, 2.0, 1000))
    expected = [2.0 * min(t, 1000) / 1000 for t in STEPS]
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert linear_schedule(1.0, 3.0, 0)(0) == 3.0


def test_cosine_decay_reaches_alpha_and_holds():
    got = values(cosine_decay_schedule(0.5, 2000, alpha=0.1))
    expected = [0.5 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(t, 2000) / 2000))) for t in STEPS]
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    assert cosine_decay_schedule(0.5, 2000, alpha=0.1)(10**6) == pytest.approx(0.05, rel=1e-15)


def test_cosine_annealing_is_periodic():
    schedule = cosine_annealing_schedule(1.0, 0.1, 100)
    assert schedule(0) == 1.0 and schedule(100) == pytest.approx(0.1) and schedule(200) == pytest.approx(1.0)
    assert schedule(150) == pytest.approx(schedule(50), rel=1e-14)


def test_warmup_cosine_is_linear_joined_to_cosine():
    init, peak, end, warmup, total = 1e-6, 3e-3, 1e-5, 1000, 5000
    got = values(warmup_cosine_decay_schedule(init, peak, warmup, total, end), range(0, 6000, 3))
    expected = [init + (peak - init) * t / warmup if t < warmup else
                end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup)))
                for t in range(0, 6000, 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_step_and_exponential_decay():
    np.testing.assert_allclose(values(step_decay_schedule(0.1, 30, 0.5)),
                               [0.1 * 0.5 ** (t // 30) for t in STEPS], rtol=1e-15, atol=0)
    np.testing.assert_allclose(values(exponential_decay_schedule(0.1, 0.999)),
                               [0.1 * 0.999 ** t for t in STEPS], rtol=1e-15, atol=0)


def test_warmup_step_decay_example_from_the_design():
    """Linear warmup for 4000 steps, then halve every 50,000 steps."""
    schedule = warmup_step_decay_schedule(0.0, 1e-3, 4000, 50_000, 0.5)
    assert schedule(0) == 0.0 and schedule(2000) == pytest.approx(5e-4, rel=1e-15)
    assert schedule(4000) == 1e-3 and schedule(53_999) == 1e-3
    assert schedule(54_000) == 5e-4 and schedule(104_000) == 2.5e-4


def _one_cycle_formula(t, total, max_lr, pct, div, final_div, three_phase, anneal):
    """OneCycleLR as its documentation states it: phase ends at pct*total - 1 (and 2*pct*total - 2)."""
    initial = max_lr / div
    low = initial / final_div
    if anneal == "cos":
        f = lambda a, b, x: b + (a - b) / 2 * (1 + math.cos(math.pi * x))  # noqa: E731
    else:
        f = lambda a, b, x: a + (b - a) * x  # noqa: E731
    up_end = pct * total - 1
    if t <= up_end:
        return f(initial, max_lr, t / up_end)
    if not three_phase:
        return f(max_lr, low, (t - up_end) / (total - 1 - up_end))
    down_end = 2 * pct * total - 2
    if t <= down_end:
        return f(max_lr, initial, (t - up_end) / (down_end - up_end))
    return f(initial, low, (t - down_end) / (total - 1 - down_end))


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_formula(three_phase, anneal):
    total = 1000
    schedule = one_cycle_schedule(total, 0.4, 0.3, anneal, 25.0, 1e4, three_phase)
    got = values(schedule, range(total + 1))
    expected = [_one_cycle_formula(t, total, 0.4, 0.3, 25.0, 1e4, three_phase, anneal) for t in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-18)
    assert got[0] == pytest.approx(0.4 / 25) and got[299] == pytest.approx(0.4)
    assert got[total - 1] == pytest.approx(0.4 / 25 / 1e4)
    with pytest.raises(ValueError, match="1000 total_steps asked for step 1001"):
        schedule(total + 1)


def test_join_schedules_restarts_each_piece_at_its_boundary():
    schedule = join_schedules([lambda t: 100 + t, lambda t: 200 + t, lambda t: 300 + t], [5, 5 + 10])
    assert [schedule(t) for t in (0, 4, 5, 14, 15, 20)] == [100, 104, 200, 209, 300, 305]
    assert join_schedules([lambda t: t], [])(7) == 7


@pytest.mark.parametrize("make, error, match", [
    (lambda: linear_schedule(0.0, 1.0, -1), ValueError, "transition_steps must be >= 0"),
    (lambda: linear_schedule(0.0, 1.0, 2.5), TypeError, "transition_steps must be an integer"),
    (lambda: linear_schedule(float("nan"), 1.0, 5), ValueError, "init_value must be finite"),
    (lambda: cosine_decay_schedule(1.0, 0), ValueError, "half_period must be >= 1"),
    (lambda: cosine_decay_schedule(1.0, 10, alpha=2.0), ValueError, "alpha must be in"),
    (lambda: warmup_cosine_decay_schedule(0.0, 1.0, 100, 100), ValueError, "must exceed"),
    (lambda: step_decay_schedule(1.0, 0), ValueError, "step_size"),
    (lambda: one_cycle_schedule(0, 1.0), ValueError, "total_steps"),
    (lambda: one_cycle_schedule(10, 1.0, pct_start=1.5), ValueError, "pct_start"),
    (lambda: one_cycle_schedule(10, 1.0, anneal_strategy="exp"), ValueError, "anneal_strategy"),
    (lambda: join_schedules([constant_schedule(1.0)], [3]), ValueError, "one boundary fewer"),
    (lambda: join_schedules([constant_schedule(1.0)] * 3, [5, 2]), ValueError, "non-decreasing"),
    (lambda: join_schedules([constant_schedule(1.0), 2.0], [3]), TypeError, "callable"),
])
def test_invalid_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_steps_must_be_non_negative_integers():
    schedule = constant_schedule(1.0)
    assert schedule(np.int64(3)) == 1.0
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        schedule(-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        schedule(1.5)
