"""torch-named schedulers: the same learning-rate (and momentum) sequences as torch's, state round trips.

Tolerance 1e-12 relative: torch updates most schedulers recursively, npcpu evaluates the closed form;
both are float64 and differ by accumulated rounding only (see npcpu/optim/lr_scheduler.py).
"""

import json
import warnings

import numpy as np
import pytest

from npcpu.nn.parameter import Parameter
from npcpu.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

RTOL = 1e-12
LRS = (0.1, 0.03)  # two param groups with different learning rates


class PlainSGD:
    """A stand-in optimizer: one param group per lr, ``p -= lr * grad``."""

    def __init__(self, lrs=LRS, **hyperparameters):
        self.defaults = {"lr": lrs[0], **hyperparameters}
        self.param_groups = [{"params": [Parameter(np.zeros(3))], "lr": lr, **hyperparameters} for lr in lrs]

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.frozen:
                    p.data -= group["lr"] * p.grad


def torch_optimizer(torch, lrs=LRS, kind="sgd", **hyperparameters):
    groups = [{"params": [torch.zeros(3, requires_grad=True)], "lr": lr} for lr in lrs]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind]
    return cls(groups, lr=lrs[0], **hyperparameters)


def run(optimizer, scheduler, n_steps, keys=("lr",)):
    """The values of `keys` in every group after construction and after each of `n_steps` steps."""
    trace = []
    for _ in range(n_steps + 1):
        trace.append([[float(np.ravel(group[k])[0]) for k in keys] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(trace)


# Each case: (build npcpu scheduler from our optimizer, build torch scheduler from torch's, steps).
def _sequential(lib, opt):
    warmup = lib.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=1000)
    cosine = lib.CosineAnnealingLR(opt, T_max=4000, eta_min=1e-5)
    return lib.SequentialLR(opt, [warmup, cosine], milestones=[1000])


def _sequential_three(lib, opt):
    first = lib.LinearLR(opt, start_factor=0.25, total_iters=20)
    second = lib.StepLR(opt, step_size=7, gamma=0.5)
    third = lib.ExponentialLR(opt, gamma=0.99)
    return lib.SequentialLR(opt, [first, second, third], milestones=[30, 70])


CASES = {
    "StepLR": (lambda lib, opt: lib.StepLR(opt, step_size=30, gamma=0.7), 3000),
    "ExponentialLR": (lambda lib, opt: lib.ExponentialLR(opt, gamma=0.999), 4000),
    "LambdaLR": (lambda lib, opt: lib.LambdaLR(opt, lambda t: 1.0 / (1.0 + t / 100.0)), 3000),
    "LambdaLR-per-group": (lambda lib, opt: lib.LambdaLR(opt, [lambda t: 0.99 ** t,
                                                                lambda t: min(1.0, (t + 1) / 50)]), 500),
    "LinearLR": (lambda lib, opt: lib.LinearLR(opt, start_factor=0.1, end_factor=0.9, total_iters=1000), 1500),
    "CosineAnnealingLR": (lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=1000), 2600),
    "CosineAnnealingLR-eta_min": (lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=3000, eta_min=1e-4), 6500),
    "SequentialLR-warmup-cosine": (_sequential, 5000),
    "SequentialLR-three": (_sequential_three, 200),
}


class _Npcpu:
    LinearLR, CosineAnnealingLR, SequentialLR, StepLR, ExponentialLR, LambdaLR = (
        LinearLR, CosineAnnealingLR, SequentialLR, StepLR, ExponentialLR, LambdaLR)


@pytest.mark.parametrize("case", CASES)
def test_lr_sequence_matches_torch(torch, case):
    build, n_steps = CASES[case]
    ours = PlainSGD()
    expected_opt = torch_optimizer(torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on SequentialLR internals
        expected = run(expected_opt, build(torch.optim.lr_scheduler, expected_opt), n_steps)
    got = run(ours, build(_Npcpu, ours), n_steps)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


ONE_CYCLE = {
    "cos": dict(max_lr=[0.5, 0.2], total_steps=3000),
    "linear": dict(max_lr=0.4, epochs=10, steps_per_epoch=250, anneal_strategy="linear"),
    "three_phase": dict(max_lr=0.3, total_steps=2001, pct_start=0.25, three_phase=True,
                        div_factor=10.0, final_div_factor=100.0),
    "no_momentum": dict(max_lr=0.3, total_steps=100, cycle_momentum=False),
}


@pytest.mark.parametrize("case", ONE_CYCLE)
def test_one_cycle_lr_and_momentum_match_torch(torch, case):
    settings = ONE_CYCLE[case]
    n_steps = settings.get("total_steps") or settings["epochs"] * settings["steps_per_epoch"]
    ours = PlainSGD(momentum=0.9)
    theirs = torch_optimizer(torch, momentum=0.9)
    expected = run(theirs, torch.optim.lr_scheduler.OneCycleLR(theirs, **settings), n_steps - 1, ("lr", "momentum"))
    got = run(ours, OneCycleLR(ours, **settings), n_steps - 1, ("lr", "momentum"))
    np.testing.assert_array_equal(got, expected)  # same closed form, same float operations


def test_one_cycle_cycles_adam_beta1_and_stops_after_total_steps(torch):
    ours = PlainSGD(betas=(0.9, 0.999))
    theirs = torch_optimizer(torch, kind="adam", betas=(0.9, 0.999))
    expected = run(theirs, torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.01, total_steps=50), 49, ("betas",))
    ours_scheduler = OneCycleLR(ours, max_lr=0.01, total_steps=50)
    np.testing.assert_array_equal(run(ours, ours_scheduler, 49, ("betas",)), expected)
    assert ours.param_groups[0]["betas"][1] == 0.999
    with pytest.raises(ValueError, match="total_steps"):
        ours_scheduler.step()


