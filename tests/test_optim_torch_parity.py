"""Trajectory parity with torch.optim: 200 steps on three tensors, gradients from a fixed function."""

import numpy as np
import pytest

from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.sgd import SGD

SHAPES = [(7, 5), (5,), (3, 7)]
STEPS = 200


def initial_weights():
    rng = np.random.default_rng(1234)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def gradient(weights, t):
    """A fixed, deterministic gradient of the weights: a quadratic pull toward a target plus a wave.

    g = c * (w - target) + 0.1 sin(3 w) + 0.05 cos(t) , elementwise, in float32.
    """
    grads = []
    for i, w in enumerate(weights):
        target = np.linspace(-1, 1, w.size, dtype=np.float32).reshape(w.shape) * (i + 1)
        g = np.float32(0.5 + i) * (w - target) + np.float32(0.1) * np.sin(3 * w)
        grads.append((g + np.float32(0.05 * np.cos(t))).astype(np.float32))
    return grads


def run_both(torch, make_npcpu, make_torch, groups=None):
    """Run both optimizers for STEPS steps; return (npcpu weights, torch weights, npcpu, torch opt)."""
    start = initial_weights()
    params = [Parameter(w.copy()) for w in start]
    tensors = [torch.tensor(w.copy(), requires_grad=True) for w in start]
    if groups is None:
        ours, theirs = make_npcpu(params), make_torch(tensors)
    else:
        ours = make_npcpu([{**g, "params": [params[i] for i in g["params"]]} for g in groups])
        theirs = make_torch([{**g, "params": [tensors[i] for i in g["params"]]} for g in groups])
    for t in range(STEPS):
        step_both(torch, params, tensors, ours, theirs, t)
    return [p.data for p in params], [x.detach().numpy() for x in tensors], ours, theirs


def step_both(torch, params, tensors, ours, theirs, t):
    """Step t of both optimizers, each with `gradient` of its own current weights."""
    for p, g in zip(params, gradient([p.data for p in params], t)):
        p.grad = g
    for x, g in zip(tensors, gradient([x.detach().numpy() for x in tensors], t)):
        x.grad = torch.from_numpy(g)
    ours.step()
    theirs.step()


SGD_CASES = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "weight_decay": dict(lr=0.05, momentum=0.5, weight_decay=0.1),
    "maximize": dict(lr=0.01, momentum=0.9, maximize=True, weight_decay=0.01),
}
ADAM_CASES = {
    "adam": (Adam, dict(lr=0.01)),
    "adam_betas_eps": (Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
    "adam_weight_decay": (Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad": (Adam, dict(lr=0.01, amsgrad=True)),
    "adam_amsgrad_decay_maximize": (Adam, dict(lr=0.005, amsgrad=True, weight_decay=0.05, maximize=True)),
    "adamw": (AdamW, dict(lr=0.01)),
    "adamw_amsgrad": (AdamW, dict(lr=0.01, weight_decay=0.2, amsgrad=True)),
}


def assert_trajectories_match(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_matches_torch(torch, case):
    options = SGD_CASES[case]
    ours, theirs, opt, topt = run_both(torch, lambda p: SGD(p, **options),
                                       lambda p: torch.optim.SGD(p, **options))
    assert_trajectories_match(ours, theirs)
    if options.get("momentum"):
        for i in range(len(SHAPES)):
            np.testing.assert_allclose(opt.state[i]["momentum_buffer"],
                                       topt.state_dict()["state"][i]["momentum_buffer"].numpy(),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adam_matches_torch(torch, case):
    cls, options = ADAM_CASES[case]
    torch_cls = getattr(torch.optim, cls.__name__)
    ours, theirs, opt, topt = run_both(torch, lambda p: cls(p, **options),
                                       lambda p: torch_cls(p, **options))
    assert_trajectories_match(ours, theirs)
    torch_state = topt.state_dict()["state"]
    for i in range(len(SHAPES)):
        assert opt.state[i]["step"] == int(torch_state[i]["step"]) == STEPS
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if options.get("amsgrad") else ()):
            np.testing.assert_allclose(opt.state[i][name], torch_state[i][name].numpy(),
                                       rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "AdamW"])
def test_param_groups_with_their_own_lr_match_torch(torch, cls_name):
    cls = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls_name]
    defaults = dict(lr=0.01, momentum=0.9) if cls is SGD else dict(lr=0.01)
    groups = [{"params": [0, 2]}, {"params": [1], "lr": 0.05, "weight_decay": 0.1}]
    ours, theirs, opt, topt = run_both(torch, lambda g: cls(g, **defaults),
                                       lambda g: getattr(torch.optim, cls_name)(g, **defaults),
                                       groups=groups)
    assert_trajectories_match(ours, theirs)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.05]


def test_schedule_writing_lr_into_groups_matches_torch(torch):
    """A scheduler only writes group["lr"]; both optimizers must read it at every step."""
    start = initial_weights()
    params = [Parameter(w.copy()) for w in start]
    tensors = [torch.tensor(w.copy(), requires_grad=True) for w in start]
    ours, theirs = Adam(params, lr=0.01), torch.optim.Adam(tensors, lr=0.01)
    for t in range(50):
        for group in ours.param_groups + theirs.param_groups:
            group["lr"] = 0.01 * (1 - t / 50)
        step_both(torch, params, tensors, ours, theirs, t)
    assert_trajectories_match([p.data for p in params], [x.detach().numpy() for x in tensors])
