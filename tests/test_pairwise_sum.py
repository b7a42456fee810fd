"""block_sum: NumPy's own sum (its twin) bit for bit, over every length it takes."""

import numpy as np
import pytest

from npcpu.kernels.pairwise_sum import BLOCK, block_sum


@pytest.mark.parametrize("scale", ["unit", "mixed"])
def test_block_sum_has_numpys_bits_at_every_length(num_threads, scale):
    rng = np.random.default_rng(0)
    for n in range(BLOCK + 1):
        for _ in range(20):
            a = rng.standard_normal(n)
            if scale == "mixed":  # magnitudes far apart: every change of order changes the bits
                a *= rng.choice([1e-8, 1.0, 1e8], n)
            assert block_sum(a) == np.add.reduce(a), n


def test_block_sum_of_special_values_is_numpys():
    for values in ([], [-0.0], [-0.0] * 9, [np.nan, 1.0], [np.inf, -np.inf] * 5, [1e308] * 10):
        a = np.array(values, dtype=np.float64)
        with np.errstate(all="ignore"):
            expected = np.add.reduce(a)
        got = block_sum(a)
        assert (np.isnan(got) and np.isnan(expected)) or (
            got == expected and np.signbit(got) == np.signbit(expected)), values
