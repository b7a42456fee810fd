"""The native bf16 GEMMs (npcpu.blas_native.bf16, npcpu.kernels.gemm_bf16 / dpbf16) against the widened
float32 GEMMs on the same bfloat16 inputs and against plain NumPy twins; the path dispatch.

Tolerance: the native GEMM sums the same float32 products in another order (pairs, then blocks of
256 pairs), so |native - widened| <= FP32_ORDER * sum_k |a_k b_k| per element (a few float32 ulps of
the sum of magnitudes; the length of the sum enters through that sum).
"""

import ml_dtypes
import numpy as np
import pytest

from npcpu import backend, blas, blas_native, info
from npcpu.kernels import gemm_bf16
from npcpu.kernels.dpbf16 import COLUMNS, ROWS
from npcpu.precision import bfloat16

FP32_ORDER = 4e-6
SHAPES = [(1, 1, 1), (5, 3, 7), (13, 37, 29), (37, 301, 45), (97, 513, 61)]  # (N, K, M); K odd


def bf16(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32).astype(bfloat16)


def wide(a):
    return a.astype(np.float32)


def assert_order_close(actual, expected, magnitude):
    """|actual - expected| <= FP32_ORDER * magnitude elementwise (magnitude = |A| |B| summed), for
    a float32 result of a native GEMM (bf16 or float32 operands)."""
    assert actual.dtype == np.float32
    np.testing.assert_array_less(np.abs(actual - expected), FP32_ORDER * magnitude + 1e-30)


# -- plain NumPy twins of the packing kernels ---------------------------------------------------
def pairs_down_columns(source):
    """words[r, q] = source[2r, q] | source[2r + 1, q] << 16, a zero half past the last row."""
    rows = source.shape[0]
    padded = np.zeros((rows + rows % 2, source.shape[1]), np.uint32)
    padded[:rows] = source
    return padded[0::2] | (padded[1::2] << 16)


