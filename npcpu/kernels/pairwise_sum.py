"""The sum of a short contiguous float64 vector in NumPy's pairwise order: the bits of ``a.sum()``.

A loss adds its per-row losses once per call; for a small batch NumPy's reduction machinery costs
several times the additions, and a Numba call costs little. The order of the additions is NumPy's
for n <= BLOCK elements (the test compares bit for bit over every such length):

    n < 8          0 + a[0] + a[1] + ... in index order
    8 <= n         0 plus eight running sums r[j] = a[j] + a[j + 8] + a[j + 16] + ... over the
                   first n - n mod 8 elements, combined as
                   ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)),
                   then the last n mod 8 elements added one by one

NumPy halves a longer vector and adds the halves' sums; callers sum those with NumPy itself (a
recursive kernel cannot be loaded from Numba's cache).
"""

from numba import njit

BLOCK = 128
"""The longest vector `block_sum` takes: NumPy sums up to this many elements without halving."""


@njit(cache=True)
def block_sum(a):
    """sum(a) for a contiguous float64 vector of at most BLOCK elements, with the bits of NumPy's
    ``a.sum()`` (see the module docstring)."""
    n = a.size
    if n < 8:
        total = 0.0
        for i in range(n):
            total += a[i]
        return total
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    whole = n - n % 8
    for i in range(8, whole, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    total = 0.0  # as NumPy's reduction, which adds the pairwise sum to 0 (-0.0 gives 0.0)
    total += ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(whole, n):
        total += a[i]
    return total
