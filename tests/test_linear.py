"""Linear and FusedLinearReLU: kernels vs NumPy twins, float64 gradient checks, torch parity, precision,
freezing and errors."""

import numba
import numpy as np
import pytest

from gradcheck import check_layer_gradients
from torchcheck import assert_forward_backward_match_torch
from npcpu.kernels import linear as kernels
from npcpu.nn import work
from npcpu.blas import accumulate_weight_grad, matmul_weight, matmul_weight_transposed
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.module import Sequential
from npcpu.precision import bfloat16

LAYERS = [Linear, FusedLinearReLU]
ODD_SHAPES = [(1, 3), (7, 13), (5, 1029), (3, 8)]  # 1029: three column blocks, a partial mask byte


# -- kernels vs their plain NumPy twins ------------------------------------------------------------
def packed_mask_twin(positive):
    """Bit k of byte b of row i is positive[i, 8b + k]."""
    return np.packbits(positive, axis=1, bitorder="little")


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("add_bias", [kernels.add_bias, kernels.add_bias_serial])
def test_forward_kernels_match_numpy(shape, dtype, add_bias, num_threads):
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)

    y = z.copy()
    add_bias(y, bias)
    np.testing.assert_array_equal(y, z + bias)

    y = z.copy()
    mask = np.full(kernels.mask_shape(*shape), 0xFF, dtype=np.uint8)
    kernels.add_bias_relu(y, bias, mask)
    np.testing.assert_array_equal(y, np.maximum(z + bias, 0))
    np.testing.assert_array_equal(mask, packed_mask_twin(z + bias > 0))


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias_grad", [kernels.bias_grad, kernels.add_row_sums])
def test_backward_kernels_match_numpy(shape, dtype, bias_grad, num_threads):
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(shape).astype(dtype)
    positive = rng.random(shape) > 0.4
    db_start = rng.standard_normal(shape[1]).astype(dtype)

    db = db_start.copy()
    bias_grad(dy, db)
    np.testing.assert_allclose(db, db_start + dy.sum(axis=0), rtol=1e-6, atol=1e-6)

    db = db_start.copy()
    dz = np.empty_like(dy)
    kernels.relu_mask_grad_and_bias_grad(dy, packed_mask_twin(positive), dz, db)
    np.testing.assert_array_equal(dz, np.where(positive, dy, 0))
    np.testing.assert_allclose(db, db_start + dz.sum(axis=0), rtol=1e-6, atol=1e-6)


def test_masked_gradient_is_a_select_not_a_product():
    dy = np.array([[np.nan, np.inf, 1.0]], dtype=np.float32)
    dz, db = np.empty_like(dy), np.zeros(3, np.float32)
    kernels.relu_mask_grad_and_bias_grad(dy, packed_mask_twin(np.array([[False, False, True]])), dz, db)
    np.testing.assert_array_equal(dz, [[0.0, 0.0, 1.0]])


