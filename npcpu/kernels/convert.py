"""Conversions between float32 and the 16-bit storage types bfloat16 and float16.

Numba knows neither ml_dtypes.bfloat16 nor float16 scalars, so a 16-bit value is handled as its
`uint16` bit pattern and converted with integer operations on the float32 bits (`uint32`):

    float32  s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm   (1, 8, 23 bits)
    bfloat16 s eeeeeeee mmmmmmm                   (1, 8, 7): the top half of a float32
    float16  s eeeee    mmmmmmmmmm                (1, 5, 10)

(Numba computes uint32 arithmetic in 64 bits; a scalar `.view` therefore needs an explicit
`np.uint32(...)` / `np.float32(...)` around its operand.)

Two layers:

- scalar helpers, `@njit(inline="always")`, for other kernels to call element by element inside their
  own fused loops (an optimizer step that writes bf16 parameters, a layer that stashes bf16
  activations): `round_bf16_nearest_bits`, `round_bf16_stochastic_bits` (or
  `round_bf16_stochastic_with_bits` given the random bits), `bf16_bits_to_f32`,
  `round_f16_nearest_bits`, `f16_bits_to_f32`. They take and return scalars; the caller owns the loop.
- array functions (`f32_to_bf16`, `bf16_to_f32`, `f32_to_bf16_stochastic`, `f32_to_f16`,
  `f16_to_f32`) that `npcpu.precision` calls: any shape, non-contiguous input is copied to C order
  first, the result has the input's shape and is C-contiguous, written into `out=` if given.

Every function is bit-exact with the reference cast (ml_dtypes' `astype(bfloat16)`, NumPy's
`astype(float16)`/`astype(float32)`) for every input bit pattern, NaNs included:

- float32 -> bfloat16: a NaN becomes the quiet NaN 0x7fc0 with the input's sign (ml_dtypes drops the
  payload); bfloat16 -> float32 keeps every bit (payloads too).
- float32 -> float16: a NaN keeps its sign and the top 10 bits of its payload, and a payload that
  would become zero becomes 1 so that the result stays a NaN (NumPy's `npy_floatbits_to_halfbits`);
  float16 -> float32 keeps every bit.

There is one parallel path for every size: a prange launch costs little more than the Python
around the call, so a serial twin for small arrays would save microseconds per call at the price
of a second compiled kernel. Large outputs are dominated by the page faults of a freshly allocated
array: pass `out=` to reuse one.
"""

import numpy as np
from numba import njit, prange, uint16, uint32

from npcpu.checks import check_int
from npcpu.dtypes import as_bits, bfloat16, float16
from npcpu.kernels.rng import hash_index

_F32 = np.dtype(np.float32)
BF16_ROUNDING_STREAM = 0xB16
"""The rng stream `f32_to_bf16_stochastic` draws from: element i of a call with seed s uses
`hash_index(s, BF16_ROUNDING_STREAM, i)`. Other kernels that round stochastically pick their own."""

_ABS = uint32(0x7FFFFFFF)
_F32_INF = uint32(0x7F800000)
_BF16_QUIET_NAN = uint32(0x7FC0)
_F16_INF = uint32(0x7C00)


# ---------------------------------------------------------------- scalar helpers: bfloat16


@njit(inline="always", cache=True)
def _bf16_nan_or(bits, rounded):
    """`rounded` (a bf16 pattern computed from float32 `bits`), or a quiet NaN if `bits` is a NaN."""
    if (bits & _ABS) > _F32_INF:
        return uint16((bits >> uint32(16)) & uint32(0x8000) | _BF16_QUIET_NAN)
    return uint16(rounded)


@njit(inline="always", cache=True)
def round_bf16_nearest_bits(value):
    """The bfloat16 bit pattern (uint16) nearest to `value`, ties to even.

    `value` is taken as float32 (a float64 is first rounded to float32). Adding
    ``0x7fff + lsb`` to the float32 bits, where ``lsb`` is bit 16 (the last bit kept), carries into
    the kept half exactly when the dropped half is above 0x8000, or equal to it with an odd ``lsb``:
    round-to-nearest-even. The carry may run into the exponent: that is the correct rounding up to
    the next binade, and from the largest finite values to Inf. Inf stays Inf (its dropped half is
    zero); a NaN becomes the quiet NaN 0x7fc0 with its sign, as in ml_dtypes.
    """
    bits = np.float32(value).view(np.uint32)
    kept_lsb = (bits >> uint32(16)) & uint32(1)
    return _bf16_nan_or(bits, (bits + uint32(0x7FFF) + kept_lsb) >> uint32(16))


