"""Dropout (mask from the counter-based RNG, regenerated in backward) and Flatten (torch semantics)."""

import numpy as np
import pytest

from gradcheck import check_layer_gradients
from npcpu.kernels.activations import dropout_apply
from npcpu.nn.dropout import Dropout
from npcpu.nn.flatten import Flatten
from npcpu.nn.module import Module

GOLDEN, MUL1, MUL2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64_twin(z):
    z = (z ^ (z >> np.uint64(30))) * MUL1
    z = (z ^ (z >> np.uint64(27))) * MUL2
    return z ^ (z >> np.uint64(31))


def uniform_twin(seed, stream, n):
    """npcpu.kernels.rng.uniform(seed, stream, i) for i < n, in plain NumPy (uint64 wraps)."""
    with np.errstate(over="ignore"):
        key = mix64_twin(np.uint64(seed) * GOLDEN + np.uint64(stream))
        bits = mix64_twin(key ^ (np.arange(n, dtype=np.uint64) * GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


@pytest.mark.parametrize("n", [1, 7, 1001])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_kernel_matches_numpy(n, dtype, num_threads):
    x = np.random.default_rng(0).standard_normal(n).astype(dtype)
    y = np.empty_like(x)
    dropout_apply(x, y, 0.3, dtype(1 / 0.7), 5, 9, 0)
    np.testing.assert_array_equal(y, np.where(uniform_twin(5, 9, n) >= 0.3, x * dtype(1 / 0.7), 0))


def test_row_offset_gives_each_row_the_mask_of_the_whole_batch():
    """Split a batch's rows between two layers (as data-parallel processes do), each told its
    row_offset: forward and backward equal the whole batch's, row for row."""
    x = np.random.default_rng(3).standard_normal((7, 5, 3)).astype(np.float32)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    whole = Dropout(0.4, seed=11)
    whole.input_requires_grad = True
    y, dx = whole.forward(x), whole.backward(dy)
    for start, stop in ((0, 3), (3, 7)):
        part = Dropout(0.4, seed=11)
        part.input_requires_grad = True
        part.row_offset = start
        np.testing.assert_array_equal(part.forward(x[start:stop]), y[start:stop])
        np.testing.assert_array_equal(part.backward(dy[start:stop]), dx[start:stop])


def test_dropout_statistics_and_backward_uses_the_same_mask():
    layer = Dropout(0.25, seed=3)
    layer.input_requires_grad = True
    x = np.random.default_rng(1).uniform(1, 2, (200, 300)).astype(np.float32)
    y = layer.forward(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(layer.backward(dy), np.where(kept, dy / 0.75, 0), rtol=1e-6)


def test_each_forward_draws_a_fresh_mask_and_calls_restores_the_sequence():
    x = np.ones((10, 50), np.float32)
    layer = Dropout(0.5, seed=7)
    first, second = layer.forward(x), layer.forward(x)
    assert layer.calls == 2 and not np.array_equal(first, second)
    saved = Dropout(0.5, seed=7)
    saved.forward(x)
    restored = Dropout(0.5, seed=7)
    restored.load_extra_state(saved.extra_state())  # what a checkpoint saves: {"calls": 1}
    assert restored.extra_state() == {"calls": 1}
    np.testing.assert_array_equal(restored.forward(x), second)
    with pytest.raises(ValueError, match="calls"):
        restored.load_extra_state({"calls": -1})
    with pytest.raises(ValueError, match="'step'"):
        restored.load_extra_state({"step": 3})
    np.testing.assert_array_equal(Dropout(0.5, seed=8).forward(x) == 0, Dropout(0.5, seed=8).forward(x) == 0)


def test_eval_and_p0_are_identity_p1_gives_zeros():
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    layer = Dropout(0.5).eval()
    assert layer.forward(x) is x and layer.calls == 0
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(x)
    identity = Dropout(0.0)
    identity.input_requires_grad = True
    assert identity.forward(x) is x
    np.testing.assert_array_equal(identity.backward(x), x)
    zeros = Dropout(1.0)
    zeros.input_requires_grad = True
    np.testing.assert_array_equal(zeros.forward(x), np.zeros_like(x))
    np.testing.assert_array_equal(zeros.backward(x), np.zeros_like(x))


class FixedMaskDropout(Module):
    """Dropout with its call counter reset before each forward: the same mask for every evaluation."""

    def __init__(self):
        super().__init__()
        self.dropout = Dropout(0.4, seed=11)

    def forward(self, x):
        self.dropout.input_requires_grad = self.input_requires_grad
        self.dropout.calls = 0
        return self.dropout.forward(x)

    def backward(self, dy):
        return self.dropout.backward(dy)


@pytest.mark.parametrize("shape", [(1, 3), (7, 13), (2, 3, 4)])
def test_dropout_gradients_match_finite_differences(shape):
    rng = np.random.default_rng(4)
    check_layer_gradients(FixedMaskDropout(), rng.standard_normal(shape), rng)


def test_dropout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1.5"):
        Dropout(1.5)
    with pytest.raises(TypeError, match="seed"):
        Dropout(0.5, seed=0.5)
    layer = Dropout(0.5)
    layer.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"Dropout.*\(2, 3\)"):
        layer.backward(np.ones((3, 2), np.float32))


# -- Flatten ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_dim, end_dim", [(1, -1), (0, -1), (1, 2), (-2, -1), (2, 2), (0, 0)])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 1, 2)])
def test_flatten_matches_torch(torch, start_dim, end_dim, shape):
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    layer = Flatten(start_dim, end_dim)
    layer.input_requires_grad = True
    y = layer.forward(x)
    expected = torch.nn.Flatten(start_dim, end_dim)(torch.from_numpy(x)).numpy()
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)
    dy = np.random.default_rng(6).standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dy), dy.reshape(shape))


def test_flatten_gradients_match_finite_differences():
    rng = np.random.default_rng(7)
    check_layer_gradients(Flatten(), rng.standard_normal((3, 2, 4)), rng)


def test_flatten_errors():
    with pytest.raises(ValueError, match=r"Flatten.*\(2, 3\)"):
        Flatten(1, 3).forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="start_dim"):
        Flatten(2, 1).forward(np.ones((2, 3, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        Flatten().backward(np.ones((2, 3), np.float32))
    layer = Flatten().eval()
    layer.forward(np.ones((2, 3, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 12), np.float32))
