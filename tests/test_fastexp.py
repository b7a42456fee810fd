"""npcpu.kernels.fastexp against NumPy: exp within 2 ulp in float32, exact np.exp in float64."""

import numpy as np

from numba import njit

from npcpu.kernels.fastexp import exp32, exp_in_place, exp_shifted, row_sum


@njit(cache=False)
def _exp32_each(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


def test_float32_exp_is_within_two_ulp_of_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87, 88, 100_003), np.linspace(-5, 5, 1001)]).astype(np.float32)
    out = np.empty_like(x)
    exp_shifted(out, x, x.size, np.float32(0.0), np.empty(x.size, np.int32))
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - exact) / ulp) <= 2.0


def test_shift_count_and_special_values():
    x = np.array([3.0, np.nan, -np.inf, -200.0, 0.5, 7.0, 9.0], dtype=np.float32)
    out = np.full_like(x, -1.0)
    exp_shifted(out, x, 6, np.float32(1.0), np.empty(7, np.int32))
    assert np.isclose(out[0], np.exp(2.0), rtol=3e-7) and np.isnan(out[1])
    assert out[2] == 0 and out[3] == 0  # flushed to zero below e^-87.3
    assert np.isclose(out[4], np.exp(-0.5), rtol=3e-7) and np.isclose(out[5], np.exp(6.0), rtol=3e-7)
    assert out[6] == -1.0  # past the count: untouched


def test_float64_takes_numpy_exp_and_row_sum_sums():
    x = np.linspace(-3, 3, 17)
    out = np.empty_like(x)
    exp_shifted(out, x, x.size, 0.5, np.empty(x.size, np.int32))
    np.testing.assert_allclose(out, np.exp(x - 0.5), rtol=1e-15)
    assert row_sum(x.astype(np.float32), 9) == np.sum(x[:9].astype(np.float32), dtype=np.float64)
    assert np.isnan(row_sum(np.array([1.0, np.nan, np.inf]), 3))


def test_scalar_exp32_equals_exp_shifted_bit_for_bit():
    """exp32 (2^k built in a register) and exp_shifted (2^k through an int32 array) are one
    computation: the same bits everywhere, special values included."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-100, 100, 50_001),
                        [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.5, -88.0]]).astype(np.float32)
    scalar, rows = np.empty_like(x), np.empty_like(x)
    _exp32_each(x, scalar)
    exp_shifted(rows, x, x.size, np.float32(0.0), np.empty(x.size, np.int32))
    np.testing.assert_array_equal(scalar.view(np.int32), rows.view(np.int32))


def test_exp_in_place_equals_exp_shifted_and_numpy():
    """exp_in_place (the small-batch cross-entropy's one exp): exp_shifted's bits in float32,
    np.exp's in float64, on an odd length with special values."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.uniform(-100, 100, 1001), [np.nan, np.inf, -np.inf, -0.0]])
    for dtype in (np.float32, np.float64):
        values = x.astype(dtype)
        expected = np.empty_like(values)
        exp_shifted(expected, values, values.size, dtype(0.0), np.empty(values.size, np.int32))
        exp_in_place(values)
        np.testing.assert_array_equal(values, expected)
    np.testing.assert_allclose(expected, np.exp(x), rtol=1e-15)  # libm's exp, NumPy's: an ulp
