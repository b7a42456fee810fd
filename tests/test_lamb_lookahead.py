"""LAMB against a float64 transcription of arXiv 1904.00962 Algorithm 2; Lookahead against one of
arXiv 1907.08610 Algorithm 1."""

import numpy as np
import pytest

from npcpu.kernels import optim as kernels
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.lamb import LAMB
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16

SHAPES = [(7, 5), (5,), (3, 7)]


def initial_weights(dtype=np.float64):
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal(shape) for shape in SHAPES]
    weights[1][:] = 0  # a zero-initialized bias: ||w|| = 0, so its trust ratio must be 1
    return [w.astype(dtype) for w in weights]


def gradient(w, i, t):
    """A fixed gradient of the weights: a pull toward a target plus a wave, elementwise."""
    target = np.linspace(-1, 1, w.size).reshape(w.shape) * (i + 1)
    return ((0.5 + i) * (w - target) + 0.1 * np.sin(3 * w) + 0.05 * np.cos(t)).astype(w.dtype)


# ---------------------------------------------------------------------------------------------
# LAMB
# ---------------------------------------------------------------------------------------------
def lamb_reference(weights, steps, lr, beta1, beta2, eps, weight_decays, adaptations,
                   bias_correction=True, clamp=None):
    """Algorithm 2 of the LAMB paper, per tensor, in float64, written out plainly."""
    x = [w.astype(np.float64).copy() for w in weights]
    m = [np.zeros_like(w) for w in x]
    v = [np.zeros_like(w) for w in x]
    for t in range(1, steps + 1):
        for i in range(len(x)):
            g = gradient(x[i], i, t - 1)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1 ** t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2 ** t) if bias_correction else v[i]
            r = m_hat / (np.sqrt(v_hat) + eps)
            update = r + weight_decays[i] * x[i]
            weight_norm, update_norm = np.linalg.norm(x[i]), np.linalg.norm(update)
            if not adaptations[i] or weight_norm == 0 or update_norm == 0:
                trust = 1.0
            else:
                phi = weight_norm if clamp is None else min(max(weight_norm, clamp[0]), clamp[1])
                trust = phi / update_norm
            x[i] = x[i] - lr * trust * update
    return x


def run(optimizer, params, steps):
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = gradient(p.values(), i, t).astype(p.compute_dtype)
        optimizer.step()
    return [p.values() for p in params]


LAMB_CASES = {
    "defaults": dict(options={}, weight_decays=[0.01] * 3, adaptations=[True] * 3),
    "no_bias_correction": dict(options=dict(bias_correction=False), weight_decays=[0.01] * 3,
                               adaptations=[True] * 3),
    "clamped_weight_norm": dict(options=dict(weight_norm_clamp=(0.5, 2.0), weight_decay=0.1),
                                weight_decays=[0.1] * 3, adaptations=[True] * 3),
    "bias_excluded": dict(options=dict(weight_decay=0.1), weight_decays=[0.1, 0.0, 0.1],
                          adaptations=[True, False, True], exclude=1),
}


@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_matches_algorithm_2_in_float64(case):
    spec = LAMB_CASES[case]
    params = [Parameter(w) for w in initial_weights()]
    if "exclude" in spec:
        j = spec["exclude"]
        groups = [{"params": [p for i, p in enumerate(params) if i != j]},
                  {"params": [params[j]], "weight_decay": 0.0, "adaptation": False}]
    else:
        groups = params
    optimizer = LAMB(groups, lr=0.02, **spec["options"])
    ours = run(optimizer, params, 60)
    clamp = spec["options"].get("weight_norm_clamp")
    reference = lamb_reference(initial_weights(), 60, 0.02, 0.9, 0.999, 1e-6, spec["weight_decays"],
                               spec["adaptations"], spec["options"].get("bias_correction", True), clamp)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_lamb_float32_follows_the_float64_reference():
    params = [Parameter(w) for w in initial_weights(np.float32)]
    ours = run(LAMB(params, lr=0.02), params, 60)
    reference = lamb_reference(initial_weights(), 60, 0.02, 0.9, 0.999, 1e-6, [0.01] * 3, [True] * 3)
    for a, b in zip(ours, reference):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # float32 rounding over 60 steps


def test_lamb_trust_ratio_rules():
    (w,) = [Parameter(np.ones(4))]
    lamb = LAMB([w], weight_norm_clamp=(0.0, 1.0))
    group = lamb.param_groups[0]
    assert lamb.trust_ratio(0.0, 3.0, group) == 1.0
    assert lamb.trust_ratio(3.0, 0.0, group) == 1.0
    assert lamb.trust_ratio(3.0, 2.0, group) == 0.5  # phi clamps ||w|| = 3 to 1
    assert lamb.trust_ratio(3.0, 2.0, {**group, "adaptation": False}) == 1.0


def test_lamb_norms_do_not_depend_on_thread_count(num_threads):
    rng = np.random.default_rng(3)
    start = rng.standard_normal(3 * kernels.BLOCK + 17).astype(np.float32)
    results = {}
    import numba
    for threads in (1, num_threads):
        numba.set_num_threads(threads)
        p = Parameter(start.copy())
        run(LAMB([p], lr=0.01), [p], 3)
        results[threads] = p.data
    np.testing.assert_array_equal(results[1], results[num_threads])


