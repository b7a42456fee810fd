"""The native float32 GEMMs (npcpu.blas_native.float32: the fma tile of npcpu.kernels.dpbf16 on the
driver of npcpu.kernels.gemm_bf16) against NumPy in float64 and against BLAS sgemm; the dispatch of
npcpu.blas's float32 GEMMs (npcpu.backend.set_f32_gemm, NPCPU_F32_GEMM) and what `npcpu info`
says about it.

Tolerance: each product is exact in float64 and each float32 fused multiply-add rounds once, in an
order of its own, so |native - exact| <= FP32_ORDER * sum_k |a_k b_k| per element (a few float32
ulps of the sum of magnitudes), as in tests/test_gemm_bf16.py.
"""

import numba
import numpy as np
import pytest

from npcpu import backend, blas, blas_native, info
from npcpu.kernels import gemm_bf16
from npcpu.kernels.dpbf16 import COLUMNS, ROWS
from test_gemm_bf16 import (FP32_ORDER, assert_order_close, check_block_packing,
                            check_in_task_packing_is_exact, panels)

native = blas_native.float32
# (N, K, M): rows of x, its features (the sum of y = x W^T; K odd and even), rows of W
SHAPES = [(1, 1, 1), (13, 17, 31), (33, 31, 13), (17, 256, 33), (255, 13, 17), (31, 255, 1),
          (2 * gemm_bf16.BLOCK_ROWS + 5, 2 * gemm_bf16.BLOCK_PAIRS + 3,
           gemm_bf16.BLOCK_COLUMNS + 9)]  # several blocks of rows, of the sum and of columns


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def exact(a, b):
    """a @ b in float64, and the sum of magnitudes |a| @ |b| that bounds its rounding."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return a @ b, np.abs(a) @ np.abs(b)


@pytest.mark.parametrize("rows, columns", [(7, 2 * COLUMNS + 3), (37, 9 * COLUMNS + 1)])
def test_packing_matches_numpy(num_threads, rows, columns):
    """float32 words are the values themselves: panel j, row r, column c at
    ((j * R) + r) * COLUMNS + c, zero columns past the last."""
    source = np.random.default_rng(0).standard_normal((rows, columns)).astype(np.float32)
    assert gemm_bf16.pack_panels(source, True).dtype == np.float32
    np.testing.assert_array_equal(gemm_bf16.pack_panels(source, True), panels(source))
    np.testing.assert_array_equal(gemm_bf16.pack_panels(source, False), panels(source.T))


def test_block_packing_matches_numpy():
    check_block_packing(np.random.default_rng(6).standard_normal((37, 3 * COLUMNS + 5))
                        .astype(np.float32))


@pytest.mark.parametrize("n", [37, gemm_bf16.BLOCK_ROWS + 17])  # one block of rows of C, two
def test_in_task_packing_gives_the_gemm_bit_for_bit(num_threads, n):
    """dx = dz W with W packed inside the tasks: several blocks of the sum and of columns (the
    last one short of a panel)."""
    rng = np.random.default_rng(7)
    m, k = 2 * gemm_bf16.BLOCK_PAIRS + 3, gemm_bf16.BLOCK_COLUMNS + 2 * COLUMNS + 9
    dz, w = f32(rng, n, m), f32(rng, m, k)
    assert_order_close(check_in_task_packing_is_exact(dz.reshape(-1), n, w, num_threads),
                       *exact(dz, w))


@pytest.mark.parametrize("n, k, m", SHAPES)
def test_three_gemms_match_float64(num_threads, n, k, m):
    rng = np.random.default_rng(n * k * m)
    x, w, dz = f32(rng, n, k), f32(rng, m, k), f32(rng, n, m)
    assert_order_close(native.matmul_weight_transposed(x, w), *exact(x, w.T))
    assert_order_close(native.matmul_weight(dz, w), *exact(dz, w))
    product, magnitude = exact(dz.T, x)
    dx, magnitude_dx = exact(dz, w)
    for beta in (0.0, 1.0):
        grad, out = f32(rng, m, k), f32(rng, n, k)
        grad_before, out_before = grad.copy(), out.copy()
        if beta == 0.0:  # beta = 0 must not read grad or out
            grad[0, 0] = grad[-1, -1] = np.nan
            out[:] = np.nan
        native.accumulate_weight_grad(grad, dz, x, beta)
        assert_order_close(grad, product + beta * grad_before,
                           magnitude + beta * np.abs(grad_before))
        assert native.matmul_weight(dz, w, out=out, beta=beta) is out
        assert_order_close(out, dx + beta * out_before, magnitude_dx + beta * np.abs(out_before))


def test_strided_and_transposed_operands(num_threads):
    """Views that are not C-contiguous (every other column, a transpose) give the same results."""
    rng = np.random.default_rng(1)
    x, w, dz = f32(rng, 37, 2 * 45)[:, ::2], f32(rng, 29, 45), f32(rng, 29, 37).T
    assert not x.flags.c_contiguous and not dz.flags.c_contiguous
    assert_order_close(native.matmul_weight_transposed(x, w), *exact(x, w.T))
    assert_order_close(native.matmul_weight(dz, w), *exact(dz, w))
    grad = np.zeros((29, 45), np.float32)
    native.accumulate_weight_grad(grad, dz, x, 0.0)
    assert_order_close(grad, *exact(dz.T, x))


def test_tile_rows_past_the_last_repeat_it_and_stay_in_bounds():
    rng = np.random.default_rng(2)
    x, w = f32(rng, 3, 4), f32(rng, ROWS - 5, 4)
    assert_order_close(native.matmul_weight_transposed(x, w), *exact(x, w.T))


def test_nan_and_inf_propagate_as_in_blas(blas_f32_gemm):
    rng = np.random.default_rng(3)
    x, w, dz = f32(rng, 17, 41), f32(rng, 35, 41), f32(rng, 17, 35)
    x[3, 7], w[5, 40], w[9, 0], dz[2, 34] = np.nan, np.inf, -np.inf, np.nan
    for ours, theirs in [
            (native.matmul_weight_transposed(x, w), blas.matmul_weight_transposed(x, w)),
            (native.matmul_weight(dz, w), blas.matmul_weight(dz, w))]:
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(theirs))
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
        assert np.isnan(ours).any() and np.isinf(ours).any()


def test_empty_batch_and_bad_operands():
    rng = np.random.default_rng(4)
    grad = f32(rng, 3, 5)
    native.accumulate_weight_grad(grad, np.zeros((0, 3), np.float32), np.zeros((0, 5), np.float32),
                                  0.0)
    np.testing.assert_array_equal(grad, 0.0)
    empty = native.matmul_weight_transposed(np.zeros((0, 5), np.float32), f32(rng, 3, 5))
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="native float32 GEMM: W must have shape"):
        native.matmul_weight_transposed(f32(rng, 4, 5), f32(rng, 3, 6))
    with pytest.raises(TypeError, match="native float32 GEMM: x must be float32, got float64"):
        native.matmul_weight_transposed(np.zeros((4, 5)), f32(rng, 3, 5))
    with pytest.raises(ValueError, match="native float32 GEMM: dW must have shape"):
        native.accumulate_weight_grad(np.zeros((3, 4), np.float32), f32(rng, 2, 3), f32(rng, 2, 5))


# -- npcpu.blas's dispatch ----------------------------------------------------------------------
def _count_native(monkeypatch) -> list:
    calls = []
    for name in ("matmul_weight_transposed", "matmul_weight", "accumulate_weight_grad"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("n, k, m", [(13, 17, 31), (768, 128, 384)])  # one GEMM small, one not
def test_blas_forced_native_and_forced_blas_agree(native_f32_gemm, monkeypatch, num_threads,
                                                  n, k, m):
    rng = np.random.default_rng(n + k + m)
    x, w, dz, start = f32(rng, n, k), f32(rng, m, k), f32(rng, n, m), f32(rng, m, k)
    calls = _count_native(monkeypatch)

    def three():
        grad = start.copy()
        blas.accumulate_weight_grad(grad, dz, x, 1.0)
        dx = np.full((n, k), np.nan, np.float32)
        blas.matmul_weight(dz, w, out=dx, beta=0.0)
        return blas.matmul_weight_transposed(x, w), blas.matmul_weight(dz, w), dx, grad
    ours = three()
    assert calls == ["accumulate_weight_grad", "matmul_weight", "matmul_weight_transposed",
                     "matmul_weight"]
    assert numba.get_num_threads() == num_threads  # a small GEMM's one thread is given back
    backend.set_f32_gemm("blas")
    theirs = three()
    assert len(calls) == 4  # nothing more went to the native kernels
    magnitudes = [exact(x, w.T)[1], exact(dz, w)[1], exact(dz, w)[1],
                  exact(dz.T, x)[1] + np.abs(start)]
    for a, b, magnitude in zip(ours, theirs, magnitudes):
        np.testing.assert_array_less(np.abs(a - b), 2 * FP32_ORDER * magnitude + 1e-30)


def test_float64_and_skinny_gemms_never_take_the_native_path(native_f32_gemm, monkeypatch):
    calls = _count_native(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 30))
    blas.matmul_weight_transposed(x, rng.standard_normal((25, 30)))
    blas.matmul_weight_transposed(x.astype(np.float32), f32(rng, blas.SKINNY_OUTPUTS, 30))
    assert calls == []


@pytest.fixture
def fresh_f32_choice():
    """The float32 path found again from what the test sets up (the backend keeps it per process)."""
    cached = (backend._auto_prefers_native_f32, backend.f32_gemm_reason,
              backend.native_f32_gemm_unavailable)
    for function in cached:
        function.cache_clear()
    yield
    for function in cached:
        function.cache_clear()
    backend.set_f32_gemm(None)


@pytest.mark.parametrize("vendor, core, takes_native", [
    ("openblas", "Haswell", True), ("openblas", "Zen", True), ("openblas", "SkylakeX", False),
    ("openblas", "Cooperlake", False), ("mkl", None, False)])
def test_auto_follows_the_blas_kernels(fresh_f32_choice, monkeypatch, vendor, core, takes_native):
    """auto: native on an AVX-512 CPU whose OpenBLAS runs kernels without AVX-512; the BLAS when it
    has AVX-512 kernels of its own, or is another vendor's."""
    monkeypatch.setattr(backend, "native_f32_gemm_unavailable", lambda: None)
    monkeypatch.setattr(backend, "blas_info", lambda: {"vendor": vendor, "architecture": core})
    monkeypatch.delenv(backend.F32_GEMM_ENV, raising=False)
    assert backend.use_native_f32_gemm() is takes_native
    assert backend.f32_gemm_path() == ("native avx512f" if takes_native else "blas sgemm")
    assert (core or vendor) in backend.f32_gemm_reason()
    monkeypatch.setenv(backend.F32_GEMM_ENV, "native")
    assert backend.use_native_f32_gemm()
    monkeypatch.setenv(backend.F32_GEMM_ENV, "blas")
    assert not backend.use_native_f32_gemm()


