"""Ablations: each technique of the default system switched off (or swapped) on one fixed task.

    python bench/ablations.py [--quick] [--threads 1] [--only GROUP ...] [--output NAME]
    python bench/ablations.py --report bench/results/ablations.json   # table and plot again

Every arm trains in its own process (so that its peak memory, resource.ru_maxrss, is its own) with
`--threads` threads for BLAS and Numba (default 1: the machine may be shared; one thread per arm keeps
arms from fighting over cores). An arm is the default configuration (npcpu.config, "default" preset:
FusedLinearReLU MLP, bf16 storage, LAMB + Lookahead, warmup-cosine, accumulation 2, dynamic freezing)
with one change; the groups:

    fused        FusedLinearReLU vs Linear followed by ReLU (same weights): step time, accuracy
    precision    bf16 (default) vs fp32 vs fp16, and bf16 with bf16 optimizer moments: step time,
                 accuracy; peak memory again at mlp52m scale (group "memory")
    optimizer    LAMB vs AdamW at effective batch 128 x 16 = 2048, 4 learning rates each (AdamW, not
                 Adam: its decoupled weight decay is LAMB's, so the two differ by the trust ratio)
    lookahead    on vs off, 3 seeds each: final accuracy and the std of the last logged losses
    freezing     on vs off: wall-clock, accuracy, GEMMs run and skipped (npcpu.nn.work.counts)
    memory       peak RSS at mlp52m scale (54M parameters): fp32 vs bf16 storage; and gradient
                 accumulation at effective batch 512: 512 x 1, 128 x 4, 32 x 16
    digits       the same switches on scikit-learn's digits (the "digits" preset): real data

Writes bench/results/ablations.json (every arm, with its loss curve), prints one markdown table and a
few derived comparisons, and draws bench/results/ablations.png when matplotlib is installed.
Step time is the median over the optimizer steps after the first `WARMUP_STEPS` (Numba cache loads or
compilation, first-touch allocations); training time is the sum over those same steps (evaluation is
not included). Peak RSS includes the interpreter and libraries (about 170 MB): compare arms with
each other and with "RSS before fit", not as absolutes.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, markdown_table, write_json

WARMUP_STEPS = 5      # steps left out of the step-time median
LAST_LOSSES = 100     # the loss std is over the last this many per-step training losses
CURVE_POINTS = 200    # loss-curve points kept per arm in the JSON


@dataclass
class Arm:
    """One training run: a preset, overrides, and whether to unfuse Linear+ReLU."""
    group: str
    name: str
    preset: str = "default"
    overrides: dict = field(default_factory=dict)
    unfused: bool = False
    evaluate: bool = True
    compile_first: bool = False  # run a tiny twin first (see `compile_twin`)


def merge_overrides(*parts: dict) -> dict:
    """Section-wise merge of override dicts (later parts win, field by field)."""
    merged: dict = {}
    for part in parts:
        for section, fields in part.items():
            merged.setdefault(section, {}).update(fields)
    return merged


# -- the tasks ----------------------------------------------------------------------------------
# The default system on 60,000 synthetic samples, 4 epochs (about 940 optimizer steps of 256 items).
# The freezing start step is the default's 600 of 1564 steps, scaled to this run's length.
FULL = {
    "task": {"data": {"train_size": 60_000, "eval_size": 10_000},
             "train": {"eval_every": None, "checkpoint_every": None, "log_every": 1},
             "freeze": {"start_step": 360}},
    "large_batch": {"train": {"batch_size": 128, "accumulation_steps": 16},
                    "schedule": {"warmup_steps": 8}},
    "lamb_lrs": [4e-3, 1e-2, 2.5e-2, 6e-2],   # a 3-point sweep put both optima at its top end
    "adamw_lrs": [1e-3, 3e-3, 1e-2, 3e-2],
    "seeds": [0, 1, 2],
    # mlp52m (docs/DESIGN.md) for a few steps: big enough that parameters and optimizer state, not the
    # interpreter, decide the peak memory.
    "memory_preset": "mlp52m",
    "memory": {"train": {"epochs": None, "max_steps": 8, "eval_every": None,
                         "checkpoint_every": None, "log_every": 1}},
    "accumulation": [(512, 1), (128, 4), (32, 16)],
    "digits": {"train": {"eval_every": None, "checkpoint_every": None, "log_every": 1}},
}

# --quick: the same arms, a few seconds each (a smoke run, not a measurement).
QUICK = {
    **FULL,
    "task": {"model": {"hidden": [64, 32]},
             "data": {"train_size": 2_000, "eval_size": 500, "input_dim": 32},
             "train": {"epochs": 2, "eval_every": None, "checkpoint_every": None, "log_every": 1},
             "schedule": {"warmup_steps": 5},
             "freeze": {"start_step": 5, "patience": 5, "window": 3}},
    "large_batch": {"train": {"batch_size": 32, "accumulation_steps": 4},
                    "schedule": {"warmup_steps": 2}},
    "lamb_lrs": [4e-3, 1e-2],
    "adamw_lrs": [1e-3, 3e-3],
    "seeds": [0, 1],
    "memory_preset": "default",
    "memory": {"model": {"hidden": [256, 256]},
               "data": {"train_size": 2_000, "eval_size": 500, "input_dim": 64},
               "train": {"epochs": None, "max_steps": 3, "eval_every": None,
                         "checkpoint_every": None, "log_every": 1}},
    "accumulation": [(64, 1), (16, 4)],
    "digits": {"train": {"epochs": 3, "eval_every": None, "checkpoint_every": None,
                         "log_every": 1}},
}


def plan(sizes: dict) -> list[Arm]:
    """Every arm, grouped; the first arm of a group is its reference."""
    task, memory, digits = sizes["task"], sizes["memory"], sizes["digits"]
    arms = [
        Arm("fused", "FusedLinearReLU (default)", overrides=task),
        Arm("fused", "Linear + ReLU", overrides=task, unfused=True),
        Arm("precision", "bf16, bf16 moments (default)", overrides=task),
        Arm("precision", "fp32", overrides=merge_overrides(task, {"train": {"precision": "fp32"}})),
        Arm("precision", "fp16", overrides=merge_overrides(task, {"train": {"precision": "fp16"}})),
        Arm("precision", "bf16, fp32 moments",
            overrides=merge_overrides(task, {"optim": {"state_dtype": "fp32"}})),
    ]
    for name, lrs in (("lamb", sizes["lamb_lrs"]), ("adamw", sizes["adamw_lrs"])):
        arms += [Arm("optimizer", f"{name} lr={lr:g}",
                     overrides=merge_overrides(task, sizes["large_batch"],
                                               {"optim": {"name": name, "lr": lr}}))
                 for lr in lrs]
    for lookahead in (True, False):
        arms += [Arm("lookahead", f"lookahead {'on' if lookahead else 'off'} seed={seed}",
                     overrides=merge_overrides(task, {"optim": {"lookahead": lookahead},
                                                      "train": {"seed": seed}}))
                 for seed in sizes["seeds"]]
    arms += [
        Arm("freezing", "freezing on (default)", overrides=task),
        Arm("freezing", "freezing off", overrides=merge_overrides(task, {"freeze": {"enabled": False}})),
    ]
    memory_arm = dict(preset=sizes["memory_preset"], evaluate=False, compile_first=True)
    arms += [
        Arm("memory", "bf16, bf16 moments (default)", overrides=memory, **memory_arm),
        Arm("memory", "fp32", overrides=merge_overrides(memory, {"train": {"precision": "fp32"}}),
            **memory_arm),
        Arm("memory", "bf16, fp32 moments",
            overrides=merge_overrides(memory, {"optim": {"state_dtype": "fp32"}}), **memory_arm),
    ]
    arms += [Arm("memory", f"fp32, batch {batch} x {accumulation}",
                 overrides=merge_overrides(memory, {"train": {
                     "precision": "fp32", "batch_size": batch, "accumulation_steps": accumulation}}),
                 **memory_arm)
             for batch, accumulation in sizes["accumulation"]]
    # digits preset: fp32, AdamW, no Lookahead, no freezing. Each arm switches one thing on or off.
    arms += [
        Arm("digits", "digits preset (fp32, AdamW)", preset="digits", overrides=digits),
        Arm("digits", "Linear + ReLU", preset="digits", overrides=digits, unfused=True),
        Arm("digits", "bf16", preset="digits",
            overrides=merge_overrides(digits, {"train": {"precision": "bf16"}})),
        Arm("digits", "lookahead on", preset="digits",
            overrides=merge_overrides(digits, {"optim": {"lookahead": True}})),
        Arm("digits", "lamb", preset="digits",
            overrides=merge_overrides(digits, {"optim": {"name": "lamb"}})),
    ]
    return arms


# -- one arm, in a child process ----------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def unfused_twin(model):
    """The same network with each FusedLinearReLU split into Linear and ReLU (same weights)."""
    from npcpu.nn.activations import ReLU
    from npcpu.nn.linear import FusedLinearReLU, Linear
    from npcpu.nn.module import Sequential
    layers = []
    for layer in model:
        if isinstance(layer, FusedLinearReLU):
            plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            plain.load_state_dict(layer.state_dict())
            layers += [plain, ReLU()]
        else:
            layers.append(layer)
    return Sequential(*layers)


def run_arm(arm: Arm, threads: int) -> dict:
    """Train one arm; returns its measurements."""
    from npcpu import backend
    from npcpu.config import build_config
    from npcpu.nn import work
    from npcpu.optim.lr_scheduler import LambdaLR
    from npcpu.train.build import build_optimizer, build_run, build_schedule
    from npcpu.train.callbacks import Callback
    from npcpu.train.trainer import Trainer

    class StepLog(Callback):
        def __init__(self):
            self.losses, self.ends = [], []

        def on_step_end(self, trainer, metrics):
            self.ends.append(time.perf_counter())
            self.losses.append(float(metrics["loss"]))

    backend.set_threads(threads)
    config = build_config(preset=arm.preset, overrides=arm.overrides)
    log, steps = io.StringIO(), StepLog()
    run = build_run(config, callbacks=[steps], log_stream=log)
    trainer = run.trainer
    if arm.unfused:
        model = unfused_twin(trainer.model)
        optimizer = build_optimizer(config["optim"], model, config["train"]["seed"],
                                    config["train"]["precision"])
        scheduler = LambdaLR(optimizer, build_schedule(config["schedule"], run.total_steps))
        trainer = Trainer(model, trainer.loss_fn, optimizer, scheduler=scheduler,
                          accumulation_steps=trainer.accumulation_steps,
                          precision=trainer.precision, clip_grad_norm=trainer.clip_grad_norm,
                          freezer=trainer.freezer, callbacks=[steps], seed=trainer.seed,
                          log_stream=log)
    train = config["train"]
    rss_before = peak_rss_mb()
    work.reset()
    start = time.perf_counter()
    trainer.fit(run.train_data, epochs=train["epochs"], max_steps=train["max_steps"],
                batch_size=train["batch_size"], log_every=train["log_every"], progress=False)
    fit_seconds = time.perf_counter() - start
    gemms = dict(work.counts)
    evaluation = trainer.evaluate(run.eval_data) if arm.evaluate else {}
    step_seconds = np.diff([start] + steps.ends)[WARMUP_STEPS:]
    losses = steps.losses
    stride = max(1, len(losses) // CURVE_POINTS)
    return {
        **asdict(arm),
        "steps": len(losses),
        "effective_batch": train["batch_size"] * train["accumulation_steps"],
        "fit_seconds": fit_seconds,
        "train_seconds_after_warmup": float(np.sum(step_seconds)),
        "step_ms_median": 1e3 * float(np.median(step_seconds)) if len(step_seconds) else None,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_fit_mb": rss_before,
        "parameters": trainer.model.num_parameters(),
        "eval_accuracy": evaluation.get("eval_accuracy"),
        "eval_loss": evaluation.get("eval_loss"),
        "last_losses_mean": float(np.mean(losses[-LAST_LOSSES:])),
        "last_losses_std": float(np.std(losses[-LAST_LOSSES:])),
        "gemms_run": gemms.get("gemm", 0),
        "gemms_skipped": gemms.get("gemm_skipped", 0),
        "frozen_at": dict(trainer.freezer.frozen_at) if trainer.freezer else {},
        "curve": {"step": list(range(1, len(losses) + 1, stride)), "loss": losses[::stride]},
    }


def compile_twin(arm: Arm) -> Arm:
    """The arm at toy size: same precision, optimizer and accumulation, so the same kernels.

    Run first in its own process, it leaves Numba's on-disk cache filled, so that the arm itself
    loads compiled kernels instead of compiling them: LLVM's tens of MB then stay out of its peak RSS.
    """
    tiny = {"model": {"hidden": [8]}, "data": {"train_size": 64, "eval_size": 8, "input_dim": 8,
                                                "num_classes": 4},
            "train": {"epochs": None, "max_steps": 2, "batch_size": 4}}
    return Arm(arm.group, f"{arm.name} (compile)", arm.preset,
               merge_overrides(arm.overrides, tiny), arm.unfused, evaluate=False)


def run_in_child(arm: Arm, threads: int) -> dict:
    """run_arm in a fresh interpreter (its own peak RSS); the result comes back as JSON on stdout."""
    done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads)],
                          input=json.dumps(asdict(arm)), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ablation arm {arm.group}/{arm.name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    headers = ["group", "arm", "eff. batch", "steps", "eval acc", "loss (last 100)", "loss std",
               "step ms", f"train s (steps > {WARMUP_STEPS})", "peak RSS MB", "RSS before fit MB", "GEMMs run / skipped"]

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)
    rows = [[r["group"], r["name"], r["effective_batch"], r["steps"],
             number(r["eval_accuracy"], ".4f"), number(r["last_losses_mean"], ".4f"),
             number(r["last_losses_std"], ".4f"), number(r["step_ms_median"], ".1f"),
             number(r["train_seconds_after_warmup"], ".1f"), number(r["peak_rss_mb"], ".0f"),
             number(r["rss_before_fit_mb"], ".0f"), f"{r['gemms_run']} / {r['gemms_skipped']}"]
            for r in results]
    return markdown_table(headers, rows)


def comparisons(results: list[dict]) -> list[str]:
    """Plain-language deltas within each group, against the group's first (reference) arm."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    lines = []
    for group in ("fused", "precision", "digits"):
        reference, *others = groups.get(group, [None])
        for r in others:
            lines.append(f"{group}: {r['name']} vs {reference['name']}: step time "
                         f"x{r['step_ms_median'] / reference['step_ms_median']:.3f}, accuracy "
                         f"{r['eval_accuracy'] - reference['eval_accuracy']:+.4f}")
    memory = groups.get("memory", [])
    storage = [r for r in memory if ", batch " not in r["name"]]
    accumulation = [r for r in memory if ", batch " in r["name"]]
    for arms in (storage, accumulation):
        reference, *others = arms or [None]
        for r in others:
            lines.append(f"memory: {r['name']}: peak RSS {r['peak_rss_mb']:.0f} MB, "
                         f"{r['peak_rss_mb'] - reference['peak_rss_mb']:+.0f} MB vs "
                         f"{reference['name']}")
    for opt in ("lamb", "adamw"):
        sweep = [r for r in groups.get("optimizer", []) if r["name"].startswith(opt)]
        if sweep:
            best = max(sweep, key=lambda r: r["eval_accuracy"])
            accuracies = ", ".join(f"{r['eval_accuracy']:.4f}" for r in sweep)
            lines.append(f"optimizer: best {opt}: {best['name']}, accuracy "
                         f"{best['eval_accuracy']:.4f} (sweep: {accuracies})")
    for state in ("on", "off"):
        seeds = [r for r in groups.get("lookahead", []) if f"lookahead {state} " in r["name"]]
        if seeds:
            accuracy = [r["eval_accuracy"] for r in seeds]
            std = [r["last_losses_std"] for r in seeds]
            lines.append(f"lookahead {state}: accuracy {statistics.mean(accuracy):.4f} "
                         f"± {statistics.pstdev(accuracy):.4f} over {len(seeds)} seeds; std of the "
                         f"last {LAST_LOSSES} losses {statistics.mean(std):.4f} (mean over seeds)")
    if len(groups.get("freezing", [])) == 2:
        on, off = groups["freezing"]
        on_s, off_s = on["train_seconds_after_warmup"], off["train_seconds_after_warmup"]
        lines.append(f"freezing: training {on_s:.1f} s vs {off_s:.1f} s "
                     f"({1 - on_s / off_s:.1%} saved), accuracy "
                     f"{on['eval_accuracy'] - off['eval_accuracy']:+.4f}, layers frozen at steps "
                     f"{on['frozen_at']}, GEMMs run {on['gemms_run']} vs {off['gemms_run']}, "
                     f"skipped {on['gemms_skipped']} vs {off['gemms_skipped']}")
    return lines