def panels(words):
    """(pairs, Q) words -> panel j, pair r, column c at ((j * pairs) + r) * COLUMNS + c, zero
    columns past the last (bf16 pair words, or float32 values, one per word)."""
    pairs, columns = words.shape
    n_panels = -(-columns // COLUMNS)
    padded = np.zeros((pairs, n_panels * COLUMNS), words.dtype)
    padded[:, :columns] = words
    return padded.reshape(pairs, n_panels, COLUMNS).transpose(1, 0, 2).reshape(-1)


def words_down_columns(source):
    """The words running down source's columns: bfloat16 pairs of rows (uint16 bits), or the
    float32 values themselves."""
    return pairs_down_columns(source) if source.dtype == np.uint16 else source


def packed_block(source, pairs_down, pair_start, pair_stop, column_start, column_stop):
    """The twin of gemm_bf16._pack_block: words pair_start:pair_stop of B's columns
    column_start:column_stop in panels, zero past B's last column; B = source's words running
    down its columns (pairs_down), else source^T's."""
    words = words_down_columns(source if pairs_down else source.T)
    return panels(words[pair_start:pair_stop, column_start:column_stop])


def check_block_packing(source):
    """_pack_block against its twin on blocks of `source` (odd rows, columns not a multiple of
    COLUMNS) that start past the first pair and column, end at the last (odd) row and run past
    the last column, in both layouts; nothing past the block is written. A block ends at
    source's last column or a whole number of panels past its first, as gemm's blocks do."""
    for pairs_down in (True, False):
        rows, columns = source.shape if pairs_down else source.shape[::-1]
        pairs = -(-rows // 2) if source.dtype == np.uint16 else rows
        for pair_start, pair_stop, column_start, column_stop in [
                (0, pairs, 0, columns), (3, pairs, COLUMNS, columns), (2, 5, 0, COLUMNS),
                (1, pairs - 2, 7, min(columns, 7 + 2 * COLUMNS)),
                (pairs - 1, pairs, columns - 1, columns)]:
            expected = packed_block(source, pairs_down, pair_start, pair_stop, column_start,
                                    column_stop)
            out = np.full(expected.size + 2 * COLUMNS, 7, gemm_bf16.word_dtype(source))
            gemm_bf16._pack_block(source, pairs_down, pair_start, pair_stop, column_start,
                                  column_stop, out)
            np.testing.assert_array_equal(out[:expected.size], expected)
            np.testing.assert_array_equal(out[expected.size:], 7)


def check_in_task_packing_is_exact(a_words, n_rows, b_source, threads):
    """gemm with B packed a block at a time inside its tasks (b_source) gives bit for bit the
    result of gemm on B packed whole by the NumPy twin: the packing changes no word."""
    pairs, n_columns = words_down_columns(b_source).shape
    no_panels = np.empty(0, gemm_bf16.word_dtype(b_source))
    results = []
    for b_panels, source in [(no_panels, b_source),
                             (panels(words_down_columns(b_source)), b_source[:0, :0])]:
        c = np.full((n_rows, n_columns), np.nan, np.float32)
        gemm_bf16.gemm(c, 0.0, a_words, pairs, 1, pairs, b_panels, source, True, threads)
        results.append(c)
    np.testing.assert_array_equal(results[0], results[1])
    return results[0]


def test_block_packing_matches_numpy():
    source = np.random.default_rng(8).integers(0, 1 << 16, (37, 3 * COLUMNS + 5)).astype(np.uint16)
    check_block_packing(source)


@pytest.mark.parametrize("n", [37, gemm_bf16.BLOCK_ROWS + 17])  # one block of rows of C, two
def test_in_task_packing_gives_the_gemm_bit_for_bit(native_bf16_gemm, num_threads, n):
    """dx = dz W with W packed inside the tasks: several blocks of pairs (the last one holding
    W's odd last row) and of columns (the last one short of a panel)."""
    rng = np.random.default_rng(9)
    m, k = 2 * 2 * gemm_bf16.BLOCK_PAIRS + 3, gemm_bf16.BLOCK_COLUMNS + 2 * COLUMNS + 9
    dz, w = bf16(rng, n, m), bf16(rng, m, k)
    dz_words = pairs_down_columns(dz.view(np.uint16).T).T.copy().reshape(-1)  # dz's rows' pairs
    dx = check_in_task_packing_is_exact(dz_words, n, w.view(np.uint16), num_threads)
    assert_order_close(dx, wide(dz) @ wide(w), np.abs(wide(dz)) @ np.abs(wide(w)))


@pytest.mark.parametrize("rows, columns", [(1, 1), (7, 33), (8, 64), (13, 100), (37, 300)])
def test_packing_matches_numpy(native_bf16_gemm, num_threads, rows, columns):
    source = np.random.default_rng(0).integers(0, 1 << 16, (rows, columns)).astype(np.uint16)
    np.testing.assert_array_equal(gemm_bf16.interleave_rows(source), pairs_down_columns(source))
    np.testing.assert_array_equal(gemm_bf16.pack_panels(source, True),
                                  panels(pairs_down_columns(source)))
    np.testing.assert_array_equal(gemm_bf16.pack_panels(source, False),
                                  panels(pairs_down_columns(source.T.copy())))


@pytest.mark.parametrize("n, k, m", SHAPES)
def test_three_gemms_match_the_widened_gemms(native_bf16_gemm, num_threads, n, k, m):
    rng = np.random.default_rng(n * k * m)
    x, w, dz = bf16(rng, n, k), bf16(rng, m, k), bf16(rng, n, m)
    xw, ww, dzw = wide(x), wide(w), wide(dz)
    assert_order_close(blas_native.bf16.matmul_weight_transposed(x, w), blas.matmul_weight_transposed(xw, ww),
                       np.abs(xw) @ np.abs(ww).T)
    assert_order_close(blas_native.bf16.matmul_weight(dz, w), blas.matmul_weight(dzw, ww),
                       np.abs(dzw) @ np.abs(ww))
    start = rng.standard_normal((m, k)).astype(np.float32)
    for beta in (0.0, 1.0):
        native, widened = start.copy(), start.copy()
        blas_native.bf16.accumulate_weight_grad(native, dz, x, beta)
        blas.accumulate_weight_grad(widened, dzw, xw, beta)
        assert_order_close(native, widened, np.abs(dzw).T @ np.abs(xw) + beta * np.abs(start))
        out = rng.standard_normal((n, k)).astype(np.float32)
        expected = beta * out + dzw @ ww
        result = blas_native.bf16.matmul_weight(dz, w, out=out, beta=beta)
        assert result is out
        assert_order_close(out, expected, np.abs(dzw) @ np.abs(ww) + beta * np.abs(expected))


def test_long_sums_span_several_blocks(native_bf16_gemm, num_threads):
    """R longer than one block of pairs (2 * BLOCK_PAIRS), C wider and taller than a task's block."""
    rng = np.random.default_rng(3)
    n, k = 2 * gemm_bf16.BLOCK_ROWS + 5, 2 * 2 * gemm_bf16.BLOCK_PAIRS + 3
    m = gemm_bf16.BLOCK_COLUMNS + 9
    x, w, dz = bf16(rng, n, k), bf16(rng, m, k), bf16(rng, n, m)
    assert_order_close(blas_native.bf16.matmul_weight_transposed(x, w), wide(x) @ wide(w).T,
                       np.abs(wide(x)) @ np.abs(wide(w)).T)
    assert_order_close(blas_native.bf16.matmul_weight(dz, w), wide(dz) @ wide(w),
                       np.abs(wide(dz)) @ np.abs(wide(w)))
    # N >= K: forward as y = x W^T with W packed whole up front (several blocks of rows)
    x, w = bf16(rng, gemm_bf16.BLOCK_ROWS + 17, 75), bf16(rng, 301, 75)
    assert_order_close(blas_native.bf16.matmul_weight_transposed(x, w), wide(x) @ wide(w).T,
                       np.abs(wide(x)) @ np.abs(wide(w)).T)


def test_float32_dz_is_rounded_to_nearest_bfloat16(native_bf16_gemm):
    rng = np.random.default_rng(4)
    x, w = bf16(rng, 9, 11), bf16(rng, 6, 11)
    dz = rng.standard_normal((9, 6)).astype(np.float32)
    rounded = dz.astype(bfloat16)
    np.testing.assert_array_equal(blas_native.bf16.matmul_weight(dz, w), blas_native.bf16.matmul_weight(rounded, w))
    grad, grad_rounded = np.zeros((6, 11), np.float32), np.zeros((6, 11), np.float32)
    blas_native.bf16.accumulate_weight_grad(grad, dz, x, 0.0)
    blas_native.bf16.accumulate_weight_grad(grad_rounded, rounded, x, 0.0)
    np.testing.assert_array_equal(grad, grad_rounded)


def test_nan_and_inf_propagate_as_in_the_widened_gemm(native_bf16_gemm, num_threads):
    rng = np.random.default_rng(5)
    n, k, m = 17, 41, 35
    x, w, dz = bf16(rng, n, k), bf16(rng, m, k), bf16(rng, n, m)
    x[3, 7], w[5, 40], w[9, 0], dz[2, 34] = np.nan, np.inf, -np.inf, np.nan
    for native, widened in [
            (blas_native.bf16.matmul_weight_transposed(x, w), blas.matmul_weight_transposed(wide(x), wide(w))),
            (blas_native.bf16.matmul_weight(dz, w), blas.matmul_weight(wide(dz), wide(w)))]:
        np.testing.assert_array_equal(np.isnan(native), np.isnan(widened))
        np.testing.assert_array_equal(np.isposinf(native), np.isposinf(widened))
        np.testing.assert_array_equal(np.isneginf(native), np.isneginf(widened))
        assert np.isnan(native).any() and np.isinf(native).any()
    grad = np.full((m, k), np.nan, np.float32)  # beta = 0 must not read it
    blas_native.bf16.accumulate_weight_grad(grad, dz, x, 0.0)
    expected = wide(dz).T @ wide(x)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(expected))
    assert np.isfinite(grad).sum() == np.isfinite(expected).sum() > 0


def test_bad_operands_are_named(native_bf16_gemm):
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="W must have shape"):
        blas_native.bf16.matmul_weight_transposed(bf16(rng, 4, 5), bf16(rng, 3, 6))
    with pytest.raises(TypeError, match="x must be bfloat16 or float32, got float16"):
        blas_native.bf16.matmul_weight_transposed(np.zeros((4, 5), np.float16), bf16(rng, 3, 5))
    with pytest.raises(ValueError, match="dW must have shape"):
        blas_native.bf16.accumulate_weight_grad(np.zeros((3, 4), np.float32), bf16(rng, 2, 3), bf16(rng, 2, 5))


