"""The finiteness check of 16-bit parameters updated in place (no float32 master copy).

A bfloat16 or float16 value is Inf or NaN exactly when all its exponent bits are set (as in
npcpu.kernels.grads for float32 and float64):

    bfloat16  s eeeeeeee mmmmmmm   exponent mask 0x7f80
    float16   s eeeee mmmmmmmmmm   exponent mask 0x7c00

The kernel reads the parameter's bits once (2 bytes an element), beside an optimizer update that
reads and writes the parameter, its gradient and its state.
"""

import numpy as np
from numba import njit, prange

EXPONENT_MASKS_16 = {"bfloat16": np.uint16(0x7F80), "float16": np.uint16(0x7C00)}


@njit(parallel=True, cache=True)
def count_nonfinite_bits(bits, exponent_mask):
    """The number of entries i with ``bits[i] & exponent_mask == exponent_mask``.

    Parameters
    ----------
    bits : (n,) uint16
        A 16-bit float array viewed as unsigned integers.
    exponent_mask : uint16
        ``EXPONENT_MASKS_16[dtype name]``.
    """
    count = 0
    for i in prange(bits.shape[0]):
        if (bits[i] & exponent_mask) == exponent_mask:
            count += 1
    return count
