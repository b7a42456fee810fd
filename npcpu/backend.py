"""Which BLAS NumPy uses, which Numba threading layer runs the kernels, and how many threads each gets.

BLAS threads (for the GEMMs) and Numba threads (for the fused kernels between them) never run at the
same time in a training step, so both are set to the same count, once, through `set_threads`.

Idle OpenBLAS threads busy-wait after each GEMM, by default for up to 2^28 cycles (about 0.1 s),
before they sleep; a Numba kernel that runs right after a GEMM (the optimizer step after backward,
the updates inside backward, the widening of bf16 weights) then shares the cores with them, and
runs measurably slower (bench/RESULTS.md, "Measurements behind design choices"). A wait of 2^20
cycles (well under a millisecond) keeps a thread warm between the GEMMs of one step and no longer
than that. OpenBLAS reads that wait, as
OPENBLAS_THREAD_TIMEOUT (log2 of the cycles), once, when it loads: so unless the user set it, it
is set to 20 while SciPy's BLAS (the one npcpu's GEMMs use) loads here, and removed again, so that
other processes started later (torch in the benchmarks) do not inherit it. It has no effect when
SciPy's BLAS was loaded before npcpu was imported.

The Numba threading layer is chosen before the first parallel kernel runs: TBB where it is installed
(fork-safe and thread-safe: the data loader's prefetch thread may launch kernels while the main
thread does), otherwise OpenMP, otherwise Numba's own workqueue. tbb's wheels are x86-64 only: on
Linux aarch64 the layer is GNU OpenMP, which terminates a forked child that runs a kernel after its
parent ran one (child processes there need the "spawn" or "forkserver" start method).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import numba
import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

from npcpu import blas_env
from npcpu.checks import check_int

OPENBLAS_THREAD_TIMEOUT = "20"  # log2 of the cycles an idle OpenBLAS thread spins (module docstring)


def _load_scipy_blas() -> None:
    """Import SciPy's BLAS (so that thread limits reach it too) with OPENBLAS_THREAD_TIMEOUT set."""
    ours = "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    if ours:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_THREAD_TIMEOUT
    try:
        import scipy.linalg.blas  # noqa: F401
    finally:
        if ours:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
        blas_env.unset_veclib_threads()  # read by now (npcpu/blas_env.py)


_load_scipy_blas()

_LAYER_PREFERENCE = ("tbb", "omp", "workqueue")


def _choose_threading_layer() -> str:
    """Set numba.config.THREADING_LAYER unless the user chose one through NUMBA_THREADING_LAYER."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return os.environ["NUMBA_THREADING_LAYER"]
    for layer in _LAYER_PREFERENCE:
        if layer == "tbb":
            try:  # Numba's own check: loads libtbb and refuses versions it cannot use
                from numba.np.ufunc.parallel import _check_tbb_version_compatible
                _check_tbb_version_compatible()
                from numba.np.ufunc import tbbpool  # noqa: F401
            except (ImportError, OSError):
                continue
        elif layer == "omp":
            try:
                from numba.np.ufunc import omppool  # noqa: F401
            except ImportError:
                continue
        numba.config.THREADING_LAYER = layer
        return layer
    return "default"


_choose_threading_layer()


def set_threads(n: int | None) -> int:
    """Use `n` threads for BLAS and for Numba kernels (None: all cores). Returns the count in force."""
    cores = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = cores
    n = min(check_int("set_threads", "n", n, 1), cores)
    numba.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")
    return n


@functools.cache
def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded at the first call, SciPy's (the one
    npcpu.blas calls) first. Found once per process: the search reads /proc/self/maps and opens
    every library, milliseconds that every Trainer.fit would otherwise pay for its header); the
    controllers report live thread counts."""
    blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    return sorted(blas, key=lambda lib: "scipy" not in os.path.basename(
        os.path.dirname(lib.filepath or "")))


def gemm_blas_controller():
    """threadpoolctl's controller of the BLAS library npcpu.blas calls (SciPy's), or None."""
    libraries = _blas_libraries()
    return libraries[0] if libraries else None


@contextmanager
def single_blas_thread():
    """Run the enclosed GEMMs on one BLAS thread: npcpu.blas's (SciPy's BLAS) and NumPy's matmul
    (its own BLAS, which attention's batched products use). Two calls per library whose count
    has to change, none when it is already one."""
    changed = []
    for library in _blas_libraries():
        threads = library.get_num_threads()
        if threads != 1:
            library.set_num_threads(1)
            changed.append((library, threads))
    try:
        yield
    finally:
        for library, threads in changed:
            library.set_num_threads(threads)


@functools.cache
def build_blas() -> dict:
    """The BLAS NumPy and SciPy were built against, by name ("accelerate", "scipy-openblas", "mkl",
    ...), from their build configuration; None where a build does not say."""
    import scipy

    def name(package) -> str | None:
        try:
            return package.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
        except (TypeError, KeyError, AttributeError):  # builds older than the "dicts" mode
            return None
    return {"numpy": name(np), "scipy": name(scipy)}


