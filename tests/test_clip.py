"""Gradient clipping: norm kernels against NumPy, clip_grad_norm / clip_grad_value against torch."""

import math

import numba
import numpy as np
import pytest

from npcpu.kernels.grads import CHUNK, LANES, chunk_power_sums, max_abs, power_sum
from npcpu.nn.parameter import Parameter
from npcpu.optim.clip import (clip_grad_norm, clip_grad_norm_and_squares, clip_grad_value,
                              get_total_norm, norm_from_squares)

SIZES = [0, 1, 17, CHUNK + 3, 3 * CHUNK + 1]


# ---------------------------------------------------------------- kernel twins


def power_sum_twin(values, p):
    """sum |x|^p over all entries, in float64."""
    return float(np.sum(np.abs(values.astype(np.float64)) ** p))


def max_abs_twin(values):
    """max |x| over all entries (NaN if any is NaN), 0 for no entries."""
    return float(np.max(np.abs(values.astype(np.float64)), initial=0.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
def test_norm_kernels_match_numpy(num_threads, dtype, size):
    values = np.random.default_rng(size).standard_normal(size).astype(dtype)
    for p in (2.0, 1.0, 3.5):
        np.testing.assert_allclose(power_sum(values, p), power_sum_twin(values, p), rtol=1e-12, atol=0)
    assert max_abs(values) == max_abs_twin(values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_kernels_see_nan_and_inf_in_any_chunk(num_threads, dtype):
    for position in (0, CHUNK - 1, CHUNK, 2 * CHUNK + 5):
        for special in (np.nan, np.inf, -np.inf):
            values = np.random.default_rng(position).standard_normal(2 * CHUNK + 9).astype(dtype)
            values[position] = special
            assert np.array_equal(max_abs(values), max_abs_twin(values), equal_nan=True)
            assert np.array_equal(power_sum(values, 2.0), power_sum_twin(values, 2.0), equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
def test_power_sum_with_scale_is_scaling_then_power_sum(num_threads, dtype, size):
    """Against the NumPy twin (scale, then the sum in float64) to rounding, and bit for bit the
    separate steps: NumPy's in-place scaling, then power_sum."""
    values = np.random.default_rng(size).standard_normal(size).astype(dtype)
    if size > CHUNK:
        values[CHUNK] = np.inf
    scale = dtype(0.37)
    for p in (2.0, 3.5):
        fused, scaled = values.copy(), values.copy()
        total = power_sum(fused, p, scale)
        scaled *= scale
        np.testing.assert_array_equal(fused, scaled)
        assert np.array_equal(total, power_sum(scaled, p), equal_nan=True)
        np.testing.assert_allclose(total, power_sum_twin(values * scale, p), rtol=1e-12, atol=0)


def chunk_square_sums_twin(values):
    """Each CHUNK-element chunk's sum of squares in float64, added strictly in index order."""
    sums = []
    for start in range(0, values.size, CHUNK):
        squares = values[start:start + CHUNK].astype(np.float64) ** 2
        sums.append(np.add.accumulate(squares)[-1])
    return np.array(sums)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 17, CHUNK, LANES * CHUNK, LANES * CHUNK + 1,
                                  (2 * LANES + 1) * CHUNK + 17])
def test_chunk_power_sums_sum_each_chunk_in_index_order(num_threads, dtype, size):
    """Bit for bit the twin (whole chunks are summed LANES at a time, each chain in index
    order), scaled or not; power_sum is their sum in chunk order."""
    values = np.random.default_rng(size).standard_normal(size).astype(dtype)
    values *= 10.0 ** np.random.default_rng(1).integers(-6, 6, size)  # rounding matters
    chunks = -(-size // CHUNK)
    partials = np.full(chunks, np.nan)
    chunk_power_sums(values, 2.0, partials)
    np.testing.assert_array_equal(partials, chunk_square_sums_twin(values))
    assert power_sum(values, 2.0) == (np.add.accumulate(partials)[-1] if chunks else 0.0)
    scale, scaled = dtype(0.37), values.copy()
    chunk_power_sums(scaled, 2.0, partials, scale)
    np.testing.assert_array_equal(scaled, values * scale)
    np.testing.assert_array_equal(partials, chunk_square_sums_twin(values * scale))
    chunk_power_sums(values, 3.5, partials)  # no side-by-side chunks for p != 2
    np.testing.assert_allclose(partials, [power_sum_twin(values[c * CHUNK:(c + 1) * CHUNK], 3.5)
                                          for c in range(chunks)], rtol=1e-12, atol=0)


def test_norm_kernels_do_not_depend_on_thread_count():
    values = np.random.default_rng(1).standard_normal(5 * CHUNK + 7).astype(np.float32)
    previous = numba.get_num_threads()
    results = []
    for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        numba.set_num_threads(n)
        results.append(power_sum(values, 2.0))
    numba.set_num_threads(previous)
    assert len(set(results)) == 1


# ---------------------------------------------------------------- parity with torch.nn.utils

SHAPES = [(7, 5), (13,), (3, 4, 2)]


def make_params(rng, gain):
    params = [Parameter(np.zeros(shape, np.float32)) for shape in SHAPES]
    for p in params:
        p.grad = (gain * rng.standard_normal(p.shape)).astype(np.float32)
    return params


def torch_grads(torch, params):
    tensors = []
    for p in params:
        t = torch.zeros(p.shape, requires_grad=True)
        t.grad = torch.from_numpy(p.grad.copy())
        tensors.append(t)
    return tensors


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("gain", [0.01, 1.0], ids=["below-max", "clipped"])
def test_clip_grad_norm_matches_torch(torch, norm_type, gain):
    params = make_params(np.random.default_rng(7), gain)
    tensors = torch_grads(torch, params)
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.5, norm_type=norm_type)
    got_norm = clip_grad_norm(params, max_norm=1.5, norm_type=norm_type)
    assert isinstance(got_norm, float)
    np.testing.assert_allclose(got_norm, expected_norm.item(), rtol=2e-6)  # torch reduces in float32
    for p, t in zip(params, tensors):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=2e-6, atol=1e-8)
    if gain == 1.0:
        assert get_total_norm(params, norm_type) == pytest.approx(1.5, rel=1e-5)


def test_frozen_and_gradless_parameters_are_ignored(torch):
    params = make_params(np.random.default_rng(3), 1.0)
    frozen, gradless = Parameter(np.zeros(4, np.float32)), Parameter(np.zeros(2, np.float32))
    frozen.grad, frozen.frozen = np.full(4, 100.0, np.float32), True
    tensors = torch_grads(torch, params)
    expected = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    assert clip_grad_norm([frozen, *params, gradless], 1.0) == pytest.approx(expected.item(), rel=2e-6)
    np.testing.assert_array_equal(frozen.grad, 100.0)
    assert gradless.grad is None
    assert clip_grad_norm([gradless], 1.0) == 0.0


@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_nonfinite_norm_behaves_as_torch(torch, special):
    params = make_params(np.random.default_rng(5), 1.0)
    params[1].grad[3] = special
    before = [p.grad.copy() for p in params]
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        clip_grad_norm(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.grad, b)
    tensors = torch_grads(torch, params)
    expected = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    got = clip_grad_norm(params, 1.0)
    assert np.array_equal(got, expected.item(), equal_nan=True)
    for p, t in zip(params, tensors):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())  # NaN where torch has NaN, 0 where 0


