"""Training speed and peak memory, npcpu against PyTorch, on the canonical workloads (docs/DESIGN.md).

    python bench/bench_train.py [--workload mlp52m|logreg-mnist|all] [--rounds N] [--threads 2]
                                [--quick] [--samples N] [--configs SUBSTRING ...] [--note TEXT]

Workloads (bench/workloads.py builds both libraries' models with the same initial weights):
    mlp52m        one training step: forward, cross-entropy, backward, Adam step, zero_grad
    logreg-mnist  one epoch (60,000 samples, or --samples) of softmax regression, batch 128, SGD

Method. Every configuration runs in a process of its own, so that its peak resident memory
(ru_maxrss, reported in MB) is its own: a child builds the model, runs warm-up steps (the first
one's time is reported: it holds torch.compile's compilation), then times `steps` steps and prints
JSON. Rounds interleave the configurations (round 1: A, B, C; round 2: A, B, C; ...), so drift on
a shared machine lands on all of them alike. Reported: the median over all timed steps of all
rounds, min and max, samples/s, and the ratio npcpu / torch of samples/s per pair (> 1: npcpu is
faster). All processes get the same thread count (BLAS, Numba and torch). npcpu children never
import torch.

How each library is driven is the way a user would write it:
    npcpu  model.forward, loss, model.backward(loss.backward()), optimizer.step(), zero_grad();
           for logreg-mnist also `Trainer.fit(ArrayDataset, epochs=1)` with its defaults, and the
           small-model fast path npcpu.train.compiled.CompiledClassifierStep (whole epochs)
    torch  zero_grad() (set_to_none), loss = cross_entropy(model(x), y), backward, step; for
           logreg-mnist batches are `index_select`ed from whole-data tensors by a fresh
           `randperm` each epoch (a torch DataLoader over single samples would be far slower).
torch's "default" Adam/SGD is what torch picks with no flag: on CPU tensors that is the
single-tensor for-loop implementation, not foreach (recorded in each result's info).

Also measured in the same run (mlp52m): the roofline of bench/roofline.py (the step's GEMMs alone
plus Adam's bytes at the measured memory bandwidth), and how fast SyntheticClassification makes a
batch compared with how fast a step consumes it. Targets are reported as met or missed, by how much.

Results go to bench/results/bench_train.json (with the machine's facts) and a markdown table.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import workloads as wl
from common import markdown_table, peak_rss_mb, write_json

# -- configurations -------------------------------------------------------------------------------
# A builder takes the parsed child arguments and returns (step, samples per step, info); `step()`
# runs one timed unit (an mlp52m step, or one logreg-mnist epoch).


def _npcpu_mlp52m(precision: str, update_in_backward: bool = False, bf16_gemm: str = "auto"):
    """bf16_gemm: npcpu.backend.set_bf16_gemm's setting ("auto": native where the CPU has it)."""
    def build(args):
        from npcpu import backend
        path = backend.set_bf16_gemm(bf16_gemm)
        return wl.npcpu_mlp52m_step(precision, update_in_backward), wl.BATCH, \
            {"precision": precision, "adam_state_dtype": precision,
             "update_in_backward": update_in_backward,
             "bf16_gemm": path if precision == "bf16" else None}
    return build


def _torch_mlp52m(adam_options: dict, compile_what: str | None = None, bf16: str | None = None):
    """compile_what: None (eager), "model" (torch.compile(model)), "model+optimizer" (also the
    optimizer's step compiled, torch's recipe for a compiled optimizer). bf16: None (float32),
    "cast" (model and input cast to bfloat16: bf16 parameters, gradients and Adam states),
    "autocast" (float32 parameters, the forward under torch.autocast("cpu", bfloat16))."""
    def build(args):
        torch = _import_torch(args.threads)
        model = wl.torch_mlp52m(torch, args.inputs)
        x, y = (torch.from_numpy(a) for a in wl.load_mlp52m_batch(args.inputs))
        if bf16 == "cast":
            model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        optimizer = torch.optim.Adam(model.parameters(), lr=wl.MLP52M_LR, **adam_options)
        return _torch_step(torch, model, optimizer, lambda: [(x, y)], compile_what,
                           autocast=bf16 == "autocast"), wl.BATCH, \
            {**_torch_info(torch, optimizer, compile_what), "bf16": bf16 or "no (float32)"}
    return build


