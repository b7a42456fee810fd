"""Shared benchmark helpers: interleaved timing with warm-up, summaries, machine facts, JSON, tables.

Candidates are timed round-robin (A, B, A, B, ...) rather than back to back, so that drift on a
shared machine (other jobs, thermal state) lands on all of them alike. Each bench prints a markdown
table and writes its numbers, with the facts of the machine, to bench/results/<name>.json.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int = 10,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate: `warmup` untimed calls each, then `repeats` rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def call_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` timed calls of fn, after one untimed warm-up call (compilation,
    page faults, BLAS thread start)."""
    return time_interleaved({"fn": fn}, repeats, warmup=1)["fn"]


def summarize(seconds: list[float]) -> dict:
    """Median, min and max in milliseconds, and the number of repetitions."""
    ms = [1e3 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "repeats": len(ms)}


def peak_rss_mb() -> float:
    """This process's peak resident set, MB. On Linux VmHWM of /proc/self/status: getrusage's
    ru_maxrss survives execve, so a child process would report at least its parent's peak at fork."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS: bytes; Linux: kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def machine_facts() -> dict:
    """What the numbers depend on: CPU, core count, library versions, BLAS, threads, environment.

    npcpu.info.system_info() (as `npcpu info` prints it), plus the logical CPU count, the
    environment variables that steer BLAS, OpenMP and Numba (e.g. OPENBLAS_CORETYPE, which pins
    OpenBLAS's kernels), and torch's version and default thread count when torch is installed.
    """
    from npcpu.info import system_info  # here, not at the top: a torch-only child stays Numba-free
    info = system_info()
    facts = {
        **info,
        "processor": info["cpu"],
        "numba_cores": info["cores"],
        "cores": os.cpu_count(),
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("OPENBLAS_", "OMP_", "GOMP_", "KMP_", "MKL_", "NUMBA_"))},
    }
    try:
        import torch
        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
    except ImportError:
        facts["torch"] = None
    return facts


def write_json(name: str, payload: dict, path: Path | None = None) -> Path:
    """Write `payload` plus machine facts and a UTC timestamp to `path` (default
    bench/results/<name>.json)."""
    if path is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{name}.json"
    path = Path(path)
    record = {"bench": name, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_facts(), **payload}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; floats shown with 2 decimals."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
