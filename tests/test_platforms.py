"""Platform detection that this Linux x86_64 machine can only check with the platform faked:
the build BLAS (Apple Accelerate, which threadpoolctl cannot see) and VECLIB_MAXIMUM_THREADS."""

import numba
import numpy as np
import pytest
import scipy

from npcpu import backend, blas_env, info


def _fake_build(monkeypatch, package, blas_name):
    def show_config(mode="stdout"):
        assert mode == "dicts"
        return {"Build Dependencies": {"blas": {"name": blas_name, "found": True}}}
    monkeypatch.setattr(package, "show_config", show_config)


@pytest.fixture
def accelerate_build(monkeypatch):
    """NumPy and SciPy built against Accelerate, no threadpoolctl controller, VECLIB set to 3."""
    _fake_build(monkeypatch, np, "accelerate")
    _fake_build(monkeypatch, scipy, "accelerate")
    monkeypatch.setattr(backend, "_blas_libraries", lambda: [])
    monkeypatch.setattr(blas_env, "veclib_threads_set", "3")
    backend.build_blas.cache_clear()
    yield
    backend.build_blas.cache_clear()


def test_build_blas_names_this_machines_build():
    backend.build_blas.cache_clear()
    built = backend.build_blas()
    assert set(built) == {"numpy", "scipy"}
    assert built["scipy"] == scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]


def test_accelerate_is_reported_without_a_controller(accelerate_build):
    blas = backend.blas_info()
    assert blas["vendor"] == "accelerate"
    assert blas["threads"] == 3
    assert blas["built_against"] == {"numpy": "accelerate", "scipy": "accelerate"}
    assert "BLAS         accelerate None (3 threads" in info.format_info(info.system_info())
    header = info.run_header("fp32", 10, 1, "sgd")
    assert "BLAS accelerate None (3 threads; built against numpy accelerate, scipy accelerate)" \
        in header


def test_build_without_dicts_mode_is_unknown(monkeypatch):
    def old_show_config():  # NumPy/SciPy builds before mode="dicts"
        return None
    monkeypatch.setattr(np, "show_config", old_show_config)
    monkeypatch.setattr(backend, "_blas_libraries", lambda: [])
    backend.build_blas.cache_clear()
    try:
        assert backend.build_blas()["numpy"] is None
    finally:
        backend.build_blas.cache_clear()


@pytest.fixture
def clean_veclib(monkeypatch):
    monkeypatch.delenv(blas_env.VECLIB_THREADS_ENV, raising=False)
    monkeypatch.setattr(blas_env, "veclib_threads_set", None)


def test_veclib_threads_set_on_macos_to_numbas_count(monkeypatch, clean_veclib):
    monkeypatch.setattr(blas_env.sys, "platform", "darwin")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "5")
    assert blas_env.set_veclib_threads() == "5"
    assert blas_env.os.environ[blas_env.VECLIB_THREADS_ENV] == "5"
    assert blas_env.veclib_threads() == 5
    blas_env.unset_veclib_threads()  # what npcpu.backend does once SciPy's BLAS has loaded
    assert blas_env.VECLIB_THREADS_ENV not in blas_env.os.environ
    assert blas_env.veclib_threads() == 5  # still reported: Accelerate read it


def test_veclib_threads_left_to_the_user(monkeypatch, clean_veclib):
    monkeypatch.setattr(blas_env.sys, "platform", "darwin")
    monkeypatch.setenv(blas_env.VECLIB_THREADS_ENV, "2")
    assert blas_env.set_veclib_threads() is None
    blas_env.unset_veclib_threads()
    assert blas_env.os.environ[blas_env.VECLIB_THREADS_ENV] == "2"
    assert blas_env.veclib_threads() == 2


def test_veclib_threads_not_set_off_macos(monkeypatch, clean_veclib):
    monkeypatch.setattr(blas_env.sys, "platform", "linux")
    assert blas_env.set_veclib_threads() is None
    assert blas_env.VECLIB_THREADS_ENV not in blas_env.os.environ


def test_numba_thread_count_matches_numba(monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    assert blas_env.numba_thread_count() == numba.config.NUMBA_DEFAULT_NUM_THREADS


def _spin_pause_ir(triple: str) -> str:
    """The LLVM IR npcpu.kernels.intrinsics.spin_pause emits into a module for `triple`."""
    from llvmlite import ir
    from numba.core.registry import cpu_target

    from npcpu.kernels.intrinsics import spin_pause
    signature, codegen = spin_pause._defn(cpu_target.typing_context)
    module = ir.Module(name="spin_pause_check")
    module.triple = triple
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), []), "check")
    builder = ir.IRBuilder(function.append_basic_block())
    codegen(cpu_target.target_context, builder, signature, [])
    builder.ret_void()
    return str(module)


@pytest.mark.parametrize("triple, pauses", [("x86_64-unknown-linux-gnu", True),
                                            ("aarch64-unknown-linux-gnu", False),
                                            ("arm64-apple-darwin23.0.0", False)])
def test_spin_pause_emits_the_x86_pause_only_for_x86(triple, pauses):
    assert ("llvm.x86.sse2.pause" in _spin_pause_ir(triple)) == pauses


def test_native_bf16_gemm_is_off_on_arm(monkeypatch):
    """An Arm CPU's bf16 feature counts as bfloat16 support, but the native GEMM (x86 vdpbf16ps)
    stays off and bf16 layers take the widened path."""
    monkeypatch.setattr(backend, "_cpu_features", lambda: frozenset({"neon", "sve", "bf16", "i8mm"}))
    backend.cpu_has_avx512_bf16.cache_clear()
    try:
        assert backend.cpu_supports_bf16()
        assert "AVX512_BF16" in backend.native_bf16_gemm_unavailable()
        assert not backend.use_native_bf16_gemm()
    finally:
        backend.cpu_has_avx512_bf16.cache_clear()
