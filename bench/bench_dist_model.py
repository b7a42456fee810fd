"""Expected data-parallel scaling over N hosts and link speeds, from one host's measured step.

A host is this machine: one process with --threads threads. For each number of hosts N, one host
runs the step of --preset on its share of the global batch (a micro-batch of B/N items, or, where
B does not split N ways, B items in 1/N of the accumulation window), timed by bench_dist_profile's
timers: forward (with the loss), backward, and the rest of the step (gradient norm, clipping,
freezer, optimizer). N such hosts joined by a link of each speed are then modeled (alpha-beta):

    all-reduce of S bytes over a ring of N      2 (N-1) alpha + 2 (N-1)/N S / bandwidth
    reduce-scatter or all-gather                  (N-1) alpha +   (N-1)/N S / bandwidth

    overlap   step(N) = forward + backward + exposed all-reduce + rest
    after     step(N) = forward + backward + all-reduce of all gradients + rest
    shard     step(N) = forward + backward + exposed reduce-scatter + rest / N
                        + all-gather of the parameters (ZeRO stage 1: each host steps 1/N)

The float32 gradients are reduced in buckets of dist.bucket_mb in the order backward finishes
them. Backward is taken to finish gradient bytes at an even rate over the window's last
micro-batch (the earlier ones do not communicate), and the link to serve one bucket at a time:
what runs past the end of backward is exposed. The scaling efficiency is step(1) / (N step(N)):
N hosts against one host training the same global batch (npcpu's meaning of train.batch_size);
"weak scaling" gives each host the whole batch (N times the global batch) and is step(1) over
the N-host step.

Not modeled: the CPU time the network stack takes from compute, other jobs on the link,
stragglers; the rest's parts that do not shrink with the shard. alpha is assumed (--alpha-us);
the bandwidth is the nominal link rate. On one machine, the namespaces of bench_dist_net.py
cannot show this (both "hosts" and the network stack share its cores).

    python bench/bench_dist_model.py --preset mlp52m
    python bench/bench_dist_model.py --preset gpt-small --steps 5 --skip 2 \\
        --option=--data.path=/tmp/npcpu-bench-lm/stdlib-char
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from bench_dist_profile import profile
from common import markdown_table, write_json
from npcpu.config import build_config

LINKS_GBIT = (1, 10, 25, 100)
SETUPS = ("overlap", "after", "shard")


def host_share(batch: int, accumulation: int, hosts: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) of one host's share of the global step, or None."""
    if batch % hosts == 0:
        return batch // hosts, accumulation
    if accumulation % hosts == 0:
        return batch, accumulation // hosts
    return None


def sizes_from_header(printed: str) -> tuple[float, float]:
    """(parameter bytes, gradient bytes) from the run header's memory estimate."""
    found = re.search(r"parameters ([\d.]+) MiB, gradients ([\d.]+) MiB", printed)
    if found is None:
        sys.exit("bench_dist_model: the run printed no memory estimate to take the sizes from")
    return tuple(float(v) * 2**20 for v in found.groups())


def exposed(window: float, gradient_bytes: float, bucket_bytes: float, cost) -> float:
    """Seconds the reduction of the buckets runs past the end of a backward `window` that
    finishes gradient bytes at an even rate; `cost(bytes)` is one bucket's reduction."""
    done, link_free = 0.0, 0.0
    while done < gradient_bytes:
        size = min(bucket_bytes, gradient_bytes - done)
        done += size
        link_free = max(window * done / gradient_bytes, link_free) + cost(size)
    return max(0.0, link_free - window)