def test_tile_rows_past_the_last_repeat_it_and_stay_in_bounds(native_bf16_gemm):
    """A GEMM of fewer rows than one tile reads only its own rows (the clamped row pointers)."""
    rng = np.random.default_rng(7)
    x, w = bf16(rng, 3, 4), bf16(rng, ROWS - 5, 4)
    assert_order_close(blas_native.bf16.matmul_weight_transposed(x, w), wide(x) @ wide(w).T,
                       np.abs(wide(x)) @ np.abs(wide(w)).T)


# -- the path dispatch --------------------------------------------------------------------------
@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(backend, "cpu_has_avx512_bf16", lambda: False)
    yield
    backend.set_bf16_gemm(None)


def test_without_the_cpu_flag_the_native_path_is_never_taken(cpu_without_bf16, monkeypatch):
    from npcpu.nn.linear import Linear

    def refuse(*args, **kwargs):
        raise AssertionError("the native bf16 GEMM ran on a CPU without AVX512_BF16")
    for name in ("matmul_weight_transposed", "matmul_weight", "accumulate_weight_grad"):
        monkeypatch.setattr(blas_native.bf16, name, refuse)
    assert "AVX512_BF16" in backend.native_bf16_gemm_unavailable()
    assert backend.bf16_gemm_path() == "widened to fp32"
    assert info.system_info()["bf16_gemm"] == "widened to fp32"
    with pytest.raises(RuntimeError, match="cannot run here: the CPU has no AVX512_BF16"):
        backend.set_bf16_gemm("native")
    assert backend.bf16_gemm_path() == "widened to fp32"  # the refused setting is not kept
    layer = Linear(6, 4, seed=0)
    layer.set_precision("bf16")
    layer.forward(np.ones((3, 6), np.float32))
    layer.backward(np.ones((3, 4), np.float32))