def _shuffled_batches(x, y, rng):
    """One epoch of (x, y) batches of wl.BATCH rows in a fresh random order (the last one short)."""
    order = rng.permutation(len(x))
    for start in range(0, len(x), wl.BATCH):
        batch = order[start:start + wl.BATCH]
        yield x[batch], y[batch]


def _npcpu_logreg_loop(args):
    from npcpu.nn.losses import CrossEntropyLoss
    from npcpu.optim.sgd import SGD
    model = wl.npcpu_logreg()  # used directly, as a user writes it: no input gradient by default
    optimizer = SGD(model.parameters(), lr=wl.LOGREG_LR)
    loss_fn = CrossEntropyLoss()
    x, y = wl.logreg_data(args.samples)
    rng = np.random.default_rng(0)

    def epoch():
        for xb, yb in _shuffled_batches(x, y, rng):
            loss_fn(model.forward(xb), yb)
            model.backward(loss_fn.backward())
            optimizer.step()
            optimizer.zero_grad()
    return epoch, len(x), {"loop": "layer API, numpy permutation and fancy indexing"}


def _numpy_logreg_loop(args):
    """The loop npcpu's layer loop is measured against (issue 15): softmax regression in a few
    lines of NumPy, from the same initial weights and batches."""
    layer = wl.npcpu_logreg()
    weight, bias = layer.weight.data.copy(), layer.bias.data.copy()
    x, y = wl.logreg_data(args.samples)
    rng = np.random.default_rng(0)

    def epoch():
        for xb, yb in _shuffled_batches(x, y, rng):
            p = xb @ weight.T + bias
            p = np.exp(p - p.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1  # dL/dlogits = (softmax - onehot) / batch
            p /= len(yb)
            weight[...] -= wl.LOGREG_LR * (p.T @ xb)
            bias[...] -= wl.LOGREG_LR * p.sum(axis=0)
    return epoch, len(x), {"loop": "plain NumPy: x W^T + b, softmax, dz^T x, in-place updates"}


def _npcpu_logreg_trainer(pixels: bool, adam: bool = False, precision: str = "fp32"):
    """Trainer.fit on the float32 rows, or (`pixels`) on them as MNIST stores images: uint8
    round(255 x) with the data set's scale 1 / 255, which the compiled step reads as they are.
    SGD at the workload's learning rate, or (`adam`) Adam with torch's defaults; the model in
    `precision`."""
    def build(args):
        from npcpu.data.arrays import ArrayDataset
        from npcpu.nn.losses import CrossEntropyLoss
        from npcpu.optim.adam import Adam
        from npcpu.optim.sgd import SGD
        from npcpu.train.trainer import Trainer
        model = wl.npcpu_logreg()
        optimizer = Adam(model.parameters()) if adam else SGD(model.parameters(), lr=wl.LOGREG_LR)
        trainer = Trainer(model, CrossEntropyLoss(), optimizer, precision=precision,
                          log_stream=io.StringIO())
        x, y = wl.logreg_data(args.samples)
        if pixels:
            dataset = ArrayDataset(np.rint(x * 255).astype(np.uint8), y,
                                   num_classes=wl.LOGREG_CLASSES, scale=1 / 255)
        else:
            dataset = ArrayDataset(x, y, num_classes=wl.LOGREG_CLASSES)
        epochs_done = 0

        def epoch():  # fit() continues from the trainer's counters: each call trains one more epoch
            nonlocal epochs_done
            epochs_done += 1
            trainer.fit(dataset, epochs=epochs_done, batch_size=wl.BATCH)
        return epoch, len(dataset), {
            "loop": "Trainer.fit(ArrayDataset, epochs=1), default options (its header, progress "
                    "lines and prefetch thread included)",
            "data": "uint8 pixels, scale 1/255" if pixels else "float32",
            "optimizer": type(optimizer).__name__, "precision": precision}
    return build


def _npcpu_logreg_compiled(args):
    from npcpu.data.arrays import ArrayDataset
    from npcpu.data.loader import DataLoader
    from npcpu.nn.losses import CrossEntropyLoss
    from npcpu.optim.sgd import SGD
    from npcpu.train.compiled import CompiledClassifierStep
    model = wl.npcpu_logreg()
    step = CompiledClassifierStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=wl.LOGREG_LR))
    dataset = ArrayDataset(*wl.logreg_data(args.samples), num_classes=wl.LOGREG_CLASSES)
    loader = DataLoader(dataset, wl.BATCH, seed=0)
    epochs = itertools.count()
    return lambda: step.train_epoch(loader, next(epochs)), len(dataset), \
        {"loop": "CompiledClassifierStep.train_epoch(DataLoader(ArrayDataset), epoch)"}


