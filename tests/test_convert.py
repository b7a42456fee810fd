"""float32 <-> bfloat16 / float16 conversion kernels against ml_dtypes, NumPy and plain-NumPy twins."""

import warnings

import numpy as np
import pytest
from numba import njit

from npcpu.kernels import convert
from npcpu.kernels.rng import hash_index
from npcpu.precision import bfloat16

ALL_16BIT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
RNG = np.random.default_rng(20240601)


def bits32(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def bits16(x):
    return np.asarray(x).view(np.uint16)


def raw_bits(x):
    return x.view(np.uint16 if x.itemsize == 2 else np.uint32)


def astype_quiet(x, dtype):
    """`x.astype(dtype)` without NumPy's overflow/invalid warnings (they are the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return x.astype(dtype)


def random_f32_bits(n):
    return RNG.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def crafted_f32():
    """Ties, neighbours of ties, binade edges, overflow edges and subnormals for both 16-bit types."""
    patterns = []
    for kept in (0x3F80, 0x3F81, 0x0000, 0x0001, 0x007F, 0x0080, 0x7F7E, 0x7F7F, 0x477F, 0x3380):
        for low in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            patterns.append((kept << 16) | low)
    # float16: 65504 (largest), 65520 (tie to Inf), its neighbours; 2**-14, 2**-24, 2**-25 and around
    patterns += [0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x38800000, 0x387FF000,
                 0x387FEFFF, 0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x33C00000, 0x33A00000,
                 0x00000001, 0x007FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FBFFFFF, 0x7F802000,
                 0x7F801FFF, 0x7FFFFFFF]
    patterns = np.array(patterns, dtype=np.uint32)
    return np.concatenate([patterns, patterns | np.uint32(0x80000000)]).view(np.float32)


VALUES = pytest.mark.parametrize(
    "values", [random_f32_bits(4_000_000), crafted_f32()], ids=["random", "crafted"]
)


# ---------------------------------------------------------------- plain-NumPy twins


def bf16_nearest_twin(x):
    """RNE on the float32 bits: add 0x7fff + (bit 16), keep the top half; NaN -> sign | 0x7fc0."""
    bits = bits32(x).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) & 0x8000) | 0x7FC0, rounded).astype(np.uint16)


@njit(cache=True)
def random16_reference(seed, stream, n):
    """The 16 random bits element i of a stochastic rounding draws: the top of hash_index."""
    out = np.empty(n, dtype=np.uint32)
    for i in range(n):
        out[i] = hash_index(seed, stream, i) >> np.uint64(48)
    return out


def bf16_stochastic_twin(x, seed):
    """Add 16 random bits to the float32 bits, keep the top half; NaN -> sign | 0x7fc0."""
    bits = bits32(x).reshape(-1).astype(np.uint64)
    random16 = random16_reference(np.uint64(seed), np.uint64(convert.BF16_ROUNDING_STREAM), bits.size)
    rounded = (bits + random16) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) & 0x8000) | 0x7FC0, rounded).astype(np.uint16).reshape(x.shape)


# ---------------------------------------------------------------- round to nearest: bfloat16


def test_bf16_all_patterns_widen_exactly_and_round_back():
    halves = ALL_16BIT.view(bfloat16)
    widened = convert.bf16_to_f32(halves)
    np.testing.assert_array_equal(bits32(widened), ALL_16BIT.astype(np.uint32) << 16)
    np.testing.assert_array_equal(bits32(widened), bits32(halves.astype(np.float32)))
    back = bits16(convert.f32_to_bf16(widened))
    np.testing.assert_array_equal(back, bits16(astype_quiet(widened, bfloat16)))
    finite_or_inf = (ALL_16BIT & 0x7FFF) <= 0x7F80
    np.testing.assert_array_equal(back[finite_or_inf], ALL_16BIT[finite_or_inf])
    np.testing.assert_array_equal(back[~finite_or_inf], (ALL_16BIT[~finite_or_inf] & 0x8000) | 0x7FC0)


@VALUES
def test_f32_to_bf16_matches_ml_dtypes_bit_for_bit(values):
    expected = bits16(astype_quiet(values, bfloat16))
    np.testing.assert_array_equal(bits16(convert.f32_to_bf16(values)), expected)
    np.testing.assert_array_equal(bf16_nearest_twin(values), expected)


def test_bf16_rounding_examples():
    one, next_up = 0x3F80, 0x3F81
    ties = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001], dtype=np.uint32).view(np.float32)
    np.testing.assert_array_equal(bits16(convert.f32_to_bf16(ties)), [one, next_up + 1, one, next_up])
    edges = np.array([0x7F7F7FFF, 0x7F7F8000, 0xFF800000, 0x80000000], dtype=np.uint32).view(np.float32)
    np.testing.assert_array_equal(bits16(convert.f32_to_bf16(edges)), [0x7F7F, 0x7F80, 0xFF80, 0x8000])


@pytest.mark.parametrize("shape", [(1001,), (3, 5, 7), (2, 0, 3)])
def test_bf16_kernels_match_twins_on_odd_shapes(shape, num_threads):
    x = RNG.standard_normal(shape).astype(np.float32)
    rounded = convert.f32_to_bf16(x)
    assert rounded.shape == shape and rounded.dtype == bfloat16
    np.testing.assert_array_equal(bits16(rounded), bf16_nearest_twin(x))
    widened = convert.bf16_to_f32(rounded)
    assert widened.shape == shape and widened.dtype == np.float32
    np.testing.assert_array_equal(bits32(widened), bits16(rounded).astype(np.uint32) << 16)


# ---------------------------------------------------------------- round to nearest: float16


# A NaN's payload under NumPy's astype is the platform's: x86 keeps a signalling NaN signalling,
# Arm's conversion instructions quiet it. npcpu's kernels are integer code with one rule everywhere
# (x86's): the payload moves with the mantissa, a float16 NaN keeps at least one payload bit.
def f16_to_f32_twin(halves):
    """NumPy's widening, with NaNs by npcpu's rule."""
    h = bits16(halves).astype(np.uint32)
    expected = bits32(astype_quiet(halves, np.float32)).copy()
    nan = (h & 0x7C00) == 0x7C00
    nan &= (h & 0x3FF) != 0
    expected[nan] = ((h[nan] & 0x8000) << 16) | 0x7F800000 | ((h[nan] & 0x3FF) << 13)
    return expected


def f32_to_f16_twin(values):
    """NumPy's rounding, with NaNs by npcpu's rule."""
    b = bits32(values)
    expected = bits16(astype_quiet(values, np.float16)).copy()
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    payload = np.maximum((b[nan] >> 13) & 0x3FF, 1)
    expected[nan] = (((b[nan] >> 16) & 0x8000) | 0x7C00 | payload).astype(np.uint16)
    return expected


def test_f16_all_patterns_widen_exactly_and_round_back():
    halves = ALL_16BIT.view(np.float16)
    widened = convert.f16_to_f32(halves)
    np.testing.assert_array_equal(bits32(widened), f16_to_f32_twin(halves))
    back = bits16(convert.f32_to_f16(widened))
    np.testing.assert_array_equal(back, f32_to_f16_twin(widened))
    np.testing.assert_array_equal(back, ALL_16BIT)  # NaN payloads survive the round trip too


@VALUES
def test_f32_to_f16_matches_numpy_bit_for_bit(values):
    np.testing.assert_array_equal(bits16(convert.f32_to_f16(values)), f32_to_f16_twin(values))


@pytest.mark.parametrize("shape", [(1001,), (3, 5, 7), (2, 0, 3)])
def test_f16_kernels_match_numpy_on_odd_shapes(shape, num_threads):
    x = (RNG.standard_normal(shape) * 1000).astype(np.float32)
    rounded = convert.f32_to_f16(x)
    assert rounded.shape == shape and rounded.dtype == np.float16
    np.testing.assert_array_equal(bits16(rounded), bits16(x.astype(np.float16)))
    widened = convert.f16_to_f32(rounded)
    assert widened.shape == shape and widened.dtype == np.float32
    np.testing.assert_array_equal(widened, rounded.astype(np.float32))


# ---------------------------------------------------------------- stochastic rounding


def between_neighbours(low_half, n, negative=False):
    """`n` copies of the float32 with bf16 part 1.0 (or -1.0) and dropped low half `low_half`."""
    kept = 0xBF80 if negative else 0x3F80
    return np.full(n, (kept << 16) | low_half, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("negative", [False, True])
def test_stochastic_rounding_is_unbiased_where_nearest_is_not(negative):
    n = 1 << 20
    x = between_neighbours(0x4CCD, n, negative)  # 0.3 of the way from 1.0 to its upper neighbour
    ulp = 2.0**-7
    fraction = 0x4CCD / 65536
    bound = 5 * ulp * np.sqrt(fraction * (1 - fraction) / n)  # five standard errors of the mean
    value = float(x[0])
    sr_mean = convert.bf16_to_f32(convert.f32_to_bf16_stochastic(x, seed=11)).astype(np.float64).mean()
    nearest = float(convert.bf16_to_f32(convert.f32_to_bf16(x[:1]))[0])
    assert abs(sr_mean - value) < bound
    assert abs(nearest - value) > bound


@pytest.mark.parametrize("low_half", [0x0000, 0x0001, 0x0100, 0x4CCD, 0x8000, 0xFFFF])
def test_probability_of_rounding_up_is_the_distance(low_half):
    n = 1 << 20
    rounded = bits16(convert.f32_to_bf16_stochastic(between_neighbours(low_half, n), seed=5))
    assert set(np.unique(rounded)) <= {0x3F80, 0x3F81}
    fraction = low_half / 65536
    ups = np.count_nonzero(rounded == 0x3F81)
    assert abs(ups - n * fraction) <= 5 * np.sqrt(n * fraction * (1 - fraction)) + 1


def test_stochastic_result_is_one_of_the_two_neighbours():
    x = RNG.standard_normal(100_003).astype(np.float32) * np.float32(1e3)
    rounded = bits16(convert.f32_to_bf16_stochastic(x, seed=3)).astype(np.uint32)
    truncated = bits32(x) >> 16
    assert np.all((rounded == truncated) | (rounded == truncated + 1))


@pytest.mark.parametrize("shape", [(1001,), (3, 5, 7), (), (0,)])
def test_stochastic_matches_twin_in_any_thread_count(shape, num_threads):
    x = RNG.standard_normal(shape).astype(np.float32)
    rounded = convert.f32_to_bf16_stochastic(x, seed=2**64 - 1)
    assert rounded.shape == shape and rounded.dtype == bfloat16
    np.testing.assert_array_equal(bits16(rounded), bf16_stochastic_twin(x, 2**64 - 1))


def test_stochastic_is_deterministic_per_seed():
    x = RNG.standard_normal(10_000).astype(np.float32)
    first = bits16(convert.f32_to_bf16_stochastic(x, seed=1))
    np.testing.assert_array_equal(first, bits16(convert.f32_to_bf16_stochastic(x, seed=1)))
    assert np.any(first != bits16(convert.f32_to_bf16_stochastic(x, seed=2)))


def test_stochastic_nan_and_inf():
    special = np.array([0x7F800000, 0xFF800000, 0x7F800001, 0xFFC12345, 0x7FFFFFFF], np.uint32)
    special = np.tile(special, 1000).view(np.float32)
    rounded = bits16(convert.f32_to_bf16_stochastic(special, seed=9))
    expected = np.array([0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7FC0], np.uint16)
    np.testing.assert_array_equal(rounded, np.tile(expected, 1000))
    finite = random_f32_bits(1_000_000)
    finite = finite[np.isfinite(finite)]
    assert not np.any(np.isnan(convert.bf16_to_f32(convert.f32_to_bf16_stochastic(finite, seed=9))))


def test_stochastic_overflow_beyond_largest_finite_goes_to_inf_with_the_distance():
    n = 1 << 16
    largest = 0x7F7F
    x = np.full(n, (largest << 16) | 0x4000, dtype=np.uint32).view(np.float32)  # a quarter above
    rounded = bits16(convert.f32_to_bf16_stochastic(x, seed=4))
    assert set(np.unique(rounded)) == {0x7F7F, 0x7F80}
    assert abs(np.count_nonzero(rounded == 0x7F80) - n / 4) <= 5 * np.sqrt(n * 3 / 16)


# ---------------------------------------------------------------- scalar helpers in a fused loop


@njit(cache=True)
def scale_then_round(x, scale, seed):
    """A fused loop as an optimizer would write it: float64 arithmetic, bf16/f16 bits out."""
    nearest = np.empty(x.size, dtype=np.uint16)
    stochastic = np.empty(x.size, dtype=np.uint16)
    given_bits = np.empty(x.size, dtype=np.uint16)
    half = np.empty(x.size, dtype=np.uint16)
    back = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        value = x[i] * scale
        nearest[i] = convert.round_bf16_nearest_bits(value)
        stochastic[i] = convert.round_bf16_stochastic_bits(value, seed, convert.BF16_ROUNDING_STREAM, i)
        given_bits[i] = convert.round_bf16_stochastic_with_bits(value, np.uint32(i * 257))
        half[i] = convert.round_f16_nearest_bits(value)
        back[i] = convert.bf16_bits_to_f32(nearest[i]) + convert.f16_bits_to_f32(half[i])
    return nearest, stochastic, given_bits, half, back


def test_scalar_helpers_in_a_fused_loop_take_float64_through_float32():
    x = RNG.standard_normal(257)
    nearest, stochastic, given_bits, half, back = scale_then_round(x, 3.0, np.uint64(8))
    x32 = (x * 3.0).astype(np.float32)
    np.testing.assert_array_equal(nearest, bits16(x32.astype(bfloat16)))
    np.testing.assert_array_equal(stochastic, bf16_stochastic_twin(x32, 8))
    random16 = (np.arange(257, dtype=np.uint64) * 257) & 0xFFFF
    np.testing.assert_array_equal(given_bits, ((bits32(x32) + random16) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(half, bits16(x32.astype(np.float16)))
    expected = x32.astype(bfloat16).astype(np.float32) + x32.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back, expected)


# ---------------------------------------------------------------- shapes and arguments


@pytest.mark.parametrize(
    "function, dtype",
    [
        (convert.f32_to_bf16, np.float32),
        (lambda x: convert.f32_to_bf16_stochastic(x, 0), np.float32),
        (convert.f32_to_f16, np.float32),
        (convert.bf16_to_f32, bfloat16),
        (convert.f16_to_f32, np.float16),
    ],
    ids=["f32_to_bf16", "f32_to_bf16_stochastic", "f32_to_f16", "bf16_to_f32", "f16_to_f32"],
)
def test_zero_dim_empty_and_non_contiguous(function, dtype):
    base = RNG.standard_normal((6, 9)).astype(dtype)
    for x in (base[1:, ::2], base.T, np.asarray(base[2, 3]), base[:0]):
        result = function(x)
        assert result.shape == x.shape and result.flags.c_contiguous
        np.testing.assert_array_equal(raw_bits(result), raw_bits(function(np.ascontiguousarray(x))))


def test_out_is_written_and_returned(num_threads):
    x = RNG.standard_normal((5, 7)).astype(np.float32)
    out = np.empty((5, 7), dtype=bfloat16)
    assert convert.f32_to_bf16_stochastic(x, 3, out=out) is out
    np.testing.assert_array_equal(bits16(out), bf16_stochastic_twin(x, 3))
    widened = np.empty((5, 7), dtype=np.float32)
    assert convert.bf16_to_f32(out, out=widened) is widened
    np.testing.assert_array_equal(widened, out.astype(np.float32))
    half = np.empty((5, 7), dtype=np.float16)
    assert convert.f32_to_f16(x, out=half) is half
    np.testing.assert_array_equal(half, x.astype(np.float16))


def test_non_contiguous_input_rounds_like_its_contiguous_copy():
    base = RNG.standard_normal((6, 9)).astype(np.float32)
    np.testing.assert_array_equal(bits16(convert.f32_to_bf16(base.T)), bits16(base.T.astype(bfloat16)))
    np.testing.assert_array_equal(
        bits16(convert.f32_to_bf16_stochastic(base[:, ::2], 7)),
        bits16(convert.f32_to_bf16_stochastic(np.ascontiguousarray(base[:, ::2]), 7)),
    )


def test_bad_arguments_name_the_function_and_the_received_value():
    with pytest.raises(TypeError, match="f32_to_bf16 expects a float32 array, got dtype float64"):
        convert.f32_to_bf16(np.zeros(3))
    with pytest.raises(TypeError, match="bf16_to_f32 expects a bfloat16 array, got dtype float32"):
        convert.bf16_to_f32(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="f16_to_f32 expects a numpy.ndarray, got list"):
        convert.f16_to_f32([1.0])
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        convert.f32_to_bf16_stochastic(np.zeros(3, np.float32), -1)
    with pytest.raises(TypeError, match="f32_to_f16: out must be a float16 array, got float32"):
        convert.f32_to_f16(np.zeros(3, np.float32), out=np.zeros(3, np.float32))
    message = r"f16_to_f32: out must be C-contiguous with the input's shape \(3,\), got shape \(4,\)"
    with pytest.raises(ValueError, match=message):
        convert.f16_to_f32(np.zeros(3, np.float16), out=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 3\) \(not C-contiguous\)"):
        convert.f32_to_bf16(np.zeros((2, 3), np.float32), out=np.zeros((3, 2), bfloat16).T)
