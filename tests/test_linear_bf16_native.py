"""Linear and FusedLinearReLU on the native bf16 GEMMs: what they compute (a NumPy twin), the
update-inside-backward block loop, and a short training run beside the widened path and fp32.

On the native path the layer rounds x (forward) and dz = dL/d(x W^T + b) (backward) to bfloat16;
the twin does the same in NumPy and sums in float64, so the layer must match it within float32
summation order."""

import numpy as np
import pytest

from npcpu.nn import weight_blocks
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam
from npcpu.precision import bfloat16

TOLERANCE = 2e-5  # relative to the sum of |products|, float32 summation order


def rounded(a):
    return a.astype(np.float32).astype(bfloat16).astype(np.float64)


def assert_close(actual, expected, magnitude):
    np.testing.assert_array_less(np.abs(actual - expected), TOLERANCE * magnitude + 1e-30)


@pytest.mark.parametrize("layer_class", [Linear, FusedLinearReLU])
@pytest.mark.parametrize("n, k, m", [(1, 1, 1), (7, 13, 5), (33, 101, 47)])
def test_layer_matches_its_numpy_twin(native_bf16_gemm, num_threads, layer_class, n, k, m):
    layer = layer_class(k, m, seed=1)
    layer.set_precision("bf16")
    layer.input_requires_grad = True
    rng = np.random.default_rng(n + k + m)
    x = rng.standard_normal((n, k)).astype(np.float32)
    dy = rng.standard_normal((n, m)).astype(np.float32)
    w, b = rounded(layer.weight.data), layer.bias.values().astype(np.float64)
    xr = rounded(x)

    y = layer.forward(x)
    z = xr @ w.T + b
    expected_y = np.maximum(z, 0) if layer_class is FusedLinearReLU else z
    assert_close(y, expected_y, np.abs(xr) @ np.abs(w).T + np.abs(b))

    dx = layer.backward(dy)
    dz = np.where(z > 0, dy, 0) if layer_class is FusedLinearReLU else dy
    dzr = rounded(dz)
    assert_close(dx, dzr @ w, np.abs(dzr) @ np.abs(w))
    assert_close(layer.weight.grad, dzr.T @ xr, np.abs(dzr).T @ np.abs(xr))
    np.testing.assert_allclose(layer.bias.grad, dz.sum(0), rtol=1e-5, atol=1e-5)  # from float32 dz


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(weight_blocks, "BLOCK_ELEMENTS", 32)


def _adam_step_in_bf16(layer, x, dy, in_backward, state_dtype):
    """One forward, backward and Adam step of `layer` in bf16 (the update inside backward, or after
    it); returns dL/dx."""
    layer.set_precision("bf16")
    layer.input_requires_grad = True
    optimizer = Adam(layer.parameters(), lr=1e-2, state_dtype=state_dtype)
    if in_backward:
        optimizer.fuse_into_backward()
    layer.forward(x)
    dx = layer.backward(dy)
    if not in_backward:
        optimizer.step()
    return dx


@pytest.mark.parametrize("layer_class", [Linear, FusedLinearReLU])
def test_update_inside_backward_matches_step_after_backward(native_bf16_gemm, small_blocks,
                                                            num_threads, layer_class):
    """Blocks of 4 rows (4, 4, 2): dx summed over blocks and each block's dW handed to Adam give
    what one dx GEMM, one dW GEMM and Adam's step give."""
    assert weight_blocks.block_rows(10, 7) == 4
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    dy = rng.standard_normal((5, 10)).astype(np.float32)
    results = []
    for in_backward in (False, True):
        layer = layer_class(7, 10, seed=0)
        dx = _adam_step_in_bf16(layer, x, dy, in_backward, state_dtype="fp32")
        results.append((dx, layer.weight.data.astype(np.float32)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(results[1][1], results[0][1])


@pytest.mark.parametrize("in_backward", [False, True])
def test_the_weight_is_never_widened(native_bf16_gemm, monkeypatch, in_backward):
    from npcpu.kernels import convert
    widened = []
    original = convert.bf16_to_f32

    def recording(x, *args, **kwargs):
        widened.append(x.shape)
        return original(x, *args, **kwargs)
    monkeypatch.setattr(convert, "bf16_to_f32", recording)
    _adam_step_in_bf16(FusedLinearReLU(40, 24, seed=0), np.ones((6, 40), np.float32),
                       np.ones((6, 24), np.float32), in_backward, state_dtype="bf16")
    assert not [shape for shape in widened if len(shape) == 2 and shape[1] == 40], widened


def _train(precision, steps=60, seed=0):
    """A 3-layer MLP on a fixed synthetic 10-class task, stopped while still learning; returns
    (loss, accuracy) on held-out samples."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1024, 64)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((64, 10)), axis=1)
    x, y, x_test, y_test = x[:512], y[:512], x[512:], y[512:]
    model = Sequential(FusedLinearReLU(64, 128, seed=1), FusedLinearReLU(128, 128, seed=2),
                       Linear(128, 10, seed=3))
    if precision != "fp32":
        model.set_precision(precision)
    optimizer = Adam(model.parameters(), lr=3e-3, state_dtype="fp32")
    loss_fn = CrossEntropyLoss()
    for step in range(steps):
        batch = rng.integers(0, len(x), 64)
        loss_fn(model.forward(x[batch]), y[batch])
        model.backward(loss_fn.backward())
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    logits = model.forward(x_test)
    return float(loss_fn(logits, y_test)), float(np.mean(np.argmax(logits, axis=1) == y_test))


def test_short_training_native_matches_widened_and_fp32(native_bf16_gemm):
    from npcpu import backend
    native = _train("bf16")
    backend.set_bf16_gemm("widened")
    widened = _train("bf16")
    fp32 = _train("fp32")
    assert native[1] > 0.4  # it learned (chance is 0.1)
    for reference in (widened, fp32):
        assert abs(native[1] - reference[1]) < 0.03, (native, widened, fp32)
        assert abs(native[0] - reference[0]) < 0.02 * reference[0], (native, widened, fp32)