@njit(inline="always", cache=True)
def round_bf16_stochastic_with_bits(value, random16):
    """A bfloat16 bit pattern (uint16) for `value`, rounded up or down at random, without bias.

    `random16` is a uniform integer in [0, 2**16) (higher bits are ignored): for callers that
    split one hash into several 16-bit fields; `round_bf16_stochastic_bits` draws it for you.

    With ``lo <= |value| < hi`` the two bfloat16 neighbours and ``|value| = lo + f * (hi - lo)``,
    the result is ``hi`` with probability ``f`` and ``lo`` otherwise, so E[result] = value. It is
    done on the float32 bits: add `random16` to the dropped low half, then truncate; the carry
    happens for random16 >= 0x10000 - low half, i.e. with probability low half / 0x10000 = f. Exact
    values (low half zero) never move. `value` is taken as float32 (a float64 is first rounded).

    Inf stays Inf and NaN becomes the quiet NaN 0x7fc0 with its sign. A finite value beyond the
    largest finite bfloat16 (3.3895e38) rounds up to Inf with probability f, the ``hi`` neighbour of
    the top binade being Inf: that keeps the rounding unbiased up to the overflow, and matches
    round-to-nearest, which sends those values to Inf once f >= 1/2.
    """
    bits = np.float32(value).view(np.uint32)
    return _bf16_nan_or(bits, (bits + (uint32(random16) & uint32(0xFFFF))) >> uint32(16))


@njit(inline="always", cache=True)
def round_bf16_stochastic_bits(value, seed, stream, index):
    """`round_bf16_stochastic_with_bits` with the top 16 bits of ``hash_index(seed, stream, index)``.

    The same (seed, stream, index) gives the same rounding in any thread and any call order.
    """
    random16 = uint32(hash_index(seed, stream, index) >> np.uint64(48))
    return round_bf16_stochastic_with_bits(value, random16)


@njit(inline="always", cache=True)
def bf16_bits_to_f32(bits):
    """The float32 value of the bfloat16 pattern `bits` (uint16): the same bits in the top half."""
    return np.uint32(uint32(bits) << uint32(16)).view(np.float32)


# ---------------------------------------------------------------- scalar helpers: float16


@njit(inline="always", cache=True)
def round_f16_nearest_bits(value):
    """The float16 bit pattern (uint16) nearest to `value`, ties to even, as NumPy's astype (a NaN
    keeps its payload and stays signalling or quiet, as NumPy on x86; Arm's NumPy quiets it).

    `value` is taken as float32. On the magnitude bits ``a`` (sign handled apart):

    - ``a >= 2**16`` (exponent 143 and up): Inf, or for a NaN ``0x7c00 | max(payload >> 13, 1)``.
    - normal range, ``2**-14 <= a < 2**16``: rebias the exponent (127 -> 15, i.e. subtract
      112 << 23) and round the 23-bit mantissa to 10 bits like bfloat16 above (add 0xfff + lsb, keep
      the bits from 13 up); a carry into the exponent gives 65520 and up -> Inf, correctly.
    - below ``2**-14``: a float16 subnormal counts units of 2**-24; the float32 significand
      ``m = 1.mantissa * 2**23`` of a value with exponent e is ``m * 2**(e - 126)`` such units, so
      the result is ``m >> (126 - e)`` rounded to nearest, ties to even, on the bits shifted out.
      A carry out of the subnormals gives 2**-14 (0x0400), correctly. float32 subnormals give 0.
    """
    bits = np.float32(value).view(np.uint32)
    sign = (bits >> uint32(16)) & uint32(0x8000)
    magnitude = bits & _ABS
    if magnitude >= uint32(143 << 23):
        if magnitude > _F32_INF:
            payload = (magnitude >> uint32(13)) & uint32(0x3FF)
            return uint16(sign | _F16_INF | max(payload, uint32(1)))
        return uint16(sign | _F16_INF)
    if magnitude >= uint32(113 << 23):
        kept_lsb = (magnitude >> uint32(13)) & uint32(1)
        rebiased = magnitude - uint32(112 << 23)
        return uint16(sign | ((rebiased + uint32(0xFFF) + kept_lsb) >> uint32(13)))
    exponent = magnitude >> uint32(23)
    if exponent == uint32(0):
        return uint16(sign)
    significand = (magnitude & uint32(0x7FFFFF)) | uint32(0x800000)
    shift = min(uint32(126) - exponent, uint32(25))  # >= 14; at 25 every value rounds to zero
    kept = significand >> shift
    dropped = significand & ((uint32(1) << shift) - uint32(1))
    half = uint32(1) << (shift - uint32(1))
    if dropped > half or (dropped == half and (kept & uint32(1)) == uint32(1)):
        kept += uint32(1)
    return uint16(sign | kept)


