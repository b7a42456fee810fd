"""DynamicLossScaler: the finiteness/unscale kernel against NumPy, a scripted run against
torch.amp.GradScaler("cpu") (scale sequence, skip decisions, gradients, parameters), state round trips."""

import json

import numpy as np
import pytest

from npcpu.kernels.grads import EXPONENT_MASKS, unscale_and_count_nonfinite
from npcpu.nn.parameter import Parameter
from npcpu.optim.clip import clip_grad_norm
from npcpu.optim.scaling import DynamicLossScaler

# ---------------------------------------------------------------- kernel twin

SPECIAL_BITS = {
    np.float32: [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x3F800000,
                 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF],
    np.float64: [0x0, 0x8000000000000000, 0x1, 0x000FFFFFFFFFFFFF, 0x0010000000000000, 0x3FF0000000000000,
                 0x7FEFFFFFFFFFFFFF, 0xFFEFFFFFFFFFFFFF, 0x7FF0000000000000, 0xFFF0000000000000,
                 0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FFFFFFFFFFFFFFF,
                 0xFFFFFFFFFFFFFFFF],
}


def unscale_and_count_nonfinite_twin(values, inv_scale):
    """What the kernel computes: the count of entries that are not finite, and values * inv_scale."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values if inv_scale == 1 else values * inv_scale
    return int(np.sum(~np.isfinite(values))), scaled


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inv_scale", [2.0**-13, 1 / 3, 1.0, 8.0])
def test_unscale_kernel_matches_numpy_on_special_and_random_bits(num_threads, dtype, inv_scale):
    bits_dtype = EXPONENT_MASKS[np.dtype(dtype)].dtype
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, np.iinfo(bits_dtype).max, size=40_009, dtype=bits_dtype, endpoint=True)
    bits = np.concatenate([np.array(SPECIAL_BITS[dtype], dtype=bits_dtype), random_bits])
    values = bits.view(dtype)
    expected_count, expected = unscale_and_count_nonfinite_twin(values.copy(), dtype(inv_scale))
    got = values.copy()
    count = unscale_and_count_nonfinite(got, got.view(bits_dtype), EXPONENT_MASKS[np.dtype(dtype)], dtype(inv_scale))
    assert count == expected_count > 0
    np.testing.assert_array_equal(got, expected)  # NaN positions equal; subnormals not flushed
    if inv_scale == 1.0:
        np.testing.assert_array_equal(got.view(bits_dtype), bits)  # untouched, signalling NaNs too


# ---------------------------------------------------------------- parity with torch's GradScaler

SHAPES = [(3, 4), (5,), (2, 2, 3)]


class PlainSGD:
    """A stand-in optimizer over Parameters: ``p -= lr * grad``."""

    def __init__(self, params, lr):
        self.param_groups = [{"params": list(params), "lr": lr}]

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.frozen:
                    p.data -= np.float32(group["lr"]) * p.grad

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.zero_grad()


# Non-finite entries injected per iteration: {iteration: [(tensor index, flat position, value)]}.
INJECTED = {
    3: [(0, 5, np.inf)],
    4: [(2, 0, -np.inf)],
    8: [(1, 4, np.nan)],
    9: [(0, 0, np.nan), (2, 11, np.inf)],
    15: [(1, 0, np.inf)],
    16: [(1, 1, -np.inf)],
    23: [(2, 3, np.nan)],
}
N_ITERATIONS = 30


def upstream_gradients(iteration):
    """The per-parameter dL/dp of one iteration (float32), with the scripted Inf/NaN entries."""
    rng = np.random.default_rng(100 + iteration)
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    for index, position, value in INJECTED.get(iteration, []):
        grads[index].reshape(-1)[position] = value
    return grads


def run_npcpu(scaler, params, optimizer, iterations, clip_every=2):
    trace = []
    for it in iterations:
        optimizer.zero_grad()
        for p, g in zip(params, upstream_gradients(it)):
            p.grad_buffer()[...] += scaler.scale_loss_grad(g)  # what model.backward accumulates
        if it % clip_every == 0:
            scaler.unscale_(optimizer)
            clip_grad_norm(params, 5.0)
        stepped = scaler.step(optimizer)
        scaler.update()
        trace.append((stepped, scaler.get_scale(), scaler.state_dict()["_growth_tracker"],
                      [p.grad.copy() for p in params], [p.data.copy() for p in params]))
    return trace


def run_torch(torch, settings, iterations, clip_every=2):
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **settings)
    trace = []
    for it in iterations:
        optimizer.zero_grad()
        upstream = [torch.from_numpy(g) for g in upstream_gradients(it)]
        loss = sum((p * g).sum() for p, g in zip(params, upstream))
        scaler.scale(loss).backward()
        if it % clip_every == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
        before = [p.detach().clone() for p in params]
        scaler.step(optimizer)
        stepped = any(not torch.equal(b, p) for b, p in zip(before, params))
        scaler.update()
        trace.append((stepped, scaler.get_scale(), scaler._get_growth_tracker(),
                      [p.grad.numpy().copy() for p in params], [p.detach().numpy().copy() for p in params]))
    return trace


SETTINGS = {
    "powers-of-two": dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
    "odd-factors": dict(init_scale=1000.0, growth_factor=1.7, backoff_factor=0.3, growth_interval=2),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_scripted_run_matches_torch_grad_scaler(torch, name):
    settings = SETTINGS[name]
    params = [Parameter(np.zeros(shape, np.float32)) for shape in SHAPES]
    scaler = DynamicLossScaler(**settings)
    ours = run_npcpu(scaler, params, PlainSGD(params, lr=0.1), range(N_ITERATIONS))
    theirs = run_torch(torch, settings, range(N_ITERATIONS))
    for it, (got, expected) in enumerate(zip(ours, theirs)):
        assert got[:3] == expected[:3], f"iteration {it}: (stepped, scale, growth_tracker)"
        for g, e in zip(got[3], expected[3]):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7, err_msg=f"iteration {it}: unscaled grads")
        for g, e in zip(got[4], expected[4]):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=f"iteration {it}: parameters")
    skipped = [it for it, (stepped, *_) in enumerate(ours) if not stepped]
    assert skipped == sorted(INJECTED) and scaler.skipped_steps == len(INJECTED)


def test_scale_stops_growing_where_float32_overflows(torch):
    settings = dict(init_scale=2.0**125, growth_interval=1)
    p = Parameter(np.zeros(4, np.float32))
    ours = DynamicLossScaler(**settings)
    theirs = torch.amp.GradScaler("cpu", **settings)
    tp = torch.nn.Parameter(torch.zeros(4))
    torch_sgd = torch.optim.SGD([tp], lr=0.0)
    ours_scales, torch_scales = [], []
    for _ in range(4):
        p.grad = ours.scale_loss_grad(np.full(4, 1e-3, np.float32))
        ours.step(PlainSGD([p], lr=0.0))
        ours.update()
        ours_scales.append(ours.scale)
        torch_sgd.zero_grad()
        theirs.scale((tp * 1e-3).sum()).backward()
        theirs.step(torch_sgd)
        theirs.update()
        torch_scales.append(theirs.get_scale())
    assert ours_scales == torch_scales == [2.0**126, 2.0**127, 2.0**127, 2.0**127]


def test_state_dict_round_trip_mid_run_continues_identically(torch):
    settings = SETTINGS["odd-factors"]

    def fresh():
        params = [Parameter(np.zeros(shape, np.float32)) for shape in SHAPES]
        return params, PlainSGD(params, lr=0.1)

    params, optimizer = fresh()
    uninterrupted = run_npcpu(DynamicLossScaler(**settings), params, optimizer, range(N_ITERATIONS))
    params, optimizer = fresh()
    first = DynamicLossScaler(**settings)
    run_npcpu(first, params, optimizer, range(12))
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = DynamicLossScaler()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    continued = run_npcpu(resumed, params, optimizer, range(12, N_ITERATIONS))
    assert [t[:3] for t in continued] == [t[:3] for t in uninterrupted[12:]]

    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(saved)  # the keys are torch's
    assert theirs.get_scale() == first.get_scale()


def test_unscale_then_step_skips_without_touching_parameters_and_frozen_are_ignored():
    live, frozen = Parameter(np.ones(4, np.float32)), Parameter(np.ones(3, np.float32))
    frozen.frozen = True
    frozen.grad = np.array([np.inf, 1.0, 2.0], np.float32)
    live.grad = np.full(4, 8.0, np.float32)
    optimizer = PlainSGD([live, frozen], lr=1.0)
    scaler = DynamicLossScaler(init_scale=4.0)
    assert scaler.unscale_(optimizer) is False
    np.testing.assert_array_equal(live.grad, 2.0)
    np.testing.assert_array_equal(frozen.grad, [np.inf, 1.0, 2.0])
    assert scaler.step(optimizer) is True
    np.testing.assert_array_equal(live.data, -1.0)

    scaler.update()
    live.grad[1] = np.nan
    assert scaler.step(optimizer) is False
    np.testing.assert_array_equal(live.data, -1.0)
    scaler.update()
    assert scaler.scale == 2.0 and scaler.skipped_steps == 1


def test_float64_gradients_are_unscaled_in_float64():
    p = Parameter(np.zeros(5))
    p.grad = np.full(5, 3.0 * 2.0**16)
    scaler = DynamicLossScaler()
    assert scaler.unscale_([p]) is False and p.grad.dtype == np.float64
    np.testing.assert_array_equal(p.grad, 3.0)


def test_call_order_errors_match_torch():
    p = Parameter(np.zeros(2, np.float32))
    p.grad = np.ones(2, np.float32)
    optimizer = PlainSGD([p], lr=0.1)
    scaler = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="no unscale_"):
        scaler.update()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.step(optimizer)
    scaler.update()
    scaler.update(new_scale=8.0)
    assert scaler.scale == 8.0


def test_disabled_scaler_passes_through():
    p = Parameter(np.zeros(2, np.float32))
    p.grad = np.array([np.inf, 1.0], np.float32)
    optimizer = PlainSGD([p], lr=1.0)
    scaler = DynamicLossScaler(enabled=False)
    dlogits = np.ones(3, np.float32)
    assert scaler.scale_loss_grad(dlogits) is dlogits and scaler.scale == 1.0
    assert scaler.unscale_(optimizer) is False and scaler.step(optimizer) is True
    scaler.update()
    assert scaler.state_dict() == {}


def test_scale_loss_grad_keeps_dtype():
    scaler = DynamicLossScaler(init_scale=3.0)
    out = scaler.scale_loss_grad(np.full(4, 0.5, np.float32))
    assert out.dtype == np.float32 and np.all(out == 1.5)
    with pytest.raises(TypeError, match="floating-point array"):
        scaler.scale_loss_grad(np.ones(2, np.int64))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init_scale=0.0), ValueError, "init_scale must be > 0"),
    (dict(init_scale=float("inf")), ValueError, "init_scale"),
    (dict(init_scale=1e39), ValueError, "finite in float32"),
    (dict(growth_factor=1.0), ValueError, "growth_factor must be > 1"),
    (dict(backoff_factor=1.0), ValueError, r"backoff_factor must be in \(0, 1\)"),
    (dict(backoff_factor=0.0), ValueError, r"backoff_factor must be in \(0, 1\)"),
    (dict(growth_interval=0), ValueError, "growth_interval must be >= 1"),
    (dict(growth_interval=2.5), TypeError, "growth_interval must be an integer"),
])
def test_invalid_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicLossScaler(**kwargs)