def test_clip_grad_value_matches_torch(torch):
    params = make_params(np.random.default_rng(9), 1.0)
    params[0].grad[0, 0] = np.nan
    tensors = torch_grads(torch, params)
    torch.nn.utils.clip_grad_value_(tensors, 0.7)
    clip_grad_value(params, 0.7)
    for p, t in zip(params, tensors):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


def test_float64_gradients():
    p = Parameter(np.zeros(2))
    p.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([p], 1.0) == 5.0
    np.testing.assert_allclose(p.grad, [3.0 / (5.0 + 1e-6), 4.0 / (5.0 + 1e-6)], rtol=1e-15)


@pytest.mark.parametrize("call, error, match", [
    (lambda ps: clip_grad_norm(ps, -1.0), ValueError, "max_norm must be >= 0"),
    (lambda ps: clip_grad_norm(ps, 1.0, norm_type=0), ValueError, "norm_type must be > 0"),
    (lambda ps: clip_grad_norm(ps, 1.0, norm_type="fro"), TypeError, "norm_type must be a real number"),
    (lambda ps: clip_grad_value(ps, float("nan")), ValueError, "clip_value must be >= 0"),
])
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(make_params(np.random.default_rng(0), 1.0))


def test_gradients_that_cannot_be_modified_in_place_are_rejected():
    p = Parameter(np.zeros((4, 4), np.float32))
    p.grad = np.ones((4, 4), np.float32).T[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        clip_grad_norm([p], 1.0)
    p.grad = np.ones((4, 4), np.int32)
    with pytest.raises(TypeError, match="float32 or float64"):
        clip_grad_norm([p], 1.0)


# ---------------------------------------------------------------- clipping with the squares kept


def _parameters(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    params = []
    for shape, dtype in [((5, 7), np.float32), ((CHUNK + 9,), np.float32), ((3,), np.float64),
                         ((4, 4), np.float32)]:
        p = Parameter(rng.standard_normal(shape).astype(dtype))
        p.grad = (scale * rng.standard_normal(shape)).astype(dtype)
        params.append(p)
    params[3].frozen = True  # left out, as torch leaves out a tensor without a gradient
    return params


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clip_keeping_squares_is_clip_grad_norm_bit_for_bit(num_threads, max_norm):
    expected, kept = _parameters(), _parameters()
    norm = get_total_norm(expected) if max_norm is None else clip_grad_norm(expected, max_norm)
    total, squares = clip_grad_norm_and_squares(kept, max_norm)
    assert total == norm
    for a, b in zip(expected, kept):
        assert np.array_equal(a.grad, b.grad)  # clipped alike (or untouched)
    assert set(squares) == {id(p) for p in kept[:3]}
    for p in kept[:3]:  # the sums of squares of the clipped gradients
        assert squares[id(p)] == power_sum(p.grad.reshape(-1), 2.0)
    # any subset's norm from the squares is get_total_norm's, bit for bit (the frozen one ignored)
    for subset in (kept[:1], kept[1:3], kept[2:], kept):
        assert norm_from_squares(squares, subset) == get_total_norm(subset)
    if max_norm == 0.5:
        assert math.isclose(get_total_norm(kept), 0.5, rel_tol=1e-6)


def test_clip_keeping_squares_refuses_a_non_finite_norm_and_changes_nothing():
    params = _parameters()
    params[1].grad[5] = np.inf
    before = [p.grad.copy() for p in params]
    with pytest.raises(RuntimeError, match="total norm of order 2.0 of the gradients is inf"):
        clip_grad_norm_and_squares(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        assert np.array_equal(p.grad, b)
    total, _ = clip_grad_norm_and_squares(params, 1.0)  # torch's behaviour: clipped to NaN/0
    assert total == np.inf and np.isnan(params[1].grad[5])
