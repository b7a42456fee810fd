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