def test_bias_gradient_does_not_depend_on_thread_count():
    dy = np.random.default_rng(2).standard_normal((333, 1500)).astype(np.float32)
    sums = []
    for n in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        db = np.zeros(1500, np.float32)
        kernels.bias_grad(dy, db)
        numba.set_num_threads(previous)
        sums.append(db)
    np.testing.assert_array_equal(sums[0], sums[1])
    serial = np.zeros(1500, np.float32)  # what a small layer takes instead
    kernels.add_row_sums(dy, serial)
    np.testing.assert_array_equal(serial, sums[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_gemm_accumulates_in_place(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 13)).astype(dtype)
    dy = rng.standard_normal((9, 5)).astype(dtype)
    grad = rng.standard_normal((5, 13)).astype(dtype)
    expected = grad + dy.T @ x
    address = grad.__array_interface__["data"][0]
    accumulate_weight_grad(grad, dy, x)
    assert grad.__array_interface__["data"][0] == address
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
    # the BLAS call itself writes into grad's memory (no copy that the fallback would add back)
    from scipy.linalg.blas import dgemm, sgemm
    gemm = dgemm if dtype == np.float64 else sgemm
    result = gemm(1.0, x.T, dy.T, beta=1.0, c=grad.T, trans_b=1, overwrite_c=1)
    assert np.shares_memory(result, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_input_gradient_gemms_match_numpy_without_copies(dtype):
    rng = np.random.default_rng(3)
    x, weight = rng.standard_normal((9, 13)).astype(dtype), rng.standard_normal((5, 13)).astype(dtype)
    dz = rng.standard_normal((9, 5)).astype(dtype)
    y, dx = matmul_weight_transposed(x, weight), matmul_weight(dz, weight)
    assert y.dtype == dtype and y.flags.c_contiguous and dx.flags.c_contiguous
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dz @ weight, rtol=1e-5, atol=1e-5)


def test_weight_gradient_gemm_accumulates_into_a_non_contiguous_grad():
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((9, 13)).astype(np.float32), rng.standard_normal((9, 5)).astype(np.float32)
    grad = np.asfortranarray(rng.standard_normal((5, 13)).astype(np.float32))  # BLAS wrapper copies
    expected = grad + dy.T @ x
    accumulate_weight_grad(grad, dy, x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


# -- float64 gradient checks -----------------------------------------------------------------------
@pytest.mark.parametrize("layer_class", LAYERS)
@pytest.mark.parametrize("in_shape, out_features, bias", [
    ((1, 3), 5, True), ((7, 13), 9, True), ((2, 3, 4), 6, True), ((4, 5), 3, False)])
def test_gradients_match_finite_differences(layer_class, in_shape, out_features, bias):
    rng = np.random.default_rng(4)
    layer = layer_class(in_shape[-1], out_features, bias=bias, seed=5)
    check_layer_gradients(layer, rng.standard_normal(in_shape), rng)


# -- torch parity ----------------------------------------------------------------------------------
def torch_layer(torch, layer):
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    modules = [linear, torch.nn.ReLU()] if isinstance(layer, FusedLinearReLU) else [linear]
    return torch.nn.Sequential(*modules)


@pytest.mark.parametrize("layer_class", LAYERS)
@pytest.mark.parametrize("in_shape, out_features, bias", [((1, 3), 5, True), ((7, 13), 9, True),
                                                          ((2, 3, 4), 6, True), ((6, 11), 4, False),
                                                          ((5,), 4, True)])
def test_forward_and_gradients_match_torch(torch, layer_class, in_shape, out_features, bias):
    rng = np.random.default_rng(6)
    layer = layer_class(in_shape[-1], out_features, bias=bias, seed=7)
    reference = torch_layer(torch, layer)
    reference[0].load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})

    x = rng.standard_normal(in_shape).astype(np.float32)
    upstream = rng.standard_normal((*in_shape[:-1], out_features)).astype(np.float32)
    assert_forward_backward_match_torch(torch, layer, reference, x, upstream)
    np.testing.assert_allclose(layer.weight.grad, reference[0].weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    if bias:
        np.testing.assert_allclose(layer.bias.grad, reference[0].bias.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_class", LAYERS)
def test_torch_state_dict_loads_into_npcpu(torch, layer_class):
    torch.manual_seed(0)
    reference = torch.nn.Linear(13, 9)
    layer = layer_class(13, 9, seed=1)
    layer.load_state_dict(reference.state_dict())
    x = np.random.default_rng(8).standard_normal((7, 13)).astype(np.float32)
    expected = reference(torch.from_numpy(x)).detach().numpy()
    if layer_class is FusedLinearReLU:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-5, atol=1e-6)


def test_initialization_matches_torch_rule():
    layer = Linear(400, 300, seed=0)
    bound = 1 / np.sqrt(400)
    for p in (layer.weight.data, layer.bias.data):
        assert p.dtype == np.float32 and np.abs(p).max() <= bound
        assert np.abs(p).max() > 0.95 * bound  # uniform over the whole interval
    np.testing.assert_array_equal(Linear(400, 300, seed=0).weight.data, layer.weight.data)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.weight.shape == (300, 400)


# -- accumulation, precision, freezing, eval -------------------------------------------------------
@pytest.mark.parametrize("layer_class", LAYERS)
def test_gradients_accumulate(layer_class):
    rng = np.random.default_rng(9)
    layer = layer_class(6, 4, seed=0)
    x, dy = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    layer.forward(x)
    layer.backward(dy)
    once = layer.weight.grad.copy(), layer.bias.grad.copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * once[0], rtol=1e-6)
    np.testing.assert_allclose(layer.bias.grad, 2 * once[1], rtol=1e-6)


def test_fp32_keeps_a_reference_to_the_input_not_a_copy():
    layer = Linear(6, 4, seed=0)
    x = np.ones((3, 6), np.float32)
    layer.forward(x)
    assert np.shares_memory(layer._saved[0], x)


