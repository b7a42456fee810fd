import numpy as np
import pytest

from npcpu.kernels.layernorm import ROWS_PER_BLOCK, layernorm_backward, layernorm_forward
from npcpu.nn.norm import LayerNorm
from npcpu.precision import bfloat16
from tests.gradcheck import check_layer_gradients
from tests.torchcheck import assert_forward_backward_match_torch


# -- the kernels against their plain-NumPy statement ---------------------------------------------

def layernorm_forward_numpy(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis; also xhat and rstd."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x64 - mean) * rstd
    return xhat * weight + bias, xhat, rstd[:, 0]


def layernorm_backward_numpy(dy, xhat, rstd, weight):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dweight, dbias."""
    dxhat = dy * weight
    dx = rstd[:, None] * (dxhat - dxhat.mean(axis=1, keepdims=True)
                          - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("rows, size", [(1, 5), (7, 13), (2 * ROWS_PER_BLOCK + 3, 129)])
@pytest.mark.parametrize("residual", [False, True])
def test_kernels_match_numpy(num_threads, rows, size, dtype, rtol, residual):
    """With `residual`, forward normalizes inp + addend (and writes the sum), backward adds the
    residual gradient to dx."""
    rng = np.random.default_rng(rows * size)
    x = (rng.standard_normal((rows, size)) * 3 + 2).astype(dtype)
    weight, bias = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
    dy = rng.standard_normal((rows, size)).astype(dtype)
    nothing = np.empty((0, 0), dtype)
    addend, total, inp = nothing, nothing, x
    if residual:
        addend = rng.standard_normal((rows, size)).astype(dtype)
        inp, total = (x - addend).astype(dtype), np.full_like(x, np.nan)
        x = inp + addend  # the sum the kernel forms, rounded as it rounds it
    out, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty(rows, dtype)
    layernorm_forward(out, xhat, rstd, inp, weight, bias, 1e-5, True, addend, total)
    if residual:
        np.testing.assert_array_equal(total, x)
    ref_out, ref_xhat, ref_rstd = layernorm_forward_numpy(x, weight, bias, 1e-5)
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(xhat, ref_xhat, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=rtol)

    dx = np.empty_like(x)
    dweight, dbias = np.full(size, 0.5, dtype), np.full(size, -0.5, dtype)  # backward adds
    upstream_residual = rng.standard_normal((rows, size)).astype(dtype) if residual else nothing
    layernorm_backward(dx, dweight, dbias, dy, xhat, rstd, weight, True, True, upstream_residual)
    ref_dx, ref_dweight, ref_dbias = layernorm_backward_numpy(dy.astype(np.float64), ref_xhat,
                                                              ref_rstd, weight)
    if residual:
        ref_dx = ref_dx + upstream_residual
    np.testing.assert_allclose(dx, ref_dx, rtol=rtol * 10, atol=rtol * 10)
    np.testing.assert_allclose(dweight, ref_dweight + 0.5, rtol=rtol * 10, atol=rtol * 10)
    np.testing.assert_allclose(dbias, ref_dbias - 0.5, rtol=rtol * 10, atol=rtol * 10)


def test_forward_residual_equals_the_sum_then_forward():
    rng = np.random.default_rng(5)
    x, addend, dy, residual = rng.standard_normal((4, 3, 9, 10)).astype(np.float32)
    fused, plain = LayerNorm(10), LayerNorm(10)
    for layer in (fused, plain):
        layer.input_requires_grad = True
        layer.weight.data[...] = rng.standard_normal(10) if layer is fused else fused.weight.data
    h, out = fused.forward_residual(x, addend)
    np.testing.assert_array_equal(h, x + addend)
    np.testing.assert_array_equal(out, plain.forward(x + addend))
    np.testing.assert_allclose(fused.backward(dy, residual=residual),
                               plain.backward(dy) + residual, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fused.weight.grad, plain.weight.grad)
    expected = r"LayerNorm.*forward_residual.*\(3, 9, 10\), got \(3, 9\)"
    with pytest.raises(ValueError, match=expected):
        fused.forward_residual(x, addend[..., 0])


def test_parameter_gradients_do_not_depend_on_thread_count():
    import numba

    rng = np.random.default_rng(3)
    rows, size = 5 * ROWS_PER_BLOCK + 1, 33
    dy, xhat = rng.standard_normal((2, rows, size)).astype(np.float32)
    rstd, weight = np.ones(rows, np.float32), np.ones(size, np.float32)
    results = []
    for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        dweight, dbias = np.zeros(size, np.float32), np.zeros(size, np.float32)
        layernorm_backward(np.empty((0, 0), np.float32), dweight, dbias, dy, xhat, rstd, weight,
                           False, True, np.empty((0, 0), np.float32))
        numba.set_num_threads(previous)
        results.append((dweight, dbias))
    for dweight, dbias in results[1:]:
        np.testing.assert_array_equal(dweight, results[0][0])
        np.testing.assert_array_equal(dbias, results[0][1])


# -- the layer: float64 gradient checks ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (2, 3, 8)])
def test_gradients_float64(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    layer = LayerNorm(shape[-1])
    layer.set_precision("fp64")
    layer.weight.data[:] = rng.standard_normal(shape[-1])
    layer.bias.data[:] = rng.standard_normal(shape[-1])
    check_layer_gradients(layer, rng.standard_normal(shape) * 2 + 1, rng)


@pytest.mark.parametrize("kwargs", [{"bias": False}, {"elementwise_affine": False}])
def test_gradients_float64_without_bias_or_affine(kwargs):
    rng = np.random.default_rng(5)
    layer = LayerNorm(6, **kwargs)
    if layer.weight is not None:
        layer.set_precision("fp64")
        layer.weight.data[:] = rng.standard_normal(6)
    check_layer_gradients(layer, rng.standard_normal((4, 6)), rng)
    assert [name for name, _ in layer.named_parameters()] == (["weight"] if kwargs == {"bias": False}
                                                              else [])


def test_gradients_float64_tuple_normalized_shape():
    rng = np.random.default_rng(6)
    layer = LayerNorm((3, 4))
    layer.set_precision("fp64")
    layer.weight.data[:] = rng.standard_normal((3, 4))
    layer.bias.data[:] = rng.standard_normal((3, 4))
    check_layer_gradients(layer, rng.standard_normal((2, 3, 4)), rng)


# -- the layer: parity with torch -----------------------------------------------------------------

def _torch_copy(torch, layer):
    """The torch LayerNorm with the same configuration, loaded from the npcpu state dict."""
    module = torch.nn.LayerNorm(layer.normalized_shape, eps=layer.eps,
                                elementwise_affine=layer.elementwise_affine,
                                bias=layer.bias is not None)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    return module


@pytest.mark.parametrize("normalized_shape, shape", [(13, (7, 13)), (8, (2, 3, 8)), ((3, 5), (4, 3, 5))])
def test_matches_torch(torch, normalized_shape, shape):
    rng = np.random.default_rng(11)
    layer = LayerNorm(normalized_shape, eps=1e-4)
    layer.input_requires_grad = True
    reference = torch.nn.LayerNorm(normalized_shape, eps=1e-4)
    with torch.no_grad():  # torch -> npcpu: random weights made in torch
        reference.weight.normal_()
        reference.bias.normal_()
    layer.load_state_dict(reference.state_dict())
    reference = _torch_copy(torch, layer)  # npcpu -> torch: and back again
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)

    assert_forward_backward_match_torch(torch, layer, reference, x, upstream)
    np.testing.assert_allclose(layer.weight.grad, reference.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bias.grad, reference.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_large_mean_small_variance_is_accurate(torch):
    """Rows of mean 1e4 and standard deviation 0.1: no cancellation in the variance.

    Compared with torch in float64 on the same float32 inputs: torch's own float32 LayerNorm is
    off by about 3e-2 in y and 3e-1 in dx here, so it cannot serve as the reference.
    """
    rng = np.random.default_rng(12)
    x = (1e4 + 0.1 * rng.standard_normal((9, 24))).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    layer = LayerNorm(24)
    layer.input_requires_grad = True
    reference = _torch_copy(torch, layer).double()
    y = layer(x)
    dx = layer.backward(upstream)
    x_t = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    y_t = reference(x_t)
    y_t.backward(torch.from_numpy(upstream.astype(np.float64)))
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=1e-5, atol=1e-4)  # dx is of order 1e2
    np.testing.assert_allclose(layer.weight.grad, reference.weight.grad.numpy(), rtol=1e-5, atol=1e-5)


# -- precision, modes, errors ----------------------------------------------------------------------

def test_bf16_is_close_to_fp32():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    fp32 = LayerNorm(32)
    fp32.weight.data[:] = rng.standard_normal(32)
    bf16 = LayerNorm(32)
    bf16.load_state_dict(fp32.state_dict())
    bf16.set_precision("bf16")
    fp32.input_requires_grad = bf16.input_requires_grad = True
    assert bf16.weight.data.dtype == bfloat16
    y32, y16 = fp32(x), bf16(x)
    assert y16.dtype == np.float32 and bf16._xhat.dtype == bfloat16
    dx32, dx16 = fp32.backward(upstream), bf16.backward(upstream)
    assert bf16.weight.grad.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: relative error about 2^-8 in weight and in the saved xhat
    np.testing.assert_allclose(y16, y32, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dx16, dx32, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(bf16.weight.grad, fp32.weight.grad, rtol=2e-2, atol=5e-2)


def test_frozen_and_input_grad_flags():
    rng = np.random.default_rng(14)
    x, upstream = rng.standard_normal((2, 3, 5)).astype(np.float32)
    layer = LayerNorm(5)
    layer.weight.frozen = True
    layer.input_requires_grad = False
    layer(x)
    assert layer.backward(upstream) is None
    assert layer.weight.grad is None
    np.testing.assert_allclose(layer.bias.grad, upstream.sum(axis=0), rtol=1e-6, atol=1e-6)


def test_gradients_accumulate():
    rng = np.random.default_rng(15)
    x, upstream = rng.standard_normal((2, 4, 7)).astype(np.float32)
    layer = LayerNorm(7)
    layer(x)
    layer.backward(upstream)
    once = layer.weight.grad.copy()
    layer(x)
    layer.backward(upstream)
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-6)


def test_eval_keeps_nothing_and_errors_name_the_layer():
    layer = LayerNorm(4)
    layer.eval()
    layer(np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"LayerNorm.*\(\.\.\., 4\).*\(2, 5\)"):
        layer(np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        layer(np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(0)


def test_without_bias_matches_torch(torch):
    """nanoGPT's LayerNorm(bias=False): the state dict holds only the weight."""
    rng = np.random.default_rng(13)
    layer = LayerNorm(7, bias=False)
    layer.input_requires_grad = True
    reference = torch.nn.LayerNorm(7, bias=False)
    with torch.no_grad():
        reference.weight.normal_()
    layer.load_state_dict(reference.state_dict())
    assert list(layer.state_dict()) == ["weight"]
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    upstream = rng.standard_normal((3, 5, 7)).astype(np.float32)
    assert_forward_backward_match_torch(torch, layer, reference, x, upstream)
    np.testing.assert_allclose(layer.weight.grad, reference.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
