import numpy as np
import pytest

from npcpu.nn.embedding import Embedding, scatter_add_rows
from npcpu.precision import bfloat16
from tests.gradcheck import numerical_gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, dim, tokens", [(1, 1, 3), (11, 13, 40), (50, 7, 1)])
def test_scatter_add_matches_numpy(rows, dim, tokens, dtype):
    """The kernel is serial (no thread-count variants): dweight[idx[i]] += dout[i] except skip."""
    rng = np.random.default_rng(rows * dim + tokens)
    indices = rng.integers(0, rows, tokens)
    dout = rng.standard_normal((tokens, dim)).astype(dtype)
    start = rng.standard_normal((rows, dim)).astype(dtype)
    skip = int(indices[0])
    dweight = start.copy()
    scatter_add_rows(dweight, dout, indices, skip)
    expected = start.copy()
    keep = indices != skip
    np.add.at(expected, indices[keep], dout[keep])
    np.testing.assert_allclose(dweight, expected, rtol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_gradient_float64(padding_idx):
    rng = np.random.default_rng(31)
    layer = Embedding(6, 4, padding_idx=padding_idx, seed=31).set_precision("fp64")
    indices = np.array([[0, 2, 5], [2, 2, 1]])  # repeats and the padding row
    upstream = rng.standard_normal((2, 3, 4))

    def loss():
        return float(np.sum(layer(indices) * upstream))

    layer(indices)
    assert layer.backward(upstream) is None
    numeric = numerical_gradient(loss, layer.weight.data)
    if padding_idx is not None:
        numeric[padding_idx] = 0.0  # torch's rule: the padding row gets no gradient
    np.testing.assert_allclose(layer.weight.grad, numeric, rtol=1e-6, atol=1e-9)


def test_matches_torch(torch):
    rng = np.random.default_rng(32)
    reference = torch.nn.Embedding(10, 5, padding_idx=3)
    layer = Embedding(10, 5, padding_idx=3)
    layer.load_state_dict(reference.state_dict())  # torch -> npcpu
    layer.weight.data[7] += 1.0
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})
    indices = rng.integers(0, 10, (3, 4, 2))
    indices[0, 0, 0] = 3
    upstream = rng.standard_normal((3, 4, 2, 5)).astype(np.float32)
    y = layer(indices)
    layer.backward(upstream)
    y_t = reference(torch.from_numpy(indices))
    y_t.backward(torch.from_numpy(upstream))
    np.testing.assert_array_equal(y, y_t.detach().numpy())
    np.testing.assert_allclose(layer.weight.grad, reference.weight.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_init_like_torch():
    layer = Embedding(400, 50, padding_idx=-1, seed=33)
    assert layer.padding_idx == 399 and layer.weight.shape == (400, 50)
    assert layer.weight.data.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.data[399], 0.0)
    body = layer.weight.data[:399]
    assert abs(body.mean()) < 0.02 and abs(body.std() - 1.0) < 0.02
    assert list(layer.state_dict()) == ["weight"]


def test_bf16_is_close_to_fp32():
    rng = np.random.default_rng(34)
    fp32 = Embedding(20, 8, seed=34)
    bf16 = Embedding(20, 8)
    bf16.load_state_dict(fp32.state_dict())
    bf16.set_precision("bf16")
    assert bf16.weight.data.dtype == bfloat16
    indices = rng.integers(0, 20, (4, 5))
    upstream = rng.standard_normal((4, 5, 8)).astype(np.float32)
    y32, y16 = fp32(indices), bf16(indices)
    assert y16.dtype == np.float32
    np.testing.assert_allclose(y16, y32, rtol=2 ** -8, atol=1e-6)  # bf16 rounding of the weight
    fp32.backward(upstream)
    bf16.backward(upstream)
    assert bf16.weight.grad.dtype == np.float32
    np.testing.assert_allclose(bf16.weight.grad, fp32.weight.grad, rtol=1e-6)  # dy is float32 in both


def test_frozen_weight_gets_no_gradient():
    layer = Embedding(5, 3)
    layer.freeze()
    layer(np.array([1, 2]))
    assert layer.backward(np.ones((2, 3), np.float32)) is None and layer.weight.grad is None


def test_bad_indices_raise_naming_value_and_range():
    layer = Embedding(5, 3)
    with pytest.raises(TypeError, match="integer"):
        layer(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"index 5 .*\[0, 5\)"):
        layer(np.array([[0, 5]]))
    with pytest.raises(ValueError, match=r"index -2 "):
        layer(np.array([-2]))
    with pytest.raises(ValueError, match="padding_idx"):
        Embedding(5, 3, padding_idx=5)
    layer(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        layer.backward(np.ones((3, 3), np.float32))