def blas_info() -> dict:
    """The BLAS library the GEMMs run on (SciPy's; see npcpu.blas), every other one threadpoolctl
    found loaded, and the BLAS NumPy and SciPy were built against ("built_against"). threadpoolctl
    has no controller for Apple Accelerate: there the vendor is SciPy's build BLAS and the threads
    are the VECLIB_MAXIMUM_THREADS Accelerate read at load (npcpu/blas_env.py)."""
    built_against = build_blas()
    described = [{"vendor": info.get("internal_api"), "version": info.get("version"),
                  "threads": info.get("num_threads"), "architecture": info.get("architecture"),
                  "filepath": info.get("filepath")}
                 for info in (lib.info() for lib in _blas_libraries())]
    if not described:
        vendor = built_against["scipy"] or built_against["numpy"] or "unknown"
        threads = blas_env.veclib_threads() if vendor == "accelerate" else None
        return {"vendor": vendor, "version": None, "threads": threads, "architecture": None,
                "loaded": [], "built_against": built_against}
    return {**{k: v for k, v in described[0].items() if k != "filepath"}, "loaded": described,
            "built_against": built_against}


@numba.njit(parallel=True, cache=True)
def _start_threads(out):
    for i in numba.prange(out.size):
        out[i] = i


def threading_info() -> dict:
    """Numba's threading layer and thread count (starting the thread pool if it has not started)."""
    _start_threads(np.empty(2))
    return {"layer": numba.threading_layer(), "threads": numba.get_num_threads()}