def test_without_avx512f_native_is_refused(fresh_f32_choice, monkeypatch):
    monkeypatch.setattr(backend, "cpu_has_avx512f", lambda: False)
    monkeypatch.delenv(backend.F32_GEMM_ENV, raising=False)
    assert "AVX-512F" in backend.native_f32_gemm_unavailable()
    assert backend.f32_gemm_path() == "blas sgemm"
    with pytest.raises(RuntimeError, match="f32_gemm = 'native' cannot run here: the CPU has no"):
        backend.set_f32_gemm("native")
    assert backend.f32_gemm_path() == "blas sgemm"  # the refused setting is not kept
    monkeypatch.setenv(backend.F32_GEMM_ENV, "native")
    with pytest.raises(RuntimeError, match="cannot run here"):
        blas.matmul_weight_transposed(np.ones((3, 4), np.float32), np.ones((20, 4), np.float32))


def test_numba_target_without_avx512f(fresh_f32_choice, monkeypatch):
    """A Numba target chosen by NUMBA_CPU_NAME / NUMBA_CPU_FEATURES without avx512f (avx512fp16 is
    another feature) keeps the native kernels off."""
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512fp16")
    reason = backend.native_f32_gemm_unavailable()
    expected = "Numba's target CPU has no avx512f" if backend.cpu_has_avx512f() else "AVX-512F"
    assert expected in reason


