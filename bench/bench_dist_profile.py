"""Where a data-parallel step spends its time, per rank: each phase timed inside real steps.

Runs `npcpu train --preset PRESET` under mpiexec with timers around the parts of the step
(npcpu.dist): the forward passes of the micro-batches with their losses, their backward passes
(with the reductions they start), the rest of the gradient reduction and the loss sum, the gradient norm and clipping, the freezer, the optimizer step, the parameters'
broadcast from their owners, zeroing the gradients; "other" is the rest of the step. Prints, for
each rank, the median milliseconds of each phase over the steps after the first `--skip`.

    python bench/bench_dist_profile.py --ranks 2 --steps 10 -- --dist.shard_optimizer true
    python bench/bench_dist_profile.py --ranks 1 --threads 2 --steps 10
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (module, class, method) -> phase; a method called inside another timed one is counted in its
# own phase only (the outer phase is charged the rest)
TIMED = {
    ("npcpu.train.runners", "ReferenceRunner", "micro_batch"): "forward+loss",
    ("npcpu.nn.module", "Sequential", "backward"): "backward",
    ("npcpu.models.gpt", "GPT", "backward"): "backward",
    ("npcpu.train.runners", "ReferenceRunner", "forward_backward"): "reduce+loss sum",
    ("npcpu.dist.trainer", "DataParallelRunner", "forward_backward"): "reduce+loss sum",
    ("npcpu.train.runners", "ReferenceRunner", "_grad_norm"): "norm+clip",
    ("npcpu.dist.trainer", "DataParallelRunner", "_grad_norm"): "norm+clip",
    ("npcpu.train.freezing", "DynamicFreezer", "observe"): "freezer",
    ("npcpu.train.runners", "ReferenceRunner", "take_step"): "optimizer step",
    ("npcpu.dist.trainer", "DataParallelRunner", "take_step"): "optimizer step",
    ("npcpu.dist.shard", "OptimizerShard", "publish_parameters"): "parameter broadcast",
    ("npcpu.optim.optimizer", "Optimizer", "zero_grad"): "zero_grad",
    ("npcpu.train.runners", "ReferenceRunner", "optimizer_step"): "other",
}


def instrument(steps: list[collections.Counter]) -> None:
    """Wrap the TIMED methods: each call's time, less its timed callees', goes to its phase of
    the current step (a new step starts at each forward_backward)."""
    stack: list[float] = []  # time spent in timed callees, per open call

    def wrap(owner, name, phase):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if name == "forward_backward" and not stack:
                steps.append(collections.Counter())
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = stack.pop()
                if steps:
                    steps[-1][phase] += spent - inner
                if stack:
                    stack[-1] += spent
        setattr(owner, name, timed)

    for (module, cls, name), phase in TIMED.items():
        owner = getattr(importlib.import_module(module), cls, None)
        if owner is not None and name in vars(owner):
            wrap(owner, name, phase)


def worker(out: Path, train_args: list[str]) -> None:
    """One rank: train with the timers on, then write this rank's per-step phases to `out`."""
    from npcpu import cli
    steps: list[collections.Counter] = []
    instrument(steps)
    code = cli.main(["train", *train_args])
    rank = int(os.environ.get("PMI_RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps([dict(s) for s in steps]))
    sys.exit(code)


def profile(ranks: int, threads: int, steps: int, skip: int, preset: str,
            options: list[str]) -> tuple[float, list[dict], str]:
    """Train `preset` on `ranks` x `threads` for `steps` steps with the timers on: the median
    items/s of the steps after the first `skip`, for each rank the median seconds of each phase
    (and "total") over those steps, and what the run printed (its header goes to stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        train = ["--preset", preset, "--run-dir", str(out / "run"), "--train.max_steps",
                 str(steps), "--train.threads", str(threads), "--train.eval_every",
                 "none", "--train.checkpoint_every", "none", "--train.log_every", "1",
                 "--progress", "lines", *options]
        program = [sys.executable, __file__, "--worker", str(out), *train]
        command = program if ranks == 1 else [shutil.which("mpiexec"), "-n", str(ranks), *program]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        metrics = (out / "run" / "metrics.jsonl").read_text().splitlines()
        lines = [json.loads(line) for line in metrics]
        rates = [line["samples_per_s"] for line in lines if line["kind"] == "train"]
        per_rank = [json.loads((out / f"rank{r}.json").read_text())[skip:] for r in range(ranks)]
    phases = list(dict.fromkeys(TIMED.values()))
    medians = [{phase: statistics.median([s.get(phase, 0.0) for s in kept]) for phase in phases}
               | {"total": statistics.median([sum(s.values()) for s in kept])}
               for kept in per_rank]
    return statistics.median(rates[skip:]), medians, done.stdout + done.stderr


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # a rank: the rest is the train command line
        worker(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--preset", default="mlp52m")
    args, rest = parser.parse_known_args()
    rest = [word for word in rest if word != "--"]
    rate, ranks, _ = profile(args.ranks, args.threads, args.steps, args.skip, args.preset, rest)
    print(f"{args.preset}, {args.ranks} rank(s) x {args.threads} thread(s), options {rest}: "
          f"items/s median {rate:.0f}")
    print("| phase, ms per step (median) | " + " | ".join(f"rank {r}" for r in range(args.ranks))
          + " |")
    print("|---|" + "---|" * args.ranks)
    for phase in ranks[0]:
        print(f"| {phase} | " + " | ".join(f"{1e3 * rank[phase]:.1f}" for rank in ranks) + " |")


if __name__ == "__main__":
    main()
