"""Results on this CPU and platform equal the x86-64 reference (tests/platform_reference.py).

On x86-64 this checks that another CPU (AVX2 or AVX-512 kernels, another BLAS build) agrees with the
machine that wrote the reference; on aarch64 and macOS it is the check that every kernel runs and
computes the same numbers there.
"""

import numpy as np
import pytest

from tests.platform_reference import REFERENCE, outputs

# float32 results differ where the summation order does (BLAS kernels, FMA contraction): each
# array is compared relative to its own largest magnitude.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def results():
    return outputs()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def test_the_same_cases_run(results, reference):
    assert sorted(results) == sorted(reference)


def test_results_match_the_reference(results, reference):
    mismatched = []
    for name, expected in reference.items():
        got = results[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if np.issubdtype(expected.dtype, np.floating):
            scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
            error = float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0)) / scale
            if not error <= RELATIVE_TOLERANCE:
                mismatched.append(f"{name}: largest difference {error:.2e} of its largest value")
        elif not np.array_equal(got, expected):
            mismatched.append(f"{name}: {np.count_nonzero(got != expected)} of {expected.size} differ")
    assert not mismatched, "\n".join(mismatched)