# ---------------------------------------------------------------------------------------------
# Lookahead
# ---------------------------------------------------------------------------------------------
def sgd_reference(lr, momentum):
    def update(x, g, state, t):
        state["b"] = g.copy() if t == 1 else momentum * state["b"] + g
        return x - lr * state["b"]
    return update


def adam_reference(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    def update(x, g, state, t):
        state["m"] = beta1 * state.get("m", 0) + (1 - beta1) * g
        state["v"] = beta2 * state.get("v", 0) + (1 - beta2) * g * g
        return x - lr / (1 - beta1 ** t) * state["m"] / (np.sqrt(state["v"]) / np.sqrt(1 - beta2 ** t) + eps)
    return update


def lookahead_reference(weights, inner_update, k, alpha, steps):
    """Algorithm 1, two loops; returns the fast weights theta after every inner step."""
    phi = [w.copy() for w in weights]
    states = [{} for _ in weights]
    trajectory, t = [], 0
    while t < steps:
        theta = [p.copy() for p in phi]                          # theta_{t,0} = phi_{t-1}
        for _ in range(k):                                      # k steps of the inner optimizer
            t += 1
            theta = [inner_update(x, gradient(x, i, t - 1), states[i], t) for i, x in enumerate(theta)]
            if t % k:
                trajectory.append(theta)
            if t == steps:
                break
        else:
            phi = [p + alpha * (x - p) for p, x in zip(phi, theta)]  # phi_t = phi + alpha (theta - phi)
            trajectory.append(phi)                               # and theta_{t+1,0} = phi_t
    return trajectory


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_lookahead_matches_algorithm_1(inner):
    params = [Parameter(w) for w in initial_weights()]
    if inner == "sgd":
        optimizer, reference = SGD(params, lr=0.05, momentum=0.9), sgd_reference(0.05, 0.9)
    else:
        optimizer, reference = Adam(params, lr=0.05), adam_reference(0.05)
    lookahead = Lookahead(optimizer, k=4, alpha=0.6)
    expected = lookahead_reference(initial_weights(), reference, 4, 0.6, 18)
    for t in range(18):
        for i, p in enumerate(params):
            p.grad = gradient(p.data, i, t)
        lookahead.step()
        for a, b in zip(params, expected[t]):
            np.testing.assert_allclose(a.data, b, rtol=1e-12, atol=1e-14, err_msg=f"step {t + 1}")


def test_lookahead_slow_weights_start_at_wrap_time_and_groups_are_shared():
    params = [Parameter(w) for w in initial_weights()]
    optimizer = SGD(params, lr=0.1)
    lookahead = Lookahead(optimizer, k=3)
    assert lookahead.param_groups is optimizer.param_groups
    start = [p.data.copy() for p in params]
    params[0].data += 1.0  # changes after wrapping do not move the slow weights
    for i, w in enumerate(start):
        np.testing.assert_array_equal(lookahead.slow_weights[i], w)
    lookahead.param_groups[0]["lr"] = 0.0  # a schedule writing lr reaches the inner optimizer
    for p in params:
        p.grad = np.ones_like(p.data)
    before = [p.data.copy() for p in params]
    optimizer.step()
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.data, b)


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_slow_weights_swapped_restores_bit_exactly(dtype):
    params = [Parameter(w.astype(dtype)) for w in initial_weights(np.float32)]
    lookahead = Lookahead(Adam(params, lr=0.05), k=5, alpha=0.5)
    for t in range(7):
        for i, p in enumerate(params):
            p.grad = gradient(p.values(), i, t)
        lookahead.step()
    fast = [p.data.copy() for p in params]
    with lookahead.slow_weights_swapped():
        for i, p in enumerate(params):
            np.testing.assert_array_equal(p.values(), lookahead.slow_weights[i].astype(dtype).astype(np.float32))
        assert any(not np.array_equal(p.data, f) for p, f in zip(params, fast))
    for p, f in zip(params, fast):
        assert p.data.dtype == f.dtype
        np.testing.assert_array_equal(p.data.view(np.uint8), f.view(np.uint8))


def test_lookahead_skips_frozen_parameters():
    params = [Parameter(w) for w in initial_weights()]
    params[2].frozen = True
    lookahead = Lookahead(SGD(params, lr=0.1), k=2)
    frozen = params[2].data.copy()
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = gradient(p.data, i, t)
        lookahead.step()
    np.testing.assert_array_equal(params[2].data, frozen)


@pytest.mark.parametrize("kwargs, field", [(dict(k=0), "k"), (dict(k=2.5), "k"), (dict(alpha=0.0), "alpha"),
                                           (dict(alpha=1.5), "alpha"), (dict(alpha=float("nan")), "alpha")])
def test_lookahead_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Lookahead(SGD([Parameter(np.ones(3))], lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        Lookahead([Parameter(np.ones(3))])
