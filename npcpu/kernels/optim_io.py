"""What every fused optimizer kernel (npcpu.kernels.optim) is built from: blocks, fused multiply-add,
loads and stores of float or bf16-bit arrays with stochastic rounding, and the Rounding bundle.

Legend: n = number of elements of one parameter tensor (every array is a flat (n,) view);
BLOCK = 1024 elements, the unit of work of one prange iteration (the last block may be shorter);
T = the number of Numba threads. Arrays are float32 or float64, or bfloat16 passed as its uint16
bits; `load` widens bf16 bits to float32 and `store` rounds back (stochastically or to nearest
even) with the shared helper of npcpu.kernels.convert.

Stochastic rounding takes its random bits from npcpu.kernels.rng, one 64-bit hash per 4 elements of
each array that is rounded: the array in slot s (PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT,
MAX_EXP_AVG_SQ_SLOT; SGD's momentum buffer takes EXP_AVG_SLOT) rounds element i with the 16-bit
field i mod 4 (bits 16k .. 16k + 15 for field k, on little-endian CPUs) of
hash_index(seed, stream, 4 * (i // 4) + s). The stream encodes (step, parameter index), so the bits
depend on neither thread count nor call order. A kernel's `Rounding.first` is the index in the
whole tensor of its arrays' first element (a multiple of 4): updating a tensor a block of rows at a
time (npcpu.optim.Optimizer.fuse_into_backward) draws the same bits as updating it whole.
"""

from collections import namedtuple

import numba
import numpy as np
from numba import njit, types, uint32, uint64
from numba.extending import intrinsic, overload

from npcpu.kernels.convert import bf16_bits_to_f32, round_bf16_stochastic_with_bits
from npcpu.kernels.rng import hash_index

BLOCK = 1024
"""Elements per prange iteration, a multiple of 4 (one hash per 4 elements). Small, so that drawing
a block's random bits (compute only) overlaps the memory traffic of the blocks around it (larger
blocks measured slower with bf16 states). LAMB's per-block sums are what makes its norms the same
for any thread count: they are added in block order."""
ELEMENTS_PER_HASH = 4
"""Elements rounded with the bits of one 64-bit hash: a range of a tensor updated on its own must
start at a multiple of it to draw the same bits as the whole tensor's update."""
PARAM_SLOT, EXP_AVG_SLOT, EXP_AVG_SQ_SLOT, MAX_EXP_AVG_SQ_SLOT = 0, 1, 2, 3
SLOTS = 4


