"""A roofline for one mlp52m training step: its GEMMs timed alone plus Adam's memory traffic.

    python bench/roofline.py [--threads 2] [--repeats 5]

    roofline = sum of the step's GEMMs, each timed alone through npcpu.blas (float32, batch 128)
             + the optimizer's bytes / the machine's memory bandwidth, measured in the same run

Each GEMM and each bandwidth pass is timed `repeats` times after a warm-up and the fastest is kept:
a roofline is a lower bound, and on a shared machine noise only ever adds time.

The GEMMs of mlp52m (N = 128 rows; layer l has K inputs, M outputs):
    forward   y  = x W^T        5 GEMMs  (npcpu.blas.matmul_weight_transposed)
    backward  dW += dz^T x      5 GEMMs  (npcpu.blas.accumulate_weight_grad)
              dx = dz W         4 GEMMs  (npcpu.blas.matmul_weight; none for layer 0, whose input
                                          needs no gradient)
Adam per parameter: reads w, g, m, v and writes w, m, v: 7 x 4 = 28 bytes in float32; with bfloat16
parameters and moments (g stays float32): 2 + 4 + 2 + 2 read, 2 + 2 + 2 written = 16 bytes.
Memory bandwidth is the best of a parallel copy (8 bytes per float32 element: one read, one write)
and a STREAM triad a = b + s c (12 bytes per element) over 128 MB arrays, far larger than the caches.
Everything else in a step (bias, ReLU and mask passes, the loss, zero_grad's 4 bytes per parameter)
is left out: the roofline is what the GEMMs and the optimizer alone cannot go below.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from npcpu import backend
from npcpu.blas import accumulate_weight_grad, matmul_weight, matmul_weight_transposed

from common import call_seconds
from workloads import BATCH, mlp52m_gemm_shapes, mlp52m_parameter_count

ADAM_BYTES_PER_PARAMETER = {"fp32": 28, "bf16": 16}
BANDWIDTH_ELEMENTS = 1 << 25  # float32 elements per array: 128 MB


@njit(parallel=True, cache=True)
def _copy(dst, src):
    for i in prange(dst.size):
        dst[i] = src[i]


@njit(parallel=True, cache=True)
def _triad(a, b, c, scale):
    for i in prange(a.size):
        a[i] = b[i] + scale * c[i]


def _fastest_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after a warm-up call: a roofline is a lower bound, and
    on a shared machine noise only adds time."""
    return min(call_seconds(fn, repeats))


def memory_bandwidth(repeats: int = 5, elements: int = BANDWIDTH_ELEMENTS) -> dict:
    """Copy and triad bandwidth in GB/s (1e9 bytes/s) with the current Numba thread count."""
    a = np.zeros(elements, dtype=np.float32)
    b = np.ones(elements, dtype=np.float32)
    c = np.full(elements, 2.0, dtype=np.float32)
    copy_s = _fastest_seconds(lambda: _copy(a, b), repeats)
    triad_s = _fastest_seconds(lambda: _triad(a, b, c, np.float32(3.0)), repeats)
    copy = 8 * elements / copy_s / 1e9
    triad = 12 * elements / triad_s / 1e9
    return {"copy_gb_s": copy, "triad_gb_s": triad, "best_gb_s": max(copy, triad),
            "array_mb": 4 * elements / 1e6}


def gemm_times(repeats: int = 5, batch: int = BATCH) -> list[dict]:
    """Milliseconds (fastest of `repeats`) of each of mlp52m's 14 GEMMs, timed alone, in float32."""
    rng = np.random.default_rng(0)
    rows = []
    for layer, (k, m) in enumerate(mlp52m_gemm_shapes()):
        x = rng.standard_normal((batch, k), dtype=np.float32)
        weight = rng.standard_normal((m, k), dtype=np.float32)
        dz = rng.standard_normal((batch, m), dtype=np.float32)
        grad = np.zeros((m, k), dtype=np.float32)
        cases = {"forward y = x W^T": lambda: matmul_weight_transposed(x, weight),
                 "backward dW += dz^T x": lambda: accumulate_weight_grad(grad, dz, x)}
        if layer > 0:
            cases["backward dx = dz W"] = lambda: matmul_weight(dz, weight)
        for name, fn in cases.items():
            seconds = _fastest_seconds(fn, repeats)
            rows.append({"layer": layer, "gemm": name, "N": batch, "K": k, "M": m,
                         "ms": 1e3 * seconds, "gflop_s": 2 * batch * k * m / seconds / 1e9})
    return rows


def summarize(gemms: list[dict], bandwidth: dict) -> dict:
    """The GEMM time, the optimizer time and the roofline step time (ms) for fp32 and bf16 Adam."""
    gemm_ms = sum(row["ms"] for row in gemms)
    parameters = mlp52m_parameter_count()
    optimizer_ms = {precision: bytes_per * parameters / (bandwidth["best_gb_s"] * 1e9) * 1e3
                    for precision, bytes_per in ADAM_BYTES_PER_PARAMETER.items()}
    return {"gemms": gemms, "gemm_ms": gemm_ms,
            "gemm_gflop_s": sum(2 * r["N"] * r["K"] * r["M"] for r in gemms) / gemm_ms / 1e6,
            "bandwidth": bandwidth, "parameters": parameters,
            "adam_bytes_per_parameter": ADAM_BYTES_PER_PARAMETER,
            "optimizer_ms": optimizer_ms,
            "roofline_ms": {p: gemm_ms + ms for p, ms in optimizer_ms.items()}}


def mlp52m_roofline(repeats: int = 5) -> dict:
    """Measure the GEMMs and the bandwidth, then `summarize`."""
    return summarize(gemm_times(repeats), memory_bandwidth(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = backend.set_threads(args.threads)
    result = mlp52m_roofline(args.repeats)
    print(f"threads {threads}; memory bandwidth: copy {result['bandwidth']['copy_gb_s']:.1f} GB/s, "
          f"triad {result['bandwidth']['triad_gb_s']:.1f} GB/s")
    for row in result["gemms"]:
        print(f"layer {row['layer']} {row['gemm']:<22} {row['N']}x{row['K']}x{row['M']}: "
              f"{row['ms']:.2f} ms ({row['gflop_s']:.0f} GFLOP/s)")
    print(f"GEMMs {result['gemm_ms']:.1f} ms ({result['gemm_gflop_s']:.0f} GFLOP/s); "
          + "; ".join(f"Adam {p} {result['optimizer_ms'][p]:.1f} ms, roofline {result['roofline_ms'][p]:.1f} ms"
                      for p in ADAM_BYTES_PER_PARAMETER))


if __name__ == "__main__":
    main()
