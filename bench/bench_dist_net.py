"""Two hosts on one machine: ranks in two Linux network namespaces joined by a veth pair.

The script creates the namespaces and the veth pair itself (private addresses on the veth only,
loopback inside each namespace), limits each end with a token-bucket filter (`tc ... tbf`) to the
link speeds asked for, and removes everything when it ends. MPI runs over TCP between the
namespaces (MPICH: MPIR_CVAR_NOLOCAL=1 forbids shared memory, libfabric's tcp provider; npcpu's
own shared-memory sum, dist.shared_memory, is turned off: the two "hosts" share one machine).

For each link speed it measures
- the all-reduce of 2 ranks for message sizes from 4 KB to 64 MB, and fits the alpha-beta model
  of a ring all-reduce, t(S) = 2 (N-1) alpha + 2 (N-1)/N S beta, by least squares;
- the training throughput of `--preset` on 2 ranks x 1 thread, the reduction overlapped with
  backward ("overlap"), after it ("after"), and with the optimizer step sharded ("shard": each
  host receives only its half of the summed gradients, a reduce-scatter overlapped with
  backward, and sends its half of the updated parameters; "shard-after": after backward, every
  bucket in flight at once), against 1 process x 1 thread (one "host"): the scaling efficiency is (2-rank samples/s) / (2 x 1-process samples/s).

Needs root (ip netns, tc), mpi4py and MPICH's mpiexec. Example:

    python bench/bench_dist_net.py --rates 1gbit,10gbit,none --steps 10
    python bench/bench_dist_net.py --rates 10gbit --setups overlap,shard
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import write_json

NAMESPACES = ("npcpu-host0", "npcpu-host1")
ADDRESSES = ("10.231.0.1/24", "10.231.0.2/24")
DEVICE = "npcpu0"  # the veth end's name inside each namespace
SETUPS = {"overlap": ["--dist.overlap", "true"], "after": ["--dist.overlap", "false"],
          "shard": ["--dist.overlap", "true", "--dist.shard_optimizer", "true"],
          "shard-after": ["--dist.overlap", "false", "--dist.shard_optimizer", "true"]}
MPI_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp",
           "FI_TCP_IFACE": DEVICE}

ALLREDUCE = """
import sys, time, numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
for size in [int(s) for s in sys.argv[1:]]:
    a = np.ones(size // 4, np.float32)
    comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    times = []
    for _ in range(5):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        times.append(time.perf_counter() - t)
    if comm.rank == 0:
        print(size, sorted(times)[len(times) // 2], flush=True)
"""


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def create_hosts() -> None:
    sh("ip", "link", "add", "npcpu-veth0", "type", "veth", "peer", "name", "npcpu-veth1")
    for i, (ns, address) in enumerate(zip(NAMESPACES, ADDRESSES)):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", f"npcpu-veth{i}", "netns", ns)
        sh("ip", "-n", ns, "link", "set", f"npcpu-veth{i}", "name", DEVICE)
        sh("ip", "-n", ns, "addr", "add", address, "dev", DEVICE)
        sh("ip", "-n", ns, "link", "set", DEVICE, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def remove_hosts() -> None:
    for ns in NAMESPACES:  # deleting a namespace deletes its veth end, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def limit_links(rate: str) -> None:
    """Each end sends at most `rate` ("1gbit", "10gbit"), or without limit ("none")."""
    for ns in NAMESPACES:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", DEVICE, "root"],
                       capture_output=True)
        if rate != "none":
            bits = float(rate.lower().replace("gbit", "e9").replace("mbit", "e6"))
            burst = max(int(bits / 8 / 250), 256 * 1024)  # one 4 ms tick of data at least
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", DEVICE, "root", "tbf",
               "rate", rate, "burst", str(burst), "latency", "100ms")


def across_hosts(program: list[str]) -> list[str]:
    """mpiexec running rank 0 in the first namespace and rank 1 in the second."""
    mpiexec = shutil.which("mpiexec")
    return [mpiexec, "-n", "1", "ip", "netns", "exec", NAMESPACES[0], *program, ":",
            "-n", "1", "ip", "netns", "exec", NAMESPACES[1], *program]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MPI_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def alpha_beta(rate: str) -> dict:
    """The fitted alpha (s) and beta (s/byte) of t(S) = 2 alpha + S beta (N = 2), and the data."""
    sizes = [4096 * 4**k for k in range(9)]  # 4 KB .. 256 MB would be too slow at 1 Gbit: 64 MB
    sizes = [s for s in sizes if s <= 64 * 2**20]
    out = run(across_hosts([sys.executable, "-c", ALLREDUCE, *map(str, sizes)]))
    measured = [(int(a), float(b)) for a, b in (line.split() for line in out.splitlines())]
    x = np.array([[2.0, s] for s, _ in measured])
    (alpha, beta), *_ = np.linalg.lstsq(x, np.array([t for _, t in measured]), rcond=None)
    return {"rate": rate, "alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_GBps": 1e-9 / beta if beta > 0 else None, "allreduce": measured}


def throughput(ranks: int, preset: str, steps: int, skip: int, extra: list[str]) -> float:
    """Median samples/s of the steps after `skip` of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        program = [sys.executable, "-m", "npcpu", "train", "--preset", preset, "--run-dir",
                   str(run_dir), "--train.max_steps", str(steps), "--train.threads", "1",
                   "--train.eval_every", "none", "--train.checkpoint_every", "none",
                   "--train.log_every", "1", "--progress", "lines",
                   "--dist.shared_memory", "false", *extra]  # the "hosts" share this machine
        run(across_hosts(program) if ranks == 2 else program)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return statistics.median([line["samples_per_s"] for line in lines
                                  if line["kind"] == "train"][skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1gbit,10gbit,none")
    parser.add_argument("--preset", default="mlp52m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--setups", default="overlap,after,shard",
                        help=f"comma-separated subset of {','.join(SETUPS)}")
    args = parser.parse_args()
    setups = args.setups.split(",")
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        sys.exit(f"bench_dist_net: unknown setup(s) {unknown}; choose from {sorted(SETUPS)}")
    if os.geteuid() != 0 or shutil.which("mpiexec") is None:
        sys.exit("bench_dist_net: needs root (ip netns, tc) and mpiexec (pip install 'npcpu[mpi]')")
    remove_hosts()  # what an interrupted earlier run may have left
    results = []
    try:
        create_hosts()
        for rate in args.rates.split(","):
            limit_links(rate)
            model = alpha_beta(rate)
            single = throughput(1, args.preset, args.steps, args.skip, [])
            for setup in setups:
                pair = throughput(2, args.preset, args.steps, args.skip, SETUPS[setup])
                model[f"efficiency_{setup}"] = pair / (2 * single)
            model["single_samples_per_s"] = single
            results.append(model)
            bandwidth = model["bandwidth_GBps"]
            print(f"{rate}: alpha {1e6 * model['alpha_s']:.0f} us, "
                  f"{bandwidth if bandwidth is None else round(bandwidth, 2)} GB/s, 1 host "
                  f"{single:.0f} samples/s, 2 hosts efficiency " +
                  ", ".join(f"{setup} {model[f'efficiency_{setup}']:.2f}" for setup in setups),
                  flush=True)
    finally:
        remove_hosts()
    write_json("dist_net", {"args": vars(args), "links": results})


if __name__ == "__main__":
    main()