@njit(cache=True, error_model="numpy")
def block_count(n):
    """The number of BLOCK-element blocks that cover n elements (LAMB's partial-sum scratch length)."""
    return -(-n // BLOCK)


# ---------------------------------------------------------------------------------------------
# fused multiply-add, as torch's vectorized CPU kernels compute add(alpha=), lerp and addcmul
# ---------------------------------------------------------------------------------------------
@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's llvm.fma; one instruction on CPUs with FMA).

    torch's CPU kernels compute x.add_(y, alpha=a) as fma(a, y, x), x.lerp_(y, w) (w < 0.5) as
    fma(w, y - x, x) and x.addcmul_(y, z, value=c) as fma(c * y, z, x); writing the same here makes
    the updates bit-identical to torch.optim's, not merely close.
    """
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


# ---------------------------------------------------------------------------------------------
# load / store / random bits: one kernel body for float arrays and bf16 bits (Numba specializes
# per dtype, so a float32 state costs nothing for the bf16 case and the other way round)
# ---------------------------------------------------------------------------------------------
def load(array, j):
    """array[j] as a float: bf16 bits are widened to float32, floats are returned as they are."""
    raise NotImplementedError("load is only callable from Numba-compiled code")


def store(array, j, value, stochastic, random16):
    """array[j] = value; returns the value as stored (after rounding, widened back to a float).

    bf16 bits are rounded stochastically with the 16 random bits random16[j] when `stochastic`,
    else to nearest even. Float arrays take the value as it is (and ignore `random16`).
    """
    raise NotImplementedError("store is only callable from Numba-compiled code")


def draw_random_fields(fields, array, stochastic, seed, stream, slot, start):
    """Fill fields[: array.size] with the 16-bit random fields of the block `array` (its elements
    are start .. start + array.size - 1 of the tensor) when it holds bf16 bits and `stochastic`.

    `fields` is the thread's (BLOCK,) uint16 scratch row for this slot. Nothing is drawn for float
    arrays nor when rounding to nearest (`store` then reads the row but does not use it).
    """
    raise NotImplementedError("draw_random_fields is only callable from Numba-compiled code")


def block_of(array, start, stop):
    """array[start:stop], or None for None (an optional state such as AMSGrad's maximum)."""
    raise NotImplementedError("block_of is only callable from Numba-compiled code")


@overload(load)
def _load_overload(array, j):
    if array.dtype == types.uint16:
        return lambda array, j: bf16_bits_to_f32(array[j])
    return lambda array, j: array[j]


@overload(store)
def _store_overload(array, j, value, stochastic, random16):
    if array.dtype == types.uint16:
        def store_bf16(array, j, value, stochastic, random16):
            # round_bf16_stochastic_with_bits adds its second argument to the 16 dropped bits and
            # truncates; with 0x7fff + (the last kept bit) that is round-to-nearest-even, bit for bit
            # round_bf16_nearest_bits (NaN and Inf included). One rounding for both modes keeps the
            # SIMD loop short: the select is on the addend, not between two roundings. (random16 is
            # read unconditionally: a load under a condition would keep LLVM from vectorizing.)
            random = uint32(random16[j])
            kept_lsb = (np.float32(value).view(np.uint32) >> uint32(16)) & uint32(1)
            addend = random if stochastic else uint32(0x7FFF) + kept_lsb
            bits = round_bf16_stochastic_with_bits(value, addend)
            array[j] = bits
            return bf16_bits_to_f32(bits)
        return store_bf16

    def store_float(array, j, value, stochastic, random16):
        array[j] = value
        return array[j]
    return store_float


@overload(draw_random_fields)
def _draw_random_fields_overload(fields, array, stochastic, seed, stream, slot, start):
    if isinstance(array, types.Array) and array.dtype == types.uint16:
        def draw(fields, array, stochastic, seed, stream, slot, start):
            if stochastic:
                hashes = fields.view(np.uint64)  # field k of hash q is element 4 q + k
                for q in range((array.size + 3) // 4):
                    hashes[q] = hash_index(seed, stream, uint64(start + 4 * q + slot))
        return draw
    return lambda fields, array, stochastic, seed, stream, slot, start: None


@overload(block_of)
def _block_of_overload(array, start, stop):
    if isinstance(array, types.NoneType):
        return lambda array, start, stop: None
    return lambda array, start, stop: array[start:stop]


def random_scratch():
    """A (T, SLOTS, BLOCK) uint16 scratch for the kernels' `random` argument: one row per slot and
    per thread Numba may run (T = numba.config.NUMBA_NUM_THREADS, the most that set_num_threads
    allows, so that one scratch serves any thread count). Made in Python (numba.get_num_threads in a
    kernel would keep it from being cached); its contents never matter (rows are drawn before they
    are read, and round-to-nearest ignores them), so one scratch may serve any number of calls."""
    return np.empty((numba.config.NUMBA_NUM_THREADS, SLOTS, BLOCK), dtype=np.uint16)


Rounding = namedtuple("Rounding", ["stochastic", "seed", "stream", "first", "random"])
"""How a kernel stores into bf16 arrays, one argument of every update kernel (a Numba-supported
named tuple, so that no two of these can be swapped by position):

stochastic : bool
    Round stochastically; False: to nearest even (float arrays ignore all of this).
seed, stream : uint64
    The random bits' seed and stream (see the module docstring).
first : uint64
    The index in the whole tensor of the arrays' first element, a multiple of ELEMENTS_PER_HASH.
random : (T, SLOTS, BLOCK) uint16
    A `random_scratch()`.
"""
