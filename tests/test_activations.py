"""ReLU, GELU (both forms) and Tanh: kernels vs NumPy twins, gradient checks, torch parity, precision."""

import math

import numpy as np
import pytest
from numba import njit
from scipy.special import erf, ndtr

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


@njit(cache=False)
def _erf32_cdf_pdf32(x, erf_out, cdf_out, pdf_out):
    for i in range(x.size):
        erf_out[i] = kernels.erf32(x[i])
        cdf_out[i], pdf_out[i] = kernels.normal_cdf_pdf32(x[i])


def test_float32_erf_and_normal_cdf_are_float32_accurate():
    """The float32 GELU's erf (A&S 7.1.26 above 1, the Maclaurin series below) against math.erf on
    a dense grid: within 2e-7 absolute (the formula's own bound is 1.5e-7; float32 rounding adds
    the rest), and Phi, phi within that too."""
    x = np.linspace(-12.0, 12.0, 1_200_001).astype(np.float32)
    erf_out, cdf_out, pdf_out = (np.empty_like(x) for _ in range(3))
    _erf32_cdf_pdf32(x, erf_out, cdf_out, pdf_out)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(erf_out - exact).max() <= 2e-7
    assert np.abs(cdf_out - ndtr(x.astype(np.float64))).max() <= 2e-7
    x64 = x.astype(np.float64)
    assert np.abs(pdf_out - np.exp(-x64 * x64 / 2) / np.sqrt(2 * np.pi)).max() <= 1e-7


def test_float32_gelu_treats_nan_infinity_and_zero_as_the_math_erf_path():
    """The float32 kernels (A&S erf) and the float64 ones (math.erf) agree on special values: NaN
    stays NaN, +-0 and +-1e30 and +-inf give the same outputs and gradients (NaN included)."""
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 12.0, -12.0]
    results = []
    for dtype in (np.float32, np.float64):
        x = np.array(special, dtype=dtype)
        y, dx = np.empty_like(x), np.empty_like(x)
        kernels.gelu_forward(x, y)
        kernels.gelu_backward(x, np.ones_like(x), dx)
        results.append((y.astype(np.float64), dx.astype(np.float64)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-30)
    assert np.isnan(results[0][0][0]) and results[0][0][1] == np.inf


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