def test_settings_and_environment(monkeypatch):
    monkeypatch.setenv(backend.BF16_GEMM_ENV, "widened")
    assert backend.bf16_gemm_path() == "widened to fp32"
    monkeypatch.setenv(backend.BF16_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="NPCPU_BF16_GEMM must be one of"):
        backend.bf16_gemm_path()
    with pytest.raises(ValueError, match="bf16_gemm must be one of"):
        backend.set_bf16_gemm("fast")
    monkeypatch.setenv(backend.BF16_GEMM_ENV, "auto")
    expected = "widened to fp32" if backend.native_bf16_gemm_unavailable() else "native avx512_bf16"
    assert backend.bf16_gemm_path() == expected
    assert f"bf16 GEMM    {expected}" in info.format_info(info.system_info())
    try:
        assert backend.set_bf16_gemm("widened") == "widened to fp32"
    finally:
        backend.set_bf16_gemm(None)


def test_config_field_and_run_header(widened_bf16_gemm):
    from npcpu.config import ConfigError, build_config
    from npcpu.optim.sgd import SGD
    from test_trainer import make_model, quiet_trainer
    assert build_config(overrides={"train": {"bf16_gemm": "widened"}})["train"]["bf16_gemm"] == "widened"
    with pytest.raises(ConfigError, match="bf16_gemm"):
        build_config(overrides={"train": {"bf16_gemm": "fast"}})
    model = make_model()
    model.set_precision("bf16")
    header = quiet_trainer(model, SGD(model.parameters(), lr=0.1), precision="bf16").header()
    assert "precision bf16 (bf16 GEMM: widened to fp32)" in header