def plot(results: list[dict], path) -> bool:
    """Loss curves, one panel per group (moving average of up to 20 steps); False without matplotlib.

    The memory arms run a few steps only: they have no curve worth drawing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = [r for r in results if r["group"] != "memory"]
    groups = list(dict.fromkeys(r["group"] for r in results))
    cols = 3
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for r in (r for r in results if r["group"] == group):
            loss = np.asarray(r["curve"]["loss"])
            width = min(20, max(1, len(loss) // 10))
            smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
            ax.plot(r["curve"]["step"][width - 1:], smooth, label=r["name"], lw=1)
        ax.set_title(group)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(results: list[dict], output: str) -> None:
    """Print the table and the comparisons; draw the loss curves to `output`.png if possible."""
    print(table(results))
    print()
    for line in comparisons(results):
        print("- " + line)
    png = RESULTS_DIR / f"{output}.png"
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no loss-curve plot (pip install matplotlib)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="threads per arm (default 1)")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups")
    parser.add_argument("--output", default="ablations",
                        help="NAME for bench/results/NAME.json and .png, or a path without suffix")
    parser.add_argument("--report", metavar="JSON",
                        help="print the table and draw the plot of a saved run; train nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(Arm(**json.load(sys.stdin)), args.threads)))
        return
    if args.report:
        report(json.loads(Path(args.report).read_text())["arms"], args.output)
        return

    arms = plan(QUICK if args.quick else FULL)
    if args.only:
        unknown = set(args.only) - {a.group for a in arms}
        if unknown:
            parser.error(f"unknown groups {sorted(unknown)} (groups: "
                         f"{', '.join(dict.fromkeys(a.group for a in arms))})")
        arms = [a for a in arms if a.group in args.only]
    results = []
    for i, arm in enumerate(arms, 1):
        print(f"[{i}/{len(arms)}] {arm.group}: {arm.name}", file=sys.stderr, flush=True)
        if arm.compile_first:
            run_in_child(compile_twin(arm), args.threads)
        results.append(run_in_child(arm, args.threads))

    path = write_json(args.output, {"quick": args.quick, "threads_per_arm": args.threads,
                                    "sizes": QUICK if args.quick else FULL, "arms": results})
    report(results, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