@functools.cache
def _cpu_features() -> frozenset:
    """The host CPU's features as LLVM names them ("avx512bf16" on x86, "bf16" on Arm): one
    source on Linux, macOS, x86 and Arm alike (/proc/cpuinfo is Linux-only, and under an emulator it
    describes the host, not the CPU the code runs on). Empty when LLVM cannot tell."""
    import llvmlite.binding as llvm
    try:
        flattened = llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        return frozenset()
    return frozenset(f[1:] for f in flattened.split(",") if f.startswith("+"))


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (x86 AVX512_BF16 or Arm BF16)."""
    features = _cpu_features()
    return "avx512bf16" in features or "bf16" in features


# -- the GEMM paths: npcpu's native kernels or the fallback -------------------------------------
class _GemmPath:
    """One choice between npcpu's native GEMM kernels and a fallback: "auto", "native" (an error
    where the kernels cannot run) or the fallback's name. The setting is `set`'s, else the
    environment variable `env`'s, else "auto"; "auto" takes the native kernels where they can run
    and `auto_prefers_native()` says they pay."""

    def __init__(self, name: str, env: str, fallback: str, unavailable, auto_prefers_native):
        self.name, self.env, self.fallback = name, env, fallback
        self.settings = ("auto", "native", fallback)
        self._unavailable, self._auto_prefers_native = unavailable, auto_prefers_native
        self._setting = None  # set()'s choice; None: the environment's, else "auto"

    def check(self, setting, source: str) -> None:
        if setting not in self.settings:
            raise ValueError(f"{source} must be one of {self.settings}, got {setting!r}")

    def overridden(self) -> bool:
        """Whether set() chose the setting (else it is the environment's, or "auto")."""
        return self._setting is not None

    def setting(self) -> str:
        if self._setting is not None:
            return self._setting
        setting = os.environ.get(self.env, "auto")
        self.check(setting, self.env)
        return setting

    def set(self, setting: str | None) -> None:
        """Choose the setting (None: back to the environment); raises now, not at the first GEMM,
        when "native" cannot run here, and then keeps the previous setting."""
        if setting is not None:
            self.check(setting, self.name)
        previous, self._setting = self._setting, setting
        try:
            self.use_native()
        except RuntimeError:
            self._setting = previous
            raise

    def use_native(self) -> bool:
        setting = self.setting()
        if setting == self.fallback:
            return False
        reason = self._unavailable()
        if setting == "native" and reason is not None:
            raise RuntimeError(f"{self.name} = 'native' cannot run here: {reason}")
        return reason is None and (setting == "native" or self._auto_prefers_native())


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    """True when the CPU has x86 AVX512_BF16 (vdpbf16ps), which the native bf16 GEMM is written for."""
    return "avx512bf16" in _cpu_features()


@functools.cache
def cpu_has_avx512f() -> bool:
    """True when the CPU has x86 AVX-512F (vfmadd231ps on zmm), which the native float32 GEMM is
    written for."""
    return "avx512f" in _cpu_features()


def _numba_targets(feature: str, host_has_it: bool) -> bool:
    """True when Numba compiles for a CPU with the LLVM `feature`: the host's features, unless
    NUMBA_CPU_NAME (e.g. "generic") and NUMBA_CPU_FEATURES choose another target."""
    if numba.config.CPU_NAME is not None:
        return f"+{feature}" in (numba.config.CPU_FEATURES or "").split(",")
    return host_has_it


def native_bf16_gemm_unavailable() -> str | None:
    """Why the native bf16 GEMM (npcpu.blas_native.bf16) cannot run here, or None when it can: it
    needs the CPU's AVX512_BF16 and Numba compiling for a target that has it."""
    if not cpu_has_avx512_bf16():
        return "the CPU has no AVX512_BF16 (the native bf16 GEMM is written for x86 vdpbf16ps)"
    if not _numba_targets("avx512bf16", True):
        return "Numba's target CPU has no avx512bf16 (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES)"
    return None


@functools.cache
def native_f32_gemm_unavailable() -> str | None:
    """Why the native float32 GEMM (npcpu.blas_native.float32) cannot run here, or None when it
    can: it needs the CPU's AVX-512F and Numba compiling for a target that has it. Found once per
    process (npcpu.blas asks at every float32 GEMM)."""
    if not cpu_has_avx512f():
        return "the CPU has no AVX-512F (the native float32 GEMM is written for x86 zmm FMAs)"
    if not _numba_targets("avx512f", True):
        return "Numba's target CPU has no avx512f (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES)"
    return None


OPENBLAS_AVX512_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
"""OpenBLAS core types (threadpoolctl's "architecture") whose sgemm kernels use AVX-512."""


@functools.cache
def f32_gemm_reason() -> str:
    """Why "auto" takes the float32 path it takes (for `npcpu info`): the native kernels where they
    can run and SciPy's BLAS is an OpenBLAS without AVX-512 kernels (pinned to another core type by
    OPENBLAS_CORETYPE, or built without them), the BLAS otherwise (an OpenBLAS with its own
    AVX-512 kernels, or another vendor's, tuned for the CPU)."""
    unavailable = native_f32_gemm_unavailable()
    if unavailable is not None:
        return unavailable
    blas = blas_info()
    vendor, core = blas["vendor"], blas["architecture"]
    if vendor != "openblas":
        return f"SciPy's BLAS is {vendor}, not OpenBLAS"
    if core in OPENBLAS_AVX512_CORES:
        return f"OpenBLAS runs its {core} (AVX-512) kernels"
    return f"OpenBLAS runs its {core} kernels, without AVX-512"


@functools.cache
def _auto_prefers_native_f32() -> bool:
    blas = blas_info()
    return blas["vendor"] == "openblas" and blas["architecture"] not in OPENBLAS_AVX512_CORES


# (lambdas: the functions are looked up at each call, so that tests can replace them)
BF16_GEMM = _GemmPath("bf16_gemm", "NPCPU_BF16_GEMM", "widened",
                      lambda: native_bf16_gemm_unavailable(), lambda: True)
F32_GEMM = _GemmPath("f32_gemm", "NPCPU_F32_GEMM", "blas", lambda: native_f32_gemm_unavailable(),
                     lambda: _auto_prefers_native_f32())
BF16_GEMM_SETTINGS, BF16_GEMM_ENV = BF16_GEMM.settings, BF16_GEMM.env
F32_GEMM_SETTINGS, F32_GEMM_ENV = F32_GEMM.settings, F32_GEMM.env


def set_bf16_gemm(setting: str | None) -> str:
    """Choose the GEMM path of bf16 layers: "auto" (native where the CPU has it), "native" (an
    error where it cannot run), "widened" (bf16 widened to float32 for BLAS sgemm). None goes back
    to the NPCPU_BF16_GEMM environment variable, else "auto". Returns the path in force."""
    BF16_GEMM.set(setting)
    return bf16_gemm_path()


def use_native_bf16_gemm() -> bool:
    """Whether bf16 layers run their GEMMs on the native bf16 kernels (see set_bf16_gemm)."""
    return BF16_GEMM.use_native()


def bf16_gemm_path() -> str:
    """ "native avx512_bf16" or "widened to fp32": the path bf16 layers' GEMMs take."""
    return "native avx512_bf16" if use_native_bf16_gemm() else "widened to fp32"


def set_f32_gemm(setting: str | None) -> str:
    """Choose the path of float32 linear-layer GEMMs (npcpu.blas): "auto" (native where it runs
    and the BLAS has no AVX-512 kernels, f32_gemm_reason), "native" (an error where it cannot
    run), "blas" (SciPy's BLAS sgemm). None goes back to the NPCPU_F32_GEMM environment variable,
    else "auto". Returns the path in force."""
    F32_GEMM.set(setting)
    return f32_gemm_path()


def use_native_f32_gemm() -> bool:
    """Whether float32 linear layers run their GEMMs on the native kernels (see set_f32_gemm)."""
    return F32_GEMM.use_native()


def f32_gemm_path() -> str:
    """ "native avx512f" or "blas sgemm": the path float32 linear layers' GEMMs take."""
    return "native avx512f" if use_native_f32_gemm() else "blas sgemm"