def _copy_optimizer_state(source, target):
    """What an optimizer state dict carries for schedulers: every group setting but the params."""
    for src, dst in zip(source.param_groups, target.param_groups):
        dst.update({k: v for k, v in src.items() if k != "params"})


@pytest.mark.parametrize("case", [*CASES, "OneCycleLR"])
def test_state_dict_round_trip_mid_run_continues_identically(case):
    if case == "OneCycleLR":
        build, n_steps = (lambda lib, opt: OneCycleLR(opt, max_lr=0.5, total_steps=400, three_phase=True)), 399
    else:
        build, n_steps = CASES[case]
    n_steps = min(n_steps, 1200)
    first_opt = PlainSGD(momentum=0.9)
    uninterrupted = run(first_opt, build(_Npcpu, first_opt), n_steps)

    half = n_steps // 2
    before_opt = PlainSGD(momentum=0.9)
    before = build(_Npcpu, before_opt)
    run(before_opt, before, half - 1)  # ends with `half` scheduler steps taken
    saved = json.loads(json.dumps(before.state_dict()))

    resumed_opt = PlainSGD(momentum=0.9)
    resumed = build(_Npcpu, resumed_opt)
    _copy_optimizer_state(before_opt, resumed_opt)
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == before.get_last_lr()
    np.testing.assert_array_equal(run(resumed_opt, resumed, n_steps - half), uninterrupted[half:])


def test_lambda_lr_state_dict_saves_no_functions():
    opt = PlainSGD()
    state = LambdaLR(opt, lambda t: 0.5).state_dict()
    assert state["lr_lambdas"] == [None, None]
    json.dumps(state)


def test_last_epoch_resume_gives_the_closed_form_at_the_next_step():
    opt = PlainSGD()
    StepLR(opt, step_size=3, gamma=0.5)
    for group in opt.param_groups:
        group["lr"] = 123.0  # the resumed scheduler recomputes it from initial_lr
    resumed = StepLR(opt, step_size=3, gamma=0.5, last_epoch=6)
    assert resumed.last_epoch == 7
    assert resumed.get_last_lr() == [lr * 0.25 for lr in LRS]


def test_invalid_arguments_are_rejected_with_clear_errors():
    with pytest.raises(TypeError, match="param_groups"):
        StepLR(object(), step_size=3)
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(PlainSGD(), step_size=3, last_epoch=5)
    with pytest.raises(ValueError, match="start_factor"):
        LinearLR(PlainSGD(), start_factor=0.0)
    with pytest.raises(ValueError, match="end_factor"):
        LinearLR(PlainSGD(), end_factor=1.5)
    with pytest.raises(ValueError, match="step_size"):
        StepLR(PlainSGD(), step_size=0)
    with pytest.raises(ValueError, match="half_period"):
        CosineAnnealingLR(PlainSGD(), T_max=0)
    with pytest.raises(ValueError, match="expected 2 values of lr_lambda"):
        LambdaLR(PlainSGD(), [lambda t: 1.0])
    with pytest.raises(ValueError, match="total_steps, or epochs"):
        OneCycleLR(PlainSGD(momentum=0.9), max_lr=0.1)
    with pytest.raises(ValueError, match="cycle_momentum"):
        OneCycleLR(PlainSGD(), max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="anneal_strategy"):
        OneCycleLR(PlainSGD(momentum=0.9), max_lr=0.1, total_steps=10, anneal_strategy="exp")
    opt, other = PlainSGD(), PlainSGD()
    with pytest.raises(ValueError, match="another optimizer"):
        SequentialLR(opt, [StepLR(opt, 3), StepLR(other, 3)], milestones=[5])
    with pytest.raises(ValueError, match="milestones"):
        SequentialLR(opt, [StepLR(opt, 3), StepLR(opt, 3)], milestones=[])
    with pytest.raises(ValueError, match="expected keys"):
        StepLR(PlainSGD(), 3).load_state_dict({"last_epoch": 3})
