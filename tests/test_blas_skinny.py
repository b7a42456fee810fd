"""npcpu.blas on skinny weights (at most SKINNY_OUTPUTS rows): the Numba loops against NumPy."""

import numpy as np
import pytest

from npcpu import backend, blas
from npcpu.kernels import compiled_gemm


@pytest.fixture(params=[1, 2])
def threads(request):
    previous = backend.set_threads(None)
    yield backend.set_threads(request.param)
    backend.set_threads(previous)


@pytest.fixture
def no_blas(monkeypatch):
    """Fail any GEMM that reaches BLAS, so that the tests below check the Numba loops."""
    def refuse(*args, **kwargs):
        raise AssertionError("a skinny GEMM went to BLAS")
    monkeypatch.setattr(blas, "_call", refuse)


SHAPES = [(1, 1, 1), (7, 13, 3), (5, 33, 10), (130, 785, 10), (3, 9, blas.SKINNY_OUTPUTS),
          (17, 31, 7)]  # 17 rows: four 4-row tiles and one left over; 7 outputs: one 5-output tile and 2


KERNEL_SHAPES = SHAPES + [(8, 5, 2), (9, 1, 1), (4, 3, 5), (6, 20, 11)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, inner, outputs", KERNEL_SHAPES)
def test_skinny_kernels_match_numpy(threads, rows, inner, outputs, dtype):
    """The skinny path's kernels (npcpu.kernels.compiled_gemm over every row in order) against
    their NumPy statements: y = x W^T, grad += dz^T x."""
    rng = np.random.default_rng(rows * 1000 + inner + outputs)
    x = rng.standard_normal((rows, inner)).astype(dtype)
    weight = rng.standard_normal((outputs, inner)).astype(dtype)
    dz = rng.standard_normal((rows, outputs)).astype(dtype)
    grad = rng.standard_normal((outputs, inner)).astype(dtype)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12

    y = np.full((rows, outputs), np.nan, dtype=dtype)  # every element written
    every_row, no_bias = np.arange(rows), np.empty(0, dtype)
    compiled_gemm.linear_forward(x, every_row, weight, no_bias, False, y, 0, inner)
    np.testing.assert_allclose(y, x.astype(np.float64) @ weight.T.astype(np.float64),
                               rtol=tolerance, atol=tolerance * np.sqrt(inner))

    expected = grad.astype(np.float64) + dz.T.astype(np.float64) @ x.astype(np.float64)
    compiled_gemm.add_weight_grad(dz, x, every_row, grad, 0, inner)
    np.testing.assert_allclose(grad, expected, rtol=tolerance, atol=tolerance * np.sqrt(rows))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, inner, outputs", SHAPES)
def test_skinny_forward_matches_numpy(threads, no_blas, rows, inner, outputs, dtype):
    rng = np.random.default_rng(rows * 1000 + inner + outputs)
    x = rng.standard_normal((rows, inner)).astype(dtype)
    weight = rng.standard_normal((outputs, inner)).astype(dtype)
    y = blas.matmul_weight_transposed(x, weight)
    assert y.shape == (rows, outputs) and y.dtype == dtype and y.flags.c_contiguous
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, x.astype(np.float64) @ weight.T.astype(np.float64),
                               rtol=tolerance, atol=tolerance * np.sqrt(inner))


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("rows, inner, outputs", SHAPES)
def test_skinny_weight_grad_matches_numpy(threads, no_blas, rows, inner, outputs, beta):
    rng = np.random.default_rng(rows * 1000 + inner + outputs)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    dy = rng.standard_normal((rows, outputs)).astype(np.float32)
    grad = rng.standard_normal((outputs, inner)).astype(np.float32)
    expected = dy.T.astype(np.float64) @ x.astype(np.float64)
    if beta == 0.0:
        grad[0, 0] = np.nan  # overwritten, never read
    else:
        expected += beta * grad
    blas.accumulate_weight_grad(grad, dy, x, beta)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * np.sqrt(rows))


def test_wide_weights_and_strided_operands_still_go_to_blas(monkeypatch):
    calls = []
    real_call = blas._call
    monkeypatch.setattr(blas, "_call", lambda *a, **k: calls.append(1) or real_call(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    wide = rng.standard_normal((blas.SKINNY_OUTPUTS + 1, 8)).astype(np.float32)
    np.testing.assert_allclose(blas.matmul_weight_transposed(x, wide), x @ wide.T, rtol=1e-5,
                               atol=1e-5)
    strided = rng.standard_normal((6, 16)).astype(np.float32)[:, ::2]
    skinny = wide[:3]
    np.testing.assert_allclose(blas.matmul_weight_transposed(strided, skinny), strided @ skinny.T,
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