@pytest.mark.parametrize("layer_class", LAYERS)
@pytest.mark.parametrize("precision, storage", [("bf16", bfloat16), ("fp16", np.dtype(np.float16))])
def test_half_precision_step_stashes_storage_dtype_and_stays_close(layer_class, precision, storage):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 24)).astype(np.float32)
    dy = rng.standard_normal((8, 16)).astype(np.float32)
    reference, layer = layer_class(24, 16, seed=3), layer_class(24, 16, seed=3)
    reference.input_requires_grad = layer.input_requires_grad = True
    layer.set_precision(precision)
    assert layer.weight.data.dtype == storage
    results = []
    for model in (reference, layer):
        y = model.forward(x)
        if model is layer:
            assert layer._saved[0].dtype == storage
            assert y.dtype == np.float32
        dx = model.backward(dy)
        results.append((y, dx, model.weight.grad, model.bias.grad))
    assert layer.weight.grad.dtype == np.float32 and layer.bias.grad.dtype == np.float32
    for ours, theirs in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, theirs, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("layer_class", LAYERS)
def test_frozen_weight_gets_no_gradient_and_skips_its_gemm(layer_class):
    rng = np.random.default_rng(11)
    layer = layer_class(6, 4, seed=0)
    layer.input_requires_grad = True
    layer.weight.frozen = True
    work.reset()
    layer.forward(rng.standard_normal((3, 6)).astype(np.float32))
    layer.backward(rng.standard_normal((3, 4)).astype(np.float32))
    assert layer.weight.grad is None and layer.bias.grad is not None
    assert work.counts["gemm_skipped"] == 1 and work.counts["gemm"] == 2  # forward + dx


def test_sequential_with_a_frozen_prefix_stops_early():
    rng = np.random.default_rng(12)
    model = Sequential(FusedLinearReLU(8, 16, seed=0), FusedLinearReLU(16, 16, seed=1),
                       FusedLinearReLU(16, 16, seed=2), Linear(16, 3, seed=3))
    model.input_requires_grad = False
    model[0].freeze()
    model[1].freeze()
    work.reset()
    model.forward(rng.standard_normal((5, 8)).astype(np.float32))
    assert work.counts["gemm"] == 4
    assert model.backward(rng.standard_normal((5, 3)).astype(np.float32)) is None
    # layer 3: dW, dx; layer 2: dW, dx skipped (nothing below is trainable); layers 1, 0 never run
    # their backward, and record their dW and dx as skipped
    assert work.counts["gemm"] == 4 + 3 and work.counts["gemm_skipped"] == 1 + 2 + 2
    assert model[0].weight.grad is None and model[1].weight.grad is None
    assert model[2].weight.grad is not None


@pytest.mark.parametrize("layer_class", LAYERS)
def test_eval_mode_keeps_nothing(layer_class):
    layer = layer_class(6, 4, seed=0).eval()
    layer.forward(np.ones((2, 6), np.float32))
    assert layer._saved is None
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 4), np.float32))


# -- errors ----------------------------------------------------------------------------------------
def test_wrong_feature_count_names_layer_and_both_shapes():
    layer = Linear(784, 10)
    with pytest.raises(ValueError) as error:
        layer.forward(np.zeros((32, 783), np.float32))
    message = str(error.value)
    assert "Linear" in message and "784" in message and "(32, 783)" in message


@pytest.mark.parametrize("layer_class", LAYERS)
def test_bad_inputs_raise(layer_class):
    layer = layer_class(6, 4)
    with pytest.raises(RuntimeError, match=layer_class.__name__):
        layer.backward(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match=layer_class.__name__):
        layer.forward(np.ones((2, 6), np.int64))
    layer.forward(np.ones((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        layer.backward(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="out_features"):
        layer_class(6, 0)
    with pytest.raises(TypeError, match="in_features"):
        layer_class(6.0, 4)


def test_bias_relu_keeps_nan_as_torch_does():
    y = np.array([[np.nan, -1.0, 0.5]], dtype=np.float32)
    mask = np.empty((1, 1), np.uint8)
    kernels.add_bias_relu(y, np.array([0.0, 0.5, 0.0], np.float32), mask)
    np.testing.assert_array_equal(y, [[np.nan, 0.0, 0.5]])
    assert mask[0, 0] == 0b100
