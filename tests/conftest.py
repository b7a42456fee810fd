"""Shared fixtures: torch (skip without it, fail under NPCPU_REQUIRE_TORCH=1), mpiexec (likewise
with NPCPU_REQUIRE_MPI=1) and thread counts."""

import importlib
import importlib.util
import os
import shutil

import numba
import pytest


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses the `torch` fixture, so that CI can run them again, and only them,
    once torch is installed (`pytest -m torch`)."""
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session")
def torch():
    """The torch module for parity tests.

    Without torch installed the test is skipped (and pytest's summary says why), unless
    NPCPU_REQUIRE_TORCH=1, as CI sets: then a missing torch fails the test.
    """
    try:
        module = importlib.import_module("torch")
    except ImportError:
        if os.environ.get("NPCPU_REQUIRE_TORCH") == "1":
            pytest.fail("NPCPU_REQUIRE_TORCH=1 but torch is not installed")
        pytest.skip("torch is not installed (pip install -e '.[torch]' to run parity tests)")
    module.set_num_threads(1)
    return module


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def num_threads(request):
    """Run a kernel test with 1 and with 2 Numba threads (capped at the cores available)."""
    previous = numba.get_num_threads()
    n = min(request.param, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    yield n
    numba.set_num_threads(previous)


def _gemm_path(choose, setting: str, unavailable=None, what: str = ""):
    """One test on a GEMM path (`choose`: npcpu.backend.set_bf16_gemm or set_f32_gemm), then back
    to the environment's; skips, saying why, where `unavailable()` gives a reason."""
    reason = unavailable() if unavailable is not None else None
    if reason is not None:
        pytest.skip(f"{what} unavailable: {reason}")
    choose(setting)
    yield
    choose(None)


@pytest.fixture
def widened_bf16_gemm():
    """bf16 layers' GEMMs on float32 copies of their operands (the path every CPU takes), whatever
    this CPU supports."""
    from npcpu import backend
    yield from _gemm_path(backend.set_bf16_gemm, "widened")


@pytest.fixture
def native_bf16_gemm():
    """bf16 layers' GEMMs on the native AVX512_BF16 kernels; the test skips, saying why, where they
    cannot run."""
    from npcpu import backend
    yield from _gemm_path(backend.set_bf16_gemm, "native", backend.native_bf16_gemm_unavailable,
                          "native bf16 GEMM")


@pytest.fixture
def blas_f32_gemm():
    """float32 linear-layer GEMMs through SciPy's BLAS sgemm, whatever this CPU and BLAS are."""
    from npcpu import backend
    yield from _gemm_path(backend.set_f32_gemm, "blas")


@pytest.fixture
def native_f32_gemm():
    """float32 linear-layer GEMMs on the native AVX-512 kernels; the test skips, saying why, where
    they cannot run."""
    from npcpu import backend
    yield from _gemm_path(backend.set_f32_gemm, "native", backend.native_f32_gemm_unavailable,
                          "native float32 GEMM")


@pytest.fixture(scope="session")
def mpiexec():
    """The mpiexec command, or a skip (a failure under NPCPU_REQUIRE_MPI=1) saying what is missing."""
    missing = [what for what, absent in (
        ("mpi4py", importlib.util.find_spec("mpi4py") is None),
        ("mpiexec", shutil.which("mpiexec") is None)) if absent]
    if missing:
        message = f"{' and '.join(missing)} not found (pip install 'npcpu[mpi]' to run these)"
        if os.environ.get("NPCPU_REQUIRE_MPI") == "1":
            pytest.fail(f"NPCPU_REQUIRE_MPI=1 but {message}")
        pytest.skip(message)
    return shutil.which("mpiexec")
