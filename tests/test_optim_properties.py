"""One table of optimizers drives the property tests; plus the kernels against plain NumPy twins."""

import numpy as np
import pytest

from npcpu.kernels import optim as kernels
from npcpu.kernels.optim_io import Rounding, random_scratch
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.lamb import LAMB
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16

OPTIMIZERS = {
    "sgd": lambda p, **kw: SGD(p, lr=0.05, **kw),
    "sgd_nesterov_decay": lambda p, **kw: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, **kw),
    "adam": lambda p, **kw: Adam(p, lr=0.01, **kw),
    "adam_amsgrad_decay": lambda p, **kw: Adam(p, lr=0.01, amsgrad=True, weight_decay=0.1, **kw),
    "adamw": lambda p, **kw: AdamW(p, lr=0.01, **kw),
    "lamb": lambda p, **kw: LAMB(p, lr=0.01, **kw),
    "lookahead_adam": lambda p, **kw: Lookahead(Adam(p, lr=0.01, **kw), k=3, alpha=0.5),
}
SHAPES = [(7, 5), (5,), (3, 7)]


def make_params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(shape).astype(np.float32).astype(dtype)) for shape in SHAPES]


def set_gradients(params, t):
    for i, p in enumerate(params):
        w = p.values()
        p.grad = (0.3 * (i + 1) * w + np.sin(w + t)).astype(p.compute_dtype)


def train(optimizer, params, steps, start=0):
    for t in range(start, start + steps):
        set_gradients(params, t)
        optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, bfloat16, np.float16], ids=str)
def test_parameter_dtype_is_preserved(name, dtype):
    params = make_params(dtype)
    optimizer = OPTIMIZERS[name](params)
    before = [p.data.copy() for p in params]
    train(optimizer, params, 4)
    for p, b in zip(params, before):
        assert p.data.dtype == np.dtype(dtype)
        assert p.data.flags.c_contiguous
        assert not np.array_equal(p.data, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_and_gradless_parameters_are_left_alone(name):
    params = make_params()
    optimizer = OPTIMIZERS[name](params)
    inner = getattr(optimizer, "optimizer", optimizer)
    params[0].frozen = True
    frozen, gradless = params[0].data.copy(), params[1].data.copy()
    for t in range(6):
        set_gradients(params, t)
        params[1].grad = None
        optimizer.step()
    np.testing.assert_array_equal(params[0].data, frozen)
    np.testing.assert_array_equal(params[1].data, gradless)
    assert sorted(inner.state) == [2]
    assert inner.state[2]["step"] == 6


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_mid_training_is_bitwise(name, state_dtype):
    params = make_params()
    optimizer = OPTIMIZERS[name](params, state_dtype=state_dtype)
    train(optimizer, params, 50)
    saved_params = [p.data.copy() for p in params]
    saved = optimizer.state_dict()
    train(optimizer, params, 50, start=50)

    fresh = make_params(seed=99)
    for p, w in zip(fresh, saved_params):
        p.data[...] = w
    reloaded = OPTIMIZERS[name](fresh, state_dtype=state_dtype)
    reloaded.load_state_dict(saved)
    train(reloaded, fresh, 50, start=50)
    for a, b in zip(params, fresh):
        np.testing.assert_array_equal(a.data, b.data)
    inner_saved = saved.get("optimizer", saved)
    if state_dtype == "bf16" and not name.startswith("sgd"):
        assert inner_saved["state"][0]["exp_avg"].dtype == bfloat16


def test_state_dict_round_trip_with_bf16_params_and_master_weights():
    for master in (False, True):
        runs = []
        for reload in (False, True):
            params = make_params(bfloat16)
            optimizer = Adam(params, lr=0.01, state_dtype="bf16", master_weights=master, seed=5)
            train(optimizer, params, 20)
            if reload:
                saved, values = optimizer.state_dict(), [p.data.copy() for p in params]
                params = make_params(bfloat16, seed=3)
                for p, w in zip(params, values):
                    p.data[...] = w
                optimizer = Adam(params, lr=0.01, state_dtype="bf16", master_weights=master, seed=0)
                optimizer.load_state_dict(saved)
            train(optimizer, params, 20, start=20)
            runs.append([p.data.view(np.uint16).copy() for p in params])
            assert ("master_param" in optimizer.state[0]) == master
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)


