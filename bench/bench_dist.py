"""Data-parallel throughput on one machine: N ranks x T threads against 1 process x N*T threads.

Runs `npcpu train --preset mlp52m` for a few steps in each setup, alternating the setups round
after round, and reads each step's samples/s from the run's metrics file (the median over the
steps after the first `--skip`), and the peak resident memory of each of its processes (GNU time,
when /usr/bin/time exists). Setups: one process with every core; N ranks with the cores divided
among them, the reduction overlapped with backward, after it, in deterministic mode (fixed-order
sum over pieces of the batch), and the optimizer step sharded by ranges of elements (ZeRO stage 1) with
and without overlap; ranks on one node sum through shared memory (npcpu.dist.node, where overlap
does not apply), and the "-mpi" setups through MPI's collectives instead. Needs mpi4py and mpiexec (pip install 'npcpu[mpi]').

    python bench/bench_dist.py --ranks 2 --steps 12 --rounds 3
    python bench/bench_dist.py --preset gpt-small --option=--data.path=DIR --setups single,shard
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_json


GNU_TIME = Path("/usr/bin/time")
PEAK_TAG = "bench_dist peak rss kB"


def run_setup(ranks: int, threads: int, extra: list[str], steps: int,
              preset: str) -> tuple[list[float], list[float]]:
    """(items/s of each step of one run: samples, or tokens for a language model; the peak RSS
    of each of its processes in MB, largest first)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        program = [sys.executable, "-m", "npcpu", "train", "--preset", preset, "--run-dir",
                   str(run_dir), "--train.max_steps", str(steps), "--train.threads", str(threads),
                   "--train.eval_every", "none", "--train.checkpoint_every", "none",
                   "--train.log_every", "1", "--progress", "lines", *extra]
        if GNU_TIME.exists():
            program = [str(GNU_TIME), "-f", f"{PEAK_TAG} %M", *program]
        command = program if ranks == 1 else [shutil.which("mpiexec"), "-n", str(ranks), *program]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        peaks = [int(line.split()[-1]) / 1024 for line in done.stderr.splitlines()
                 if line.startswith(PEAK_TAG)]
        return ([line["samples_per_s"] for line in lines if line["kind"] == "train"],
                sorted(peaks, reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="mlp52m")
    parser.add_argument("--parts", type=int, default=12, help="deterministic: dist.parts")
    parser.add_argument("--option", action="append", default=[], metavar="--SECTION.FIELD=VALUE",
                        help="a configuration option given to every run (repeatable), e.g. "
                        "--option=--data.path=DIR for a text preset")
    parser.add_argument("--setups", default="single,overlap,after,deterministic,shard",
                        help="comma-separated subset of the setups")
    args = parser.parse_args()
    if shutil.which("mpiexec") is None:
        sys.exit("bench_dist: mpiexec not found (pip install 'npcpu[mpi]')")
    n, t = args.ranks, args.threads
    setups = {
        "single": (1, n * t, []),
        "overlap": (n, t, ["--dist.overlap", "true"]),
        "after": (n, t, ["--dist.overlap", "false"]),
        "deterministic": (n, t, ["--dist.deterministic", "true", "--dist.parts", str(args.parts)]),
        "shard": (n, t, ["--dist.overlap", "true", "--dist.shard_optimizer", "true"]),
        "shard-after": (n, t, ["--dist.overlap", "false", "--dist.shard_optimizer", "true"]),
        "overlap-mpi": (n, t, ["--dist.overlap", "true", "--dist.shared_memory", "false"]),
        "shard-mpi": (n, t, ["--dist.overlap", "true", "--dist.shard_optimizer", "true",
                             "--dist.shared_memory", "false"]),
    }
    chosen = {name: setups[name] for name in args.setups.split(",")}
    medians = {name: [] for name in chosen}
    peaks = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, (ranks, threads, extra) in chosen.items():
            options = [word for option in args.option for word in option.split("=", 1)]
            rates, peak = run_setup(ranks, threads, [*options, *extra], args.steps, args.preset)
            medians[name].append(statistics.median(rates[args.skip:]))
            if peak:
                peaks[name].append(peak)
    base = statistics.median(medians["single"]) if "single" in medians else None
    print(f"| setup ({args.preset}) | ranks x threads | items/s median (min-max over rounds) "
          f"| vs 1 process x {n * t} threads | peak RSS of each process, MB (median over rounds) |")
    print("|---|---|---|---|---|")
    for name, values in medians.items():
        ranks, threads, _ = chosen[name]
        median = statistics.median(values)
        ratios = (f"{median / base:.2f}x ({min(values) / base:.2f}-{max(values) / base:.2f})"
                  if base else "-")
        peak = (", ".join(f"{statistics.median(column):.0f}" for column in zip(*peaks[name]))
                if peaks[name] else "-")
        print(f"| {name} | {ranks} x {threads} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) "
              f"| {ratios} | {peak} |")
    write_json("dist", {"args": vars(args), "samples_per_s": medians, "peak_rss_mb": peaks,
                        "setups": {k: v[:2] for k, v in chosen.items()}})


if __name__ == "__main__":
    main()
