"""ReLU, GELU (both forms) and Tanh: kernels vs NumPy twins, gradient checks, torch parity, precision."""

import numpy as np
import pytest
from scipy.special import erf

from gradcheck import check_layer_gradients
from torchcheck import assert_forward_backward_match_torch
from npcpu.kernels import activations as kernels
from npcpu.nn.activations import GELU, ReLU, Tanh
from npcpu.precision import bfloat16

SIZES = [1, 7, 13, 1001]


# -- NumPy twins: what each kernel computes --------------------------------------------------------
def gelu_twin(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def gelu_grad_twin(x):
    return 0.5 * (1 + erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def gelu_tanh_twin(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_tanh_grad_twin(x):
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_kernels_match_numpy(n, dtype, num_threads):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    y, mask = np.empty_like(x), np.empty((n + 7) // 8, np.uint8)
    kernels.relu_forward(x, y, mask)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(mask, np.packbits(x > 0, bitorder="little"))
    dx = np.empty_like(dy)
    kernels.relu_backward(dy, mask, dx)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))


@pytest.mark.parametrize("forward, backward, value_twin, grad_twin", [
    (kernels.gelu_forward, kernels.gelu_backward, gelu_twin, gelu_grad_twin),
    (kernels.gelu_tanh_forward, kernels.gelu_tanh_backward, gelu_tanh_twin, gelu_tanh_grad_twin),
    (kernels.tanh_forward, None, np.tanh, None)], ids=["gelu", "gelu_tanh", "tanh"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smooth_kernels_match_numpy(forward, backward, value_twin, grad_twin, n, dtype, num_threads):
    rng = np.random.default_rng(1)
    x, dy = 3 * rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    y = np.empty_like(x)
    forward(x, y)
    np.testing.assert_allclose(y, value_twin(x.astype(np.float64)), rtol=rtol, atol=rtol)
    dx = np.empty_like(dy)
    if backward is None:  # tanh backward works from the output
        kernels.tanh_backward(y, dy, dx)
        expected = dy * (1 - y.astype(np.float64) ** 2)
    else:
        backward(x, dy, dx)
        expected = dy * grad_twin(x.astype(np.float64))
    np.testing.assert_allclose(dx, expected, rtol=rtol, atol=rtol)


# -- layers ----------------------------------------------------------------------------------------
LAYERS = {
    "relu": (ReLU, lambda torch: torch.nn.ReLU()),
    "gelu": (GELU, lambda torch: torch.nn.GELU()),
    "gelu_tanh": (lambda: GELU("tanh"), lambda torch: torch.nn.GELU(approximate="tanh")),
    "tanh": (Tanh, lambda torch: torch.nn.Tanh()),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(1, 3), (7, 13), (2, 3, 5)])
def test_gradients_match_finite_differences(name, shape):
    rng = np.random.default_rng(2)
    check_layer_gradients(LAYERS[name][0](), rng.standard_normal(shape), rng)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(1, 3), (7, 13), (2, 3, 5), (11,)])
def test_forward_and_backward_match_torch(torch, name, shape):
    rng = np.random.default_rng(3)
    layer, reference = LAYERS[name][0](), LAYERS[name][1](torch)
    x = 3 * rng.standard_normal(shape).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)
    assert_forward_backward_match_torch(torch, layer, reference, x, upstream)


@pytest.mark.parametrize("name, saved", [("gelu", "_saved_input"), ("gelu_tanh", "_saved_input"),
                                         ("tanh", "_saved_output")])
@pytest.mark.parametrize("precision, storage", [("bf16", bfloat16), ("fp16", np.dtype(np.float16))])
def test_half_precision_stash_and_closeness(name, saved, precision, storage):
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((6, 9)).astype(np.float32), rng.standard_normal((6, 9)).astype(np.float32)
    reference, layer = LAYERS[name][0](), LAYERS[name][0]().set_precision(precision)
    reference.input_requires_grad = layer.input_requires_grad = True
    y_ref, y = reference.forward(x), layer.forward(x)
    assert getattr(layer, saved).dtype == storage and y.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)  # forward itself runs in float32
    np.testing.assert_allclose(layer.backward(dy), reference.backward(dy), rtol=2e-2, atol=2e-2)


def test_relu_keeps_a_bit_mask_not_the_input():
    layer = ReLU()
    layer.forward(np.ones((4, 100), np.float32))
    assert layer._mask.dtype == np.uint8 and layer._mask.size == 50


@pytest.mark.parametrize("name", LAYERS)
def test_eval_mode_keeps_nothing_and_backward_needs_forward(name):
    layer = LAYERS[name][0]()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 3), np.float32))
    layer.eval().forward(np.ones((2, 3), np.float32))
    assert all(value is None for key, value in vars(layer).items() if key.startswith("_saved"))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("name", LAYERS)
def test_bad_inputs_raise(name):
    layer = LAYERS[name][0]()
    with pytest.raises(TypeError, match=type(layer).__name__):
        layer.forward(np.ones((2, 3), np.int32))
    layer.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        layer.backward(np.ones((3, 2), np.float32))


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="'sigmoid'"):
        GELU("sigmoid")


def test_relu_keeps_nan_as_torch_does():
    x = np.array([np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf], dtype=np.float32)
    y, mask = np.empty_like(x), np.empty(1, np.uint8)
    kernels.relu_forward(x, y, mask)
    np.testing.assert_array_equal(y, [np.nan, 0.0, 0.0, 2.0, 0.0, np.inf])  # NaN == NaN here
    assert mask[0] == 0b101000