def model(phases: dict, hosts: int, accumulation: int, parameter_bytes: float,
          gradient_bytes: float, bucket_bytes: float, alpha: float, gbit: float) -> dict:
    """Modeled step seconds on `hosts` for one link, from one host's measured `phases`."""
    beta = 8 / (gbit * 1e9)  # seconds per byte
    steps = hosts - 1

    def allreduce(size):
        return 2 * steps * alpha + 2 * steps / hosts * size * beta

    def half(size):  # reduce-scatter or all-gather
        return steps * alpha + steps / hosts * size * beta

    compute = phases["forward+loss"] + phases["backward"]
    rest = phases["total"] - compute
    window = phases["backward"] / accumulation
    return {
        "overlap": compute + exposed(window, gradient_bytes, bucket_bytes, allreduce) + rest,
        "after": compute + allreduce(gradient_bytes) + rest,
        "shard": compute + exposed(window, gradient_bytes, bucket_bytes, half) + rest / hosts
        + half(parameter_bytes),
        "hides_at_gbit": 8e-9 * 2 * steps / hosts * gradient_bytes
        / max(window - 2 * steps * alpha * math.ceil(gradient_bytes / bucket_bytes), 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--preset", default="mlp52m")
    parser.add_argument("--hosts", default="2,4,8", help="comma-separated numbers of hosts")
    parser.add_argument("--threads", type=int, default=2, help="threads of a host's process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--alpha-us", type=float, default=25.0,
                        help="latency of one message between hosts (assumed)")
    parser.add_argument("--option", action="append", default=[],
                        help="a train option for every run, e.g. --option=--data.path=DIR")
    args = parser.parse_args()
    config = build_config(preset=args.preset)
    batch, accumulation = config["train"]["batch_size"], config["train"]["accumulation_steps"]
    bucket_bytes = config["dist"]["bucket_mb"] * 2**20
    hosts = [1] + [int(n) for n in args.hosts.split(",")]
    measured, rows, results = {}, [], []
    for n in hosts:
        share = host_share(batch, accumulation, n)
        if share is None:
            print(f"{n} hosts: the global batch {batch} x {accumulation} does not split; skipped")
            continue
        options = ["--train.batch_size", str(share[0]), "--train.accumulation_steps",
                   str(share[1]), *args.option]
        _, (phases,), printed = profile(1, args.threads, args.steps, args.skip, args.preset,
                                        options)
        measured[n] = share, phases, sizes_from_header(printed)
        print(f"one host, {n}-host share (micro-batch {share[0]} x {share[1]}): " + ", ".join(
            f"{phase} {1e3 * seconds:.1f} ms" for phase, seconds in phases.items() if seconds),
              flush=True)
    full, single = measured[1][1], measured[1][1]["total"]
    for n, (share, phases, (parameter_bytes, gradient_bytes)) in measured.items():
        if n == 1:
            continue
        for gbit in LINKS_GBIT:
            sizes = (parameter_bytes, gradient_bytes, bucket_bytes, 1e-6 * args.alpha_us, gbit)
            step = model(phases, n, share[1], *sizes)
            weak = model(full, n, accumulation, *sizes)  # each host the whole batch
            efficiency = {setup: single / (n * step[setup]) for setup in SETUPS}
            efficiency |= {f"weak {setup}": single / weak[setup] for setup in SETUPS}
            results.append({"hosts": n, "gbit": gbit, "step_s": step, "weak_step_s": weak,
                            "efficiency": efficiency})
            rows.append([n, gbit, f"{1e3 * step['overlap']:.0f}",
                         *(f"{efficiency[s]:.2f}" for s in efficiency),
                         f"{step['hides_at_gbit']:.1f}"])
    print(f"\n{args.preset}: one host {1e3 * single:.0f} ms per step "
          f"(global batch {batch} x {accumulation}); alpha {args.alpha_us} us assumed")
    print(markdown_table(["hosts", "link Gbit/s", "step ms (overlap)", "efficiency: overlap",
                          "after", "shard", "weak scaling: overlap", "after", "shard",
                          "overlap hides the all-reduce from Gbit/s"], rows))
    write_json("dist_model", {"args": vars(args),
                              "measured": {n: {"share": m[0], "phases_s": m[1],
                                               "parameter_bytes": m[2][0],
                                               "gradient_bytes": m[2][1]}
                                           for n, m in measured.items()},
                              "modeled": results})


if __name__ == "__main__":
    main()
