"""What this installation runs on: versions, BLAS, Numba threading, CPU bfloat16 support, the
bf16 GEMM path and the float32 GEMM path (with the reason it was chosen)."""

from __future__ import annotations

import functools
import platform
import sys

import ml_dtypes
import numba
import numpy as np
import scipy

from npcpu import __version__, backend


def system_info() -> dict:
    """Facts for run headers, `npcpu info` and benchmark records (JSON-serializable)."""
    return {
        "npcpu": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": numba.config.NUMBA_NUM_THREADS,
        "blas": backend.blas_info(),
        "numba_threading": backend.threading_info(),
        "cpu_bf16": backend.cpu_supports_bf16(),
        "bf16_gemm": backend.bf16_gemm_path(),
        "f32_gemm": backend.f32_gemm_path(),
        "f32_gemm_reason": backend.f32_gemm_reason(),
    }


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_info(info: dict) -> str:
    blas, threading = info["blas"], info["numba_threading"]
    lines = [
        f"npcpu        {info['npcpu']}",
        f"python       {info['python']} ({sys.executable})",
        f"numpy        {info['numpy']}",
        f"numba        {info['numba']}",
        f"scipy        {info['scipy']}",
        f"ml_dtypes    {info['ml_dtypes']}",
        f"platform     {info['platform']}",
        f"cpu          {info['cpu']} ({info['cores']} cores)",
        f"BLAS         {blas['vendor']} {blas['version']} ({blas['threads']} threads, "
        f"{blas['architecture']}); built against: {_built_against(blas)}",
        f"Numba        threading layer {threading['layer']}, {threading['threads']} threads",
        f"bfloat16     {'native CPU support' if info['cpu_bf16'] else 'no native CPU support'}",
        f"bf16 GEMM    {info['bf16_gemm']}",
        f"fp32 GEMM    {info['f32_gemm']} ({_f32_gemm_why(info)})",
    ]
    return "\n".join(lines)


def _f32_gemm_why(info: dict) -> str:
    """Why the float32 GEMMs take their path: auto's reason, or the setting that overrode it."""
    from npcpu.backend import F32_GEMM
    setting = F32_GEMM.setting()
    if setting == "auto":
        return f"auto: {info['f32_gemm_reason']}"
    source = "set_f32_gemm" if F32_GEMM.overridden() else F32_GEMM.env
    return f"{setting} by {source}; auto's reason: {info['f32_gemm_reason']}"


def _built_against(blas: dict) -> str:
    """NumPy's and SciPy's build BLAS, e.g. "numpy scipy-openblas, scipy accelerate"."""
    return ", ".join(f"{package} {name or 'unknown'}"
                     for package, name in blas["built_against"].items())


def run_header(precision: str, parameters: int, accumulation: int, optimizer: str) -> str:
    """The first lines of every training run: versions, BLAS and threading, precision (with the bf16
    or fp32 GEMM path), model size, accumulation and the optimizer's description."""
    info = system_info()
    blas, threads = info["blas"], info["numba_threading"]
    return (f"npcpu {info['npcpu']} | numpy {info['numpy']} | numba {info['numba']} | "
            f"python {info['python']}\n"
            f"BLAS {blas['vendor']} {blas['version']} ({blas['threads']} threads; built against "
            f"{_built_against(blas)}) | "
            f"Numba threading {threads['layer']} ({threads['threads']} threads)\n"
            f"precision {precision}"
            + (f" (bf16 GEMM: {info['bf16_gemm']})" if precision == "bf16" else
               f" (fp32 GEMM: {info['f32_gemm']})" if precision == "fp32" else "")
            + f" | parameters {parameters:,} | accumulation {accumulation} | optimizer {optimizer}")