def _torch_logreg(sgd_options: dict, compile_what: str | None = None, adam: bool = False):
    """SGD at the workload's learning rate with `sgd_options`, or (`adam`) Adam's defaults."""
    def build(args):
        torch = _import_torch(args.threads)
        model = wl.torch_logreg(torch, args.inputs)
        optimizer = torch.optim.Adam(model.parameters()) if adam else \
            torch.optim.SGD(model.parameters(), lr=wl.LOGREG_LR, **sgd_options)
        x, y = (torch.from_numpy(a) for a in wl.logreg_data(args.samples))
        generator = torch.Generator().manual_seed(0)

        def batches():
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), wl.BATCH):
                batch = order[start:start + wl.BATCH]
                yield x.index_select(0, batch), y.index_select(0, batch)
        return _torch_step(torch, model, optimizer, batches, compile_what), len(x), \
            _torch_info(torch, optimizer, compile_what)
    return build


def _import_torch(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch


def _torch_step(torch, model, optimizer, batches: Callable, compile_what: str | None,
                autocast: bool = False):
    """One pass over `batches()`: zero_grad, cross-entropy of model(x), backward, optimizer step;
    with `autocast`, the forward and the loss under torch.autocast("cpu", bfloat16)."""
    forward = torch.compile(model) if compile_what else model
    optimizer_step = torch.compile(optimizer.step) if compile_what == "model+optimizer" \
        else optimizer.step
    cross_entropy = torch.nn.functional.cross_entropy

    def run():
        for x, y in batches():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = cross_entropy(forward(x), y)
            loss.backward()
            optimizer_step()
    return run


def _torch_info(torch, optimizer, compile_what: str | None) -> dict:
    from torch.optim.optimizer import _default_to_fused_or_foreach
    group = optimizer.param_groups[0]
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused is None and foreach is None:  # what torch resolves "no flag" to for these tensors
        fused, foreach = _default_to_fused_or_foreach(group["params"], False, False)
    implementation = "fused" if fused else "foreach" if foreach else "for-loop (single tensor)"
    return {"optimizer": type(optimizer).__name__, "implementation": implementation,
            "compiled": compile_what or "no (eager)", "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _synthetic_batches(args):
    from npcpu.data.synthetic import SyntheticClassification
    data = SyntheticClassification(100_000, wl.MLP52M_WIDTHS[0], wl.MLP52M_WIDTHS[-1], seed=0)
    rng = np.random.default_rng(0)
    return lambda: data.batch(rng.integers(0, len(data), wl.BATCH)), wl.BATCH, \
        {"what": "SyntheticClassification(784, 100 classes).batch(128 random indices)"}


@dataclass(frozen=True)
class Config:
    name: str
    library: str  # "npcpu", "torch", "numpy" (a baseline, as torch) or "probe" (compared with none)
    build: Callable


BF16_IN_BACKWARD = "npcpu bf16, Adam in backward"
BF16_WIDENED = "npcpu bf16, GEMMs widened to fp32"
TORCH_BF16_CAST = "torch model cast to bf16, fused Adam"
TORCH_AUTOCAST = "torch autocast bf16, fused Adam"
NPCPU_LOGREG_ADAM = "npcpu uint8 pixels, Adam, Trainer.fit"
TORCH_LOGREG_ADAM = "torch eager, default Adam"
CONFIGS = {
    "mlp52m": [
        Config("npcpu fp32", "npcpu", _npcpu_mlp52m("fp32")),
        Config("npcpu bf16", "npcpu", _npcpu_mlp52m("bf16")),
        Config(BF16_IN_BACKWARD, "npcpu", _npcpu_mlp52m("bf16", update_in_backward=True)),
        Config(BF16_WIDENED, "npcpu", _npcpu_mlp52m("bf16", bf16_gemm="widened")),
        Config("torch eager, default Adam", "torch", _torch_mlp52m({})),
        Config("torch eager, fused Adam", "torch", _torch_mlp52m({"fused": True})),
        Config(TORCH_BF16_CAST, "torch", _torch_mlp52m({"fused": True}, bf16="cast")),
        Config(TORCH_AUTOCAST, "torch", _torch_mlp52m({"fused": True}, bf16="autocast")),
        Config("torch.compile model, fused Adam", "torch", _torch_mlp52m({"fused": True}, "model")),
        Config("torch.compile model + Adam step", "torch", _torch_mlp52m({}, "model+optimizer")),
        Config("synthetic data batch", "probe", _synthetic_batches),
    ],
    "logreg-mnist": [
        Config("npcpu layer loop", "npcpu", _npcpu_logreg_loop),
        Config("npcpu Trainer.fit", "npcpu", _npcpu_logreg_trainer(pixels=False)),
        Config("npcpu uint8 pixels, Trainer.fit", "npcpu", _npcpu_logreg_trainer(pixels=True)),
        Config("npcpu bf16, Trainer.fit", "npcpu",
               _npcpu_logreg_trainer(pixels=False, precision="bf16")),
        Config("npcpu CompiledClassifierStep", "npcpu", _npcpu_logreg_compiled),
        Config("naive NumPy", "numpy", _numpy_logreg_loop),
        Config("torch eager, default SGD", "torch", _torch_logreg({})),
        Config("torch eager, fused SGD", "torch", _torch_logreg({"fused": True})),
        Config("torch.compile model", "torch", _torch_logreg({}, "model")),
        Config("torch.compile model + SGD step", "torch", _torch_logreg({}, "model+optimizer")),
        Config(NPCPU_LOGREG_ADAM, "npcpu", _npcpu_logreg_trainer(pixels=True, adam=True)),
        Config(TORCH_LOGREG_ADAM, "torch", _torch_logreg({}, adam=True)),
    ],
}
# The torch configuration each npcpu configuration's ratio is headlined against (all pairs are in
# the JSON): the best CPU setting a user would pick for mlp52m, the plain one for logreg-mnist.
REFERENCE = {"mlp52m": "torch eager, fused Adam", "logreg-mnist": "torch eager, default SGD"}
ROOFLINE = "roofline"
# (warm-up, timed) units per child process: full run, --quick
STEPS = {"mlp52m": ((2, 5), (1, 2)), "logreg-mnist": ((2, 10), (1, 3))}
ROUNDS = (5, 1)


# -- the child process ----------------------------------------------------------------------------
def run_child(args) -> dict:
    """Build one configuration, warm it up, time it; everything a round needs, as a dict.

    Only npcpu configurations import npcpu (torch ones set torch's thread count themselves).
    """
    config = None if args.config == ROOFLINE else \
        next(c for c in CONFIGS[args.workload] if c.name == args.config)
    if config is None or config.library != "torch":
        from npcpu import backend
        backend.set_threads(args.threads)
    if config is None:
        import roofline
        return {"roofline": roofline.mlp52m_roofline(args.repeats)}
    baseline_mb = peak_rss_mb()
    step, samples, info = config.build(args)
    first_call_s = None
    for i in range(args.warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            first_call_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "samples_per_step": samples, "first_call_s": first_call_s,
            "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": baseline_mb, "info": info}


# -- the parent: rounds of child processes, summaries, ratios, targets ----------------------------
def _spawn(args, workload: str, config: str, warmup: int, steps: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", config,
               "--workload", workload, "--threads", str(args.threads), "--warmup", str(warmup),
               "--steps", str(steps), "--samples", str(args.samples), "--repeats", str(args.repeats),
               "--inputs", str(args.inputs)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s (--timeout)"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit code {done.returncode}: " + " | ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def _summarize(runs: list[dict]) -> dict:
    seconds = [s for run in runs for s in run["seconds"]]
    samples = runs[0]["samples_per_step"]
    median = statistics.median(seconds)
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds),
            "round_medians_ms": [1e3 * statistics.median(run["seconds"]) for run in runs],
            "timed_steps": len(seconds), "samples_per_step": samples,
            "samples_per_s": samples / median,
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "rss_after_imports_mb": max(run["rss_after_imports_mb"] for run in runs),
            "first_call_s": statistics.median(run["first_call_s"] for run in runs),
            "info": runs[0]["info"]}


def _ratios(results: dict, configs: list[Config]) -> dict:
    """samples/s of each npcpu configuration / that of each torch and NumPy configuration (> 1:
    npcpu faster)."""
    ok = {name for name, r in results.items() if "median_ms" in r}
    npcpu = [c.name for c in configs if c.library == "npcpu" and c.name in ok]
    baselines = [c.name for c in configs if c.library in ("torch", "numpy") and c.name in ok]
    return {a: {b: results[b]["median_ms"] / results[a]["median_ms"] for b in baselines}
            for a in npcpu}


def _target(description: str, value: float | None, bound: float, at_least: bool) -> dict:
    if value is None:
        return {"target": description, "value": None, "met": None, "note": "not measured"}
    met = value >= bound if at_least else value <= bound
    # how far from the bound, as a factor: 1.0 means exactly on it, < 1 means missed
    margin = value / bound if at_least else bound / value
    return {"target": description, "value": value, "bound": bound, "met": met, "margin": margin}


def _targets(report: dict) -> list[dict]:
    targets = []
    mlp = report.get("mlp52m")
    if mlp is not None:
        res, ratios = mlp["results"], mlp["ratios"]
        fp32 = res.get("npcpu fp32", {})
        targets.append(_target("mlp52m npcpu fp32 samples/s >= 1.3x torch fused Adam",
                               ratios.get("npcpu fp32", {}).get("torch eager, fused Adam"), 1.3, True))
        roof = mlp.get("roofline")
        step_ms = fp32.get("median_ms")
        targets.append(_target("mlp52m npcpu fp32 step <= 1.25x roofline (GEMMs + Adam fp32 bytes)",
                               step_ms / roof["roofline_ms"]["fp32"] if roof and step_ms else None,
                               1.25, False))
        torch_rss = res.get("torch eager, fused Adam", {}).get("peak_rss_mb")
        for name in ("npcpu bf16", BF16_IN_BACKWARD):
            bf16_rss = res.get(name, {}).get("peak_rss_mb")
            targets.append(_target(f"mlp52m {name} peak RSS <= 0.5x torch fused Adam's",
                                   bf16_rss / torch_rss if bf16_rss and torch_rss else None, 0.5,
                                   False))
        bf16 = ratios.get("npcpu bf16", {})
        targets.append(_target(f"mlp52m npcpu bf16 samples/s >= 1.0x {TORCH_BF16_CAST}",
                               bf16.get(TORCH_BF16_CAST), 1.0, True))
        targets.append(_target(f"mlp52m npcpu bf16 samples/s >= 1.3x {TORCH_AUTOCAST}",
                               bf16.get(TORCH_AUTOCAST), 1.3, True))
        data_ms = res.get("synthetic data batch", {}).get("median_ms")
        targets.append(_target("synthetic batch of 128 >= 10x faster than an mlp52m fp32 step",
                               step_ms / data_ms if step_ms and data_ms else None, 10.0, True))
    logreg = report.get("logreg-mnist")
    if logreg is not None:
        for name, versus in logreg["ratios"].items():
            if name == NPCPU_LOGREG_ADAM:  # issue 15's targets are SGD's; Adam is compared with
                if TORCH_LOGREG_ADAM in versus:  # torch's Adam, at the ratio torch SGD is targeted
                    targets.append(_target(f"logreg-mnist {name}: >= 5x {TORCH_LOGREG_ADAM}",
                                           versus[TORCH_LOGREG_ADAM], 5.0, True))
                continue
            if name == "npcpu layer loop":  # issue 15: the loop a user writes
                if "naive NumPy" in versus:  # a baseline, not a candidate: targeted when it ran
                    targets.append(_target(f"logreg-mnist {name}: >= 1.5x naive NumPy",
                                           versus["naive NumPy"], 1.5, True))
                targets.append(_target(f"logreg-mnist {name}: >= 2x torch eager default SGD",
                                       versus.get("torch eager, default SGD"), 2.0, True))
                continue
            epoch_ms = logreg["results"][name]["median_ms"]  # the 17 ms target is Trainer.fit's
            samples = logreg["results"][name]["samples_per_step"]
            note = "" if samples == wl.LOGREG_SAMPLES else f" (only {samples} samples: --samples)"
            targets.append(_target(f"logreg-mnist {name}: one epoch <= 17 ms{note}", epoch_ms, 17.0,
                                   False))
            targets.append(_target(f"logreg-mnist {name}: >= 5x torch eager default SGD",
                                   versus.get("torch eager, default SGD"), 5.0, True))
    return targets


def _combined_roofline(runs: list[dict]) -> dict:
    """Across rounds: the fastest time of each GEMM and the best bandwidth (a lower bound)."""
    import roofline
    gemms = [min(rows, key=lambda r: r["ms"]) for rows in zip(*(run["roofline"]["gemms"] for run in runs))]
    bandwidth = max((run["roofline"]["bandwidth"] for run in runs), key=lambda b: b["best_gb_s"])
    return roofline.summarize(gemms, bandwidth)


def _selected(args, config: Config) -> bool:
    return args.configs is None or any(part in config.name for part in args.configs)


def run_parent(args) -> dict:
    quick = 1 if args.quick else 0
    rounds = args.rounds or ROUNDS[quick]
    workloads = list(CONFIGS) if args.workload == "all" else [args.workload]
    plan = [(w, c.name) for w in workloads for c in CONFIGS[w] if _selected(args, c)]
    if "mlp52m" in workloads:
        plan.append(("mlp52m", ROOFLINE))
    runs = {item: [] for item in plan}
    errors = {}
    wl.save_torch_inputs(args.inputs, workloads)
    for round_index in range(rounds):
        for workload, name in plan:
            if (workload, name) in errors:
                continue  # a configuration that failed once is not retried
            warmup, steps = STEPS[workload][quick]
            result = _spawn(args, workload, name, warmup, steps)
            if "error" in result:
                errors[workload, name] = result["error"]
                print(f"round {round_index + 1}/{rounds} {workload} {name}: {result['error']}",
                      file=sys.stderr)
                continue
            runs[workload, name].append(result)
            if name != ROOFLINE:
                print(f"round {round_index + 1}/{rounds} {workload} {name}: "
                      f"{1e3 * statistics.median(result['seconds']):.1f} ms, "
                      f"peak {result['peak_rss_mb']:.0f} MB", file=sys.stderr)

    report = {}
    for workload in workloads:
        configs = [c for c in CONFIGS[workload] if _selected(args, c)]
        results = {}
        for c in configs:
            if (workload, c.name) in errors:
                results[c.name] = {"error": errors[workload, c.name], "library": c.library}
            else:
                results[c.name] = {"library": c.library, **_summarize(runs[workload, c.name])}
        report[workload] = {"results": results, "ratios": _ratios(results, configs),
                            "reference": REFERENCE[workload]}
    if "mlp52m" in workloads:
        roof_runs = runs["mlp52m", ROOFLINE]
        report["mlp52m"]["roofline"] = _combined_roofline(roof_runs) if roof_runs else None
        if ("mlp52m", ROOFLINE) in errors:
            report["mlp52m"]["roofline_error"] = errors["mlp52m", ROOFLINE]
    return {"threads": args.threads, "rounds": rounds, "quick": args.quick,
            "logreg_samples": args.samples, "note": args.note, "workloads": report,
            "targets": _targets(report)}


# -- output ---------------------------------------------------------------------------------------
def print_report(record: dict) -> None:
    print(f"threads {record['threads']}, {record['rounds']} round(s), one process per "
          f"configuration per round" + (f"; note: {record['note']}" if record["note"] else ""))
    for workload, part in record["workloads"].items():
        reference = part["reference"]
        unit = "epoch" if workload == "logreg-mnist" else "step"
        rows = []
        for name, r in part["results"].items():
            if "error" in r:
                rows.append([name, "failed", "", "", "", "", r["error"][:120]])
                continue
            versus = part["ratios"].get(name, {}).get(reference)
            rows.append([name, r["median_ms"], f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
                         f"{r['samples_per_s']:,.0f}", f"{r['peak_rss_mb']:.0f}",
                         f"{r['first_call_s']:.2f}", f"{versus:.2f}x" if versus else ""])
        print(f"\n{workload}: median ms per {unit} over all rounds")
        print(markdown_table(["configuration", f"median ms/{unit}", "min-max ms", "samples/s",
                              "peak RSS MB", "first call s", f"npcpu/torch vs {reference}"], rows))
        roof = part.get("roofline")
        if roof:
            fp32 = part["results"].get("npcpu fp32", {}).get("median_ms")
            multiple = f"; npcpu fp32 step = {fp32 / roof['roofline_ms']['fp32']:.2f}x roofline" \
                if fp32 else ""
            print(f"\nroofline: GEMMs {roof['gemm_ms']:.1f} ms ({roof['gemm_gflop_s']:.0f} GFLOP/s) + "
                  f"Adam fp32 {roof['optimizer_ms']['fp32']:.1f} ms at "
                  f"{roof['bandwidth']['best_gb_s']:.1f} GB/s = {roof['roofline_ms']['fp32']:.1f} ms"
                  f" (bf16 states: {roof['roofline_ms']['bf16']:.1f} ms){multiple}")
    rows = [[t["target"], "" if t["value"] is None else f"{t['value']:.3g}",
             {True: "met", False: "MISSED", None: "n/a"}[t["met"]],
             "" if t.get("margin") is None else f"{t['margin']:.2f}"] for t in record["targets"]]
    print("\ntargets (margin: measured against the bound, < 1 = missed by that factor)")
    print(markdown_table(["target", "measured", "status", "margin"], rows))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of all configurations (default {ROUNDS[0]}, --quick {ROUNDS[1]})")
    parser.add_argument("--threads", type=int, default=2, help="BLAS, Numba and torch threads")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round, fewer steps")
    parser.add_argument("--samples", type=int, default=wl.LOGREG_SAMPLES,
                        help="logreg-mnist samples per epoch (fewer: a smoke test)")
    parser.add_argument("--configs", action="append", default=None, metavar="SUBSTRING",
                        help="only the configurations whose name contains this (may be repeated)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each roofline GEMM")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a child process may take (torch.compile compiles in it)")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file to write (default bench/results/bench_train.json for a full "
                             "run, bench_train-partial.json for --workload/--configs/--quick/"
                             "--samples runs, so that they never replace the full results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "threads", "samples", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        args.config = args.child
        print(json.dumps(run_child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="npcpu-bench-") as inputs:
        args.inputs = Path(inputs)
        record = run_parent(args)
    print_report(record)
    full = args.workload == "all" and not args.configs and not args.quick \
        and args.samples == wl.LOGREG_SAMPLES
    path = write_json("bench_train" if full else "bench_train-partial", record, path=args.output)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
