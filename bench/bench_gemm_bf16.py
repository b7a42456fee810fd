"""GEMM throughput at the mlp52m, gpt-small and gpt-char shapes: npcpu's native bf16 and float32
GEMMs against npcpu's sgemm (SciPy's BLAS), torch's bf16 and fp32 matmul, and the bf16
instruction's peak.

    python bench/bench_gemm_bf16.py [--rounds 5] [--threads 2] [--repeats 7] [--quick] [--output F]

Shapes (N rows, K inputs, M outputs of a linear layer; each as its three GEMMs):
    forward  y = x W^T (N, M)    dx = dz W (N, K)    dW += dz^T x (M, K), beta = 1
    mlp52m     N = 128:  K x M = 784 x 4096, 4096 x 4096, 4096 x 100
    gpt-small  N = 1024 tokens (batch 2 x 512):  256 x 768, 256 x 1024, 1024 x 256, 256 x 32000
    gpt-char   N = 768 tokens (batch 12 x 64):  128 x 384, 128 x 128, 128 x 512, 512 x 128

Configurations, each in a process of its own per round, rounds interleaving them (so drift on a
shared machine lands on all alike):
    npcpu native bf16     npcpu.blas_native.bf16 on bfloat16 x, W, dz (float32 results)
    npcpu native fp32     npcpu.blas_native.float32 on float32 x, W, dz
    npcpu sgemm           npcpu.blas (SciPy's OpenBLAS) on float32, in the environment as given
                          (NPCPU_F32_GEMM=blas: BLAS whatever npcpu.blas's auto would choose)
    npcpu sgemm, OpenBLAS own kernels   the same with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
                          removed from the environment (OpenBLAS then picks its kernels for the CPU)
    torch bf16 / fp32     torch.matmul on bfloat16 / float32 tensors (bf16 results in bf16)
    bf16 peak             npcpu.kernels.dpbf16.register_peak: the microkernel's dot products on
                          operands held in registers, one loop per thread
A child times each GEMM `repeats` times after a warm-up and reports the median; a configuration's
figure is the median over rounds (min-max shown). Results: bench/results/bench_gemm_bf16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import call_seconds, markdown_table, write_json

SHAPES = {
    "mlp52m": [(128, 784, 4096), (128, 4096, 4096), (128, 4096, 100)],
    "gpt-small": [(1024, 256, 768), (1024, 256, 1024), (1024, 1024, 256), (1024, 256, 32000)],
    "gpt-char": [(768, 128, 384), (768, 128, 128), (768, 128, 512), (768, 512, 128)],
}
GEMMS = ("forward", "dx", "dW")
NATIVE, SGEMM, SGEMM_OWN, TORCH_BF16, TORCH_FP32, PEAK = (
    "npcpu native bf16", "npcpu sgemm", "npcpu sgemm, OpenBLAS own kernels", "torch bf16 matmul",
    "torch fp32 matmul", "bf16 peak (registers)")
NATIVE_F32 = "npcpu native fp32"
CONFIGS = [NATIVE, NATIVE_F32, SGEMM, SGEMM_OWN, TORCH_BF16, TORCH_FP32, PEAK]
PEAK_ITERATIONS = 2_000_000


def _operands(n, k, m, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32) for shape in ((n, k), (m, k), (n, m)))


def _npcpu_gemms(n, k, m, config: str):
    from npcpu import backend, blas, blas_native
    from npcpu.precision import bfloat16
    x, w, dz = _operands(n, k, m)
    native = config == NATIVE
    lib = {NATIVE: blas_native.bf16, NATIVE_F32: blas_native.float32}.get(config, blas)
    if lib is blas:
        backend.set_f32_gemm("blas")
    if native:
        x, w, dz = (a.astype(bfloat16) for a in (x, w, dz))
    grad, dx = np.zeros((m, k), np.float32), np.empty((n, k), np.float32)
    return {"forward": lambda: lib.matmul_weight_transposed(x, w),
            "dx": lambda: lib.matmul_weight(dz, w, out=dx),
            "dW": lambda: lib.accumulate_weight_grad(grad, dz, x, 1.0)}


def _torch_gemms(torch, n, k, m, dtype):
    x, w, dz = (torch.from_numpy(a).to(dtype) for a in _operands(n, k, m))
    return {"forward": lambda: torch.matmul(x, w.T), "dx": lambda: torch.matmul(dz, w),
            "dW": lambda: torch.matmul(dz.T, x)}


def _time(fn, repeats: int) -> float:
    return statistics.median(call_seconds(fn, repeats))


def _peak_gflops(repeats: int) -> float:
    """FLOP/s of the register loop on every thread at once (64 FLOP per instruction)."""
    import numba
    from numba import njit, prange

    from npcpu.kernels import dpbf16

    @njit(parallel=True)
    def loop(words, iterations, out):
        for t in prange(out.shape[0]):
            dpbf16.register_peak(words, iterations, out[t])
    threads = numba.get_num_threads()
    words = np.full(64, 0x3F803F80, np.uint32)  # bfloat16 pairs (1.0, 1.0)
    out = np.empty((threads, dpbf16.ROWS * dpbf16.COLUMNS), np.float32)
    seconds = _time(lambda: loop(words, PEAK_ITERATIONS, out), repeats)
    return threads * PEAK_ITERATIONS * dpbf16.ROWS * dpbf16.VECTORS * 64 / seconds / 1e9


def run_child(config: str, threads: int, repeats: int, shapes: dict) -> dict:
    if config.startswith("torch"):
        import torch
        torch.set_num_threads(threads)
    else:
        from npcpu import backend
        backend.set_threads(threads)
    if config == PEAK:
        return {"peak_gflop_s": _peak_gflops(repeats)}
    seconds = {}
    for workload, sizes in shapes.items():
        for n, k, m in sizes:
            if config.startswith("torch"):
                gemms = _torch_gemms(torch, n, k, m, torch.bfloat16 if config == TORCH_BF16
                                     else torch.float32)
            else:
                gemms = _npcpu_gemms(n, k, m, config)
            for gemm, fn in gemms.items():
                seconds[f"{workload} {n}x{k}x{m} {gemm}"] = _time(fn, repeats)
    return {"seconds": seconds}


def _spawn(config: str, args) -> dict:
    env = dict(os.environ)
    if config == SGEMM_OWN:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--threads",
               str(args.threads), "--repeats", str(args.repeats),
               "--workloads", *args.workloads] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _flops(key: str) -> float:
    n, k, m = map(int, key.split()[1].split("x"))
    return 2.0 * n * k * m


def summarize(runs: dict[str, list[dict]]) -> dict:
    """GFLOP/s per configuration and GEMM (median over rounds, min-max), ratios and targets."""
    table = {}
    for config, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if config == PEAK:
            values = [r["peak_gflop_s"] for r in ok]
            table[config] = {"median": statistics.median(values), "min": min(values),
                             "max": max(values)} if values else None
            continue
        table[config] = {}
        for key in (ok[0]["seconds"] if ok else {}):
            gflops = [_flops(key) / r["seconds"][key] / 1e9 for r in ok]
            table[config][key] = {"median": statistics.median(gflops), "min": min(gflops),
                                  "max": max(gflops)}
    peak = (table.get(PEAK) or {}).get("median")
    rows = {}
    for key in table.get(NATIVE) or table.get(NATIVE_F32) or {}:
        rows[key] = {}
        if key in table.get(NATIVE, {}):
            native = rows[key]["native_gflop_s"] = table[NATIVE][key]["median"]
            for other in (SGEMM, SGEMM_OWN, TORCH_BF16, TORCH_FP32):
                if key in table.get(other, {}):
                    rows[key][f"x {other}"] = native / table[other][key]["median"]
            if peak:
                rows[key]["peak / native"] = peak / native
        if key in table.get(NATIVE_F32, {}):
            for other in (SGEMM, SGEMM_OWN, TORCH_FP32):
                if key in table.get(other, {}):
                    rows[key][f"fp32 x {other}"] = (table[NATIVE_F32][key]["median"]
                                                    / table[other][key]["median"])
    def every(key, test):
        return all(key in r and test(r[key]) for r in rows.values())
    targets = {
        "native >= 1.8x npcpu sgemm (as configured)": every(f"x {SGEMM}", lambda v: v >= 1.8),
        "native >= 1.8x npcpu sgemm (OpenBLAS own kernels)": every(f"x {SGEMM_OWN}", lambda v: v >= 1.8),
        "native within 1.2x of the peak": every("peak / native", lambda v: v <= 1.2),
    }
    return {"gflop_s": table, "comparison": rows, "targets": targets}


def print_report(summary: dict) -> None:
    table, rows = summary["gflop_s"], summary["comparison"]
    peak = table.get(PEAK)
    if peak:
        print(f"bf16 peak (register loop, all threads): {peak['median']:.0f} GFLOP/s "
              f"({peak['min']:.0f}-{peak['max']:.0f})\n")
    others = [c for c in CONFIGS if c not in (PEAK,) and table.get(c)]
    body = []
    for key, row in rows.items():
        body.append([key] + [f"{table[c][key]['median']:.0f} ({table[c][key]['min']:.0f}-"
                             f"{table[c][key]['max']:.0f})" for c in others]
                    + [f"{row.get(f'x {SGEMM}', float('nan')):.2f}",
                       f"{row.get(f'x {SGEMM_OWN}', float('nan')):.2f}",
                       f"{row.get(f'x {TORCH_BF16}', float('nan')):.2f}",
                       f"{row.get('peak / native', float('nan')):.2f}",
                       f"{row.get(f'fp32 x {SGEMM}', float('nan')):.2f}",
                       f"{row.get(f'fp32 x {SGEMM_OWN}', float('nan')):.2f}",
                       f"{row.get(f'fp32 x {TORCH_FP32}', float('nan')):.2f}"])
    print(markdown_table(["GEMM (N x K x M)"] + [f"{c} GFLOP/s" for c in others]
                         + ["native / sgemm", "native / sgemm own", "native / torch bf16",
                            "peak / native", "fp32 native / sgemm", "fp32 native / sgemm own",
                            "fp32 native / torch fp32"], body))
    print("\ntargets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}"
                                    for k, v in summary["targets"].items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke test: small shapes, 1 round")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write (default "
                        "bench/results/bench_gemm_bf16.json, -quick.json with --quick)")
    parser.add_argument("--workloads", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="the shape groups to time (default: all)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS,
                        help="the configurations to run (default: all)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = ({"smoke": [(33, 70, 45)]} if args.quick
              else {name: SHAPES[name] for name in args.workloads})
    if args.child is not None:
        print(json.dumps(run_child(args.child, args.threads, args.repeats, shapes)))
        return
    rounds = 1 if args.quick else args.rounds
    runs = {config: [] for config in CONFIGS if config in args.configs}
    for round_index in range(rounds):
        for config in runs:
            result = _spawn(config, args)
            runs[config].append(result)
            print(f"round {round_index + 1}/{rounds} {config}: "
                  f"{result.get('error', 'done')}", file=sys.stderr)
    summary = summarize(runs)
    print_report(summary)
    path = write_json("bench_gemm_bf16" if not args.quick else "bench_gemm_bf16-quick",
                      {"threads": args.threads, "rounds": rounds, "repeats": args.repeats,
                       "shapes": shapes, **summary}, path=args.output)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