def test_settings_environment_and_info(fresh_f32_choice, monkeypatch):
    monkeypatch.setenv(backend.F32_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="NPCPU_F32_GEMM must be one of"):
        backend.f32_gemm_path()
    with pytest.raises(ValueError, match="f32_gemm must be one of"):
        backend.set_f32_gemm("fast")
    monkeypatch.setenv(backend.F32_GEMM_ENV, "blas")
    assert backend.f32_gemm_path() == "blas sgemm"
    assert "fp32 GEMM    blas sgemm (blas by NPCPU_F32_GEMM; auto's reason: " in info.format_info(
        info.system_info())
    monkeypatch.setenv(backend.F32_GEMM_ENV, "auto")
    text = info.format_info(info.system_info())
    assert f"fp32 GEMM    {backend.f32_gemm_path()} (auto: {backend.f32_gemm_reason()})" in text
    assert backend.set_f32_gemm("blas") == "blas sgemm"
    assert "(blas by set_f32_gemm;" in info.format_info(info.system_info())


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("rows, columns", [(1, 1), (13, 31), (768, 384), (768, 512), (768, 65),
                                           (225, 257), (4096, 1000), (128, 4096)])
def test_blocks_are_even_and_cover_c(threads, rows, columns):
    """_block_shape: multiples of the tile within the block limits, covering C, the last block of
    rows and of columns short of the others by less than one tile per block (an even split), and
    at 2 threads an even task count."""
    block_rows, block_columns = gemm_bf16._block_shape(rows, columns, threads)
    assert block_rows % ROWS == 0 and 0 < block_rows <= gemm_bf16.BLOCK_ROWS
    assert block_columns % COLUMNS == 0 and 0 < block_columns <= gemm_bf16.BLOCK_COLUMNS
    row_tiles, panels = -(-rows // ROWS), -(-columns // COLUMNS)
    row_blocks = -(-row_tiles // (block_rows // ROWS))
    column_blocks = -(-panels // (block_columns // COLUMNS))
    assert row_blocks * block_rows >= rows and column_blocks * block_columns >= columns
    # the last block of each kind is at most one tile short of the others
    assert row_tiles - (row_blocks - 1) * (block_rows // ROWS) >= block_rows // ROWS - row_blocks
    last_panels = panels - (column_blocks - 1) * (block_columns // COLUMNS)
    assert last_panels >= block_columns // COLUMNS - column_blocks
    if threads == 2 and row_tiles >= 2:
        assert (row_blocks * column_blocks) % threads == 0


def test_results_do_not_depend_on_the_thread_count(native_f32_gemm):
    """Each element of C is summed over all of R by one task in one order, however C is split."""
    rng = np.random.default_rng(5)
    x, w, dz = f32(rng, 768, 128), f32(rng, 384, 128), f32(rng, 768, 384)
    results = []
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            grad = np.zeros((384, 128), np.float32)
            native.accumulate_weight_grad(grad, dz, x, 0.0)
            results.append((native.matmul_weight_transposed(x, w), native.matmul_weight(dz, w), grad))
        finally:
            numba.set_num_threads(previous)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