@njit(inline="always", cache=True)
def f16_bits_to_f32(bits):
    """The float32 value of the float16 pattern `bits` (uint16), exactly; NaN payloads are kept.

    Normal numbers and Inf/NaN move the exponent field (bias 15 -> 127, all-ones -> all-ones) and
    shift the mantissa up by 13; a subnormal is ``mantissa * 2**-24``, exact in float32.
    """
    bits = uint32(bits)
    sign = (bits & uint32(0x8000)) << uint32(16)
    exponent = bits & _F16_INF
    mantissa = bits & uint32(0x3FF)
    if exponent == _F16_INF:
        magnitude = _F32_INF | (mantissa << uint32(13))
    elif exponent == uint32(0):
        magnitude = np.float32(np.float32(mantissa) * np.float32(2.0**-24)).view(np.uint32)
    else:
        magnitude = ((bits & uint32(0x7FFF)) + uint32((127 - 15) << 10)) << uint32(13)
    return np.uint32(sign | magnitude).view(np.float32)


# ---------------------------------------------------------------- array kernels: flat, C order


@njit(parallel=True, cache=True)
def _round_bf16_nearest_kernel(src, dst):
    """dst[i] = round_bf16_nearest_bits(src[i]); src: (n,) float32, dst: (n,) uint16."""
    for i in prange(src.shape[0]):
        dst[i] = round_bf16_nearest_bits(src[i])


@njit(parallel=True, cache=True)
def _round_bf16_stochastic_kernel(src, seed, stream, dst):
    """dst[i] = round_bf16_stochastic_bits(src[i], seed, stream, i); shapes as above."""
    for i in prange(src.shape[0]):
        dst[i] = round_bf16_stochastic_bits(src[i], seed, stream, i)


@njit(parallel=True, cache=True)
def _widen_bf16_kernel(src, dst):
    """dst[i] = bf16_bits_to_f32(src[i]); src: (n,) uint16, dst: (n,) float32."""
    for i in prange(src.shape[0]):
        dst[i] = bf16_bits_to_f32(src[i])


@njit(parallel=True, cache=True)
def _round_f16_nearest_kernel(src, dst):
    """dst[i] = round_f16_nearest_bits(src[i]); src: (n,) float32, dst: (n,) uint16."""
    for i in prange(src.shape[0]):
        dst[i] = round_f16_nearest_bits(src[i])


@njit(parallel=True, cache=True)
def _widen_f16_kernel(src, dst):
    """dst[i] = f16_bits_to_f32(src[i]); src: (n,) uint16, dst: (n,) float32."""
    for i in prange(src.shape[0]):
        dst[i] = f16_bits_to_f32(src[i])


# ---------------------------------------------------------------- array functions