def test_load_state_dict_rejects_mismatches_by_name():
    params = make_params()
    optimizer = Adam(params, lr=0.01)
    train(optimizer, params, 2)
    good = optimizer.state_dict()

    def broken(edit):
        state = optimizer.state_dict()
        edit(state)
        return state

    cases = [
        (lambda s: s["state"][0].__setitem__("exp_avg", np.zeros((5, 7), np.float32)), "exp_avg: expected shape"),
        (lambda s: s["state"][0].__setitem__("exp_avg", np.zeros((7, 5), np.float64)), "exp_avg: expected dtype"),
        (lambda s: s["state"][0].__setitem__("exp_avg", s["state"][0]["exp_avg"].astype(bfloat16)), "expected dtype"),
        (lambda s: s["state"][1].pop("exp_avg_sq"), "expected fields"),
        (lambda s: s["param_groups"][0]["params"].pop(), "expected 3 params"),
        (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "expected 1 groups"),
        (lambda s: s["param_groups"][0].__setitem__("lr", -1.0), "lr"),
        (lambda s: s.__setitem__("state_dtype", "bf16"), "state_dtype"),
        (lambda s: s.pop("seed"), "seed"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            optimizer.load_state_dict(broken(edit))
    optimizer.load_state_dict(good)  # and a failed load changed nothing that a good one needs


BAD_SETTINGS = [
    (SGD, dict(lr=-0.1), ValueError, "lr"),
    (SGD, dict(lr=float("inf")), ValueError, "lr"),
    (SGD, dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
    (SGD, dict(lr=0.1, momentum=-0.5), ValueError, "momentum"),
    (SGD, dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay"),
    (Adam, dict(lr=float("nan")), ValueError, "lr"),
    (Adam, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (Adam, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (Adam, dict(betas=0.9), ValueError, "betas"),
    (Adam, dict(eps=0.0), ValueError, "eps"),
    (AdamW, dict(weight_decay=-0.01), ValueError, "weight_decay"),
    (Adam, dict(lr="0.1"), TypeError, "lr"),
    (Adam, dict(state_dtype="fp16"), ValueError, "state_dtype"),
    (LAMB, dict(eps=-1e-6), ValueError, "eps"),
    (LAMB, dict(weight_norm_clamp=(2.0, 1.0)), ValueError, "weight_norm_clamp"),
]


@pytest.mark.parametrize("cls, kwargs, error, field", BAD_SETTINGS)
def test_bad_hyperparameters_are_named(cls, kwargs, error, field):
    with pytest.raises(error, match=field):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW, LAMB])
def test_bad_parameter_lists_are_named(cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])
    with pytest.raises(TypeError, match="Parameter"):
        cls([np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="more than one place"):
        p = make_params()[0]
        cls([{"params": [p]}, {"params": [p]}])


def test_zero_grad_zeroes_every_gradient():
    params = make_params()
    optimizer = Lookahead(Adam(params))
    set_gradients(params, 0)
    optimizer.zero_grad()
    assert all(not p.grad.any() for p in params)


# ---------------------------------------------------------------------------------------------
# Kernels against plain NumPy twins (float64 arithmetic, then compared at float32 tolerance)
# ---------------------------------------------------------------------------------------------
def to_nearest():
    """The kernels' Rounding for round-to-nearest (float32 arrays ignore it altogether)."""
    return Rounding(stochastic=False, seed=np.uint64(0), stream=np.uint64(0), first=np.uint64(0),
                    random=random_scratch())


def twin_sgd(w, g, b, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    g = -g if maximize else g
    g = g + weight_decay * w
    if momentum != 0:
        b = g.copy() if first_step else momentum * b + (1 - dampening) * g
        g = g + momentum * b if nesterov else b
    return w - lr * g, b


def twin_adam(w, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, t):
    g = -g if maximize else g
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    vmax = np.maximum(vmax, v) if amsgrad else vmax
    denom = np.sqrt(vmax if amsgrad else v) / np.sqrt(1 - beta2 ** t) + eps
    return w - lr / (1 - beta1 ** t) * m / denom, m, v, vmax


@pytest.mark.parametrize("n", [1, 7, 1001, 40_003])
@pytest.mark.parametrize("options", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.2, weight_decay=0.1),
                                     dict(momentum=0.9, nesterov=True, maximize=True)], ids=str)
def test_sgd_kernel_matches_numpy(num_threads, n, options):
    rng = np.random.default_rng(n)
    w, g, b = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    full = {**dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False), **options}
    f32 = np.float32
    for first_step in (True, False):
        expected_w, expected_b = twin_sgd(w.astype(np.float64), g.astype(np.float64), b.astype(np.float64),
                                          0.1, first_step=first_step, **full)
        w_out, b_out = w.copy(), b.copy()
        buffer = b_out if full["momentum"] else None  # the kernel takes None for "no momentum"
        hyper = kernels.SGDHyper(lr=f32(0.1), momentum=f32(full["momentum"]),
                                 one_minus_dampening=f32(1 - full["dampening"]),
                                 weight_decay=f32(full["weight_decay"]), nesterov=full["nesterov"],
                                 maximize=full["maximize"], first_step=first_step)
        kernels.sgd_step(w_out, g, buffer, hyper, to_nearest())
        np.testing.assert_allclose(w_out, expected_w, rtol=1e-5, atol=1e-6)
        if full["momentum"]:
            np.testing.assert_allclose(b_out, expected_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 1001, 40_003])
@pytest.mark.parametrize("decoupled, amsgrad, maximize", [(False, False, False), (False, True, True),
                                                          (True, True, False)])
def test_adam_kernel_matches_numpy(num_threads, n, decoupled, amsgrad, maximize):
    rng = np.random.default_rng(n)
    w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v, vmax = (np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(2))
    lr, beta1, beta2, eps, wd, t = 0.01, 0.9, 0.99, 1e-8, 0.1, 3
    expected = twin_adam(*(a.astype(np.float64) for a in (w, g, m, v, vmax)), lr, beta1, beta2, eps, wd,
                         decoupled, amsgrad, maximize, t)
    out = [a.copy() for a in (w, m, v, vmax)]
    f32 = np.float32
    hyper = kernels.AdamHyper(one_minus_beta1=f32(1 - beta1), beta2=f32(beta2), one_minus_beta2=f32(1 - beta2),
                              eps=f32(eps), weight_decay=f32(0.0 if decoupled else wd),
                              decay_factor=f32(1 - lr * wd if decoupled else 1.0),
                              step_size=f32(lr / (1 - beta1 ** t)),
                              bias_correction2_sqrt=f32((1 - beta2 ** t) ** 0.5), maximize=maximize)
    kernels.adam_step(out[0], g, out[1], out[2], out[3] if amsgrad else None, hyper, to_nearest())
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 2 * kernels.BLOCK + 1, 40_003])
def test_lamb_kernels_match_numpy(num_threads, n):
    rng = np.random.default_rng(n)
    w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    beta1, beta2, eps, wd, bc1, bc2 = 0.9, 0.999, 1e-6, 0.01, 0.19, 0.002997
    w64, m64 = w.astype(np.float64), 0.9 * m.astype(np.float64) + 0.1 * g
    v64 = beta2 * v.astype(np.float64) + (1 - beta2) * g.astype(np.float64) ** 2
    u64 = (m64 / bc1) / (np.sqrt(v64 / bc2) + eps) + wd * w64
    out_m, out_v, out_w = m.copy(), v.copy(), w.copy()
    f32 = np.float32
    partial = np.empty((2, kernels.block_count(n)))
    hyper = kernels.LambHyper(one_minus_beta1=f32(1 - beta1), beta2=f32(beta2), one_minus_beta2=f32(1 - beta2),
                              eps=f32(eps), weight_decay=f32(wd), inverse_bias_correction1=f32(1 / bc1),
                              inverse_bias_correction2=f32(1 / bc2), maximize=False)
    weight_sq, update_sq = kernels.lamb_moments(out_w, g, out_m, out_v, hyper, to_nearest(), partial)
    np.testing.assert_allclose(out_m, m64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_v, v64, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weight_sq, np.sum(w64 ** 2), rtol=1e-6)
    np.testing.assert_allclose(update_sq, np.sum(u64 ** 2), rtol=1e-4)
    kernels.lamb_apply(out_w, out_m, out_v, f32(0.01), hyper, to_nearest())
    np.testing.assert_allclose(out_w, w64 - 0.01 * u64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 40_003])
def test_lookahead_kernel_matches_numpy(num_threads, n):
    rng = np.random.default_rng(n)
    fast, slow = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    expected = slow.astype(np.float64) + 0.3 * (fast.astype(np.float64) - slow)
    fast_out, slow_out = fast.copy(), slow.copy()
    kernels.lookahead_sync(fast_out, slow_out, np.float32(0.3), to_nearest())
    # inputs are O(1): results that cancel to near 0 carry an O(1) float32 ulp (1.2e-7) of error
    np.testing.assert_allclose(slow_out, expected, rtol=1e-6, atol=3e-7)
    np.testing.assert_array_equal(fast_out, slow_out)