def _convert(name, kernel, x, x_dtype, out, out_dtype, *kernel_args):
    """Run `kernel(src, *kernel_args, dst)` on `x` flattened in C order; returns `out` or a new array."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} expects a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != x_dtype:
        raise TypeError(f"{name} expects a {x_dtype} array, got dtype {x.dtype}")
    if out is None:
        out = np.empty(x.shape, dtype=out_dtype)
    elif not isinstance(out, np.ndarray) or out.dtype != out_dtype:
        received = getattr(out, "dtype", type(out).__name__)
        raise TypeError(f"{name}: out must be a {out_dtype} array, got {received}")
    elif out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(
            f"{name}: out must be C-contiguous with the input's shape {x.shape}, got shape {out.shape}"
            f"{'' if out.flags.c_contiguous else ' (not C-contiguous)'}"
        )
    src = np.ascontiguousarray(x).reshape(-1)
    kernel(as_bits(src), *kernel_args, as_bits(out).reshape(-1))
    return out


def f32_to_bf16(x, *, out=None):
    """Round a float32 array to bfloat16, to nearest, ties to even (bit-exact with ml_dtypes).

    Parameters
    ----------
    x : ndarray of float32, any shape (S...); copied to C order first if it is not C-contiguous
    out : ndarray of ml_dtypes.bfloat16, shape (S...), C-contiguous, optional
        Written in place of a new array (saves the page faults of a fresh one); must not overlap `x`.

    Returns
    -------
    ndarray of ml_dtypes.bfloat16, shape (S...), C-contiguous (`out` if given)
    """
    return _convert("f32_to_bf16", _round_bf16_nearest_kernel, x, _F32, out, bfloat16)


def f32_to_bf16_stochastic(x, seed, *, out=None):
    """Round a float32 array to bfloat16 stochastically: up with probability equal to the distance.

    Element i (in C order) draws its 16 random bits from
    ``hash_index(seed, BF16_ROUNDING_STREAM, i)``: the result depends on `seed` and the data only,
    never on the thread count. See `round_bf16_stochastic_with_bits` for the rounding and NaN/Inf.

    Parameters
    ----------
    x : ndarray of float32, any shape (S...); copied to C order first if it is not C-contiguous
    seed : int, 0 <= seed < 2**64
    out : ndarray of ml_dtypes.bfloat16, shape (S...), C-contiguous, optional (as in `f32_to_bf16`)

    Returns
    -------
    ndarray of ml_dtypes.bfloat16, shape (S...), C-contiguous (`out` if given)
    """
    seed = check_int("f32_to_bf16_stochastic", "seed", seed, 0, 2**64)
    name, kernel = "f32_to_bf16_stochastic", _round_bf16_stochastic_kernel
    stream = np.uint64(BF16_ROUNDING_STREAM)
    return _convert(name, kernel, x, _F32, out, bfloat16, np.uint64(seed), stream)


def bf16_to_f32(x, *, out=None):
    """Widen a bfloat16 array to float32, exactly (every bit, NaN payloads included).

    Parameters
    ----------
    x : ndarray of ml_dtypes.bfloat16, any shape (S...)
    out : ndarray of float32, shape (S...), C-contiguous, optional (as in `f32_to_bf16`)

    Returns
    -------
    ndarray of float32, shape (S...), C-contiguous (`out` if given)
    """
    return _convert("bf16_to_f32", _widen_bf16_kernel, x, bfloat16, out, _F32)


def f32_to_f16(x, *, out=None):
    """Round a float32 array to float16, to nearest, ties to even (bit-exact with NumPy's astype).

    Parameters
    ----------
    x : ndarray of float32, any shape (S...)
    out : ndarray of float16, shape (S...), C-contiguous, optional (as in `f32_to_bf16`)

    Returns
    -------
    ndarray of float16, shape (S...), C-contiguous (`out` if given)
    """
    return _convert("f32_to_f16", _round_f16_nearest_kernel, x, _F32, out, float16)


def f16_to_f32(x, *, out=None):
    """Widen a float16 array to float32, exactly (every bit, NaN payloads included).

    Parameters
    ----------
    x : ndarray of float16, any shape (S...)
    out : ndarray of float32, shape (S...), C-contiguous, optional (as in `f32_to_bf16`)

    Returns
    -------
    ndarray of float32, shape (S...), C-contiguous (`out` if given)
    """
    return _convert("f16_to_f32", _widen_f16_kernel, x, float16, out, _F32)
