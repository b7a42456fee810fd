"""gpt-small: a GPT training step and generation, npcpu against torch (nanoGPT's architecture).

    python bench/bench_gpt.py                  # the full run (about 10 minutes on 2 cores)
    python bench/bench_gpt.py --quick          # tiny sizes, one round: the smoke test's run

Workload gpt-small (the LLM-trainer guide's cpu_small_model): vocab 32000, n_embd 256, 4 heads,
4 layers, block 512, batch 2, tied head, bias, dropout 0, AdamW (lr 8e-4, betas (0.9, 0.95),
weight decay 0.1 on matrices). A step is zero_grad, forward, cross-entropy, backward, AdamW.

    npcpu fp32     GPT, CrossEntropyLoss(in_place=True), AdamW
    npcpu bf16     the same with bf16 parameters, saved activations and AdamW moments
    torch fp32     bench/nanogpt_torch.py (F.scaled_dot_product_attention(is_causal=True)),
                   AdamW(fused=True)
    torch bf16     the same model cast to bfloat16, AdamW(fused=True)

Each configuration runs in a process of its own (its peak RSS is its own), the configurations
alternate within each round, and the table gives medians with min-max over all timed steps. The
npcpu children also time each phase of extra steps (attention, the blocks' Linear layers, head +
cross-entropy, AdamW, the rest) and the step's GEMM FLOPs against the fastest GEMM of the head's
shape alone (the roofline). Generation: tokens/s of npcpu's generate (KV cache) against nanoGPT's
generate in torch (no cache), fp32, batch 1. Results: bench/results/bench_gpt.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import markdown_table, peak_rss_mb, summarize, write_json

SIZES = {  # (model shape, batch, generation: prompt length, new tokens)
    "gpt-small": (dict(vocab_size=32000, block_size=512, n_layer=4, n_head=4, n_embd=256), 2,
                  (32, 128)),
    "tiny": (dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32), 2, (4, 8)),
}
CONFIGS = ("npcpu fp32", "npcpu bf16", "torch fp32", "torch bf16")
TARGETS = [  # (npcpu, torch, at least this speed-up / at most this fraction of peak RSS)
    ("npcpu fp32", "torch fp32", 1.3, 0.8),
    ("npcpu bf16", "torch bf16", 1.0, 0.8),
]
LR, BETAS, WEIGHT_DECAY = 8e-4, (0.9, 0.95), 0.1


# -- the child: one configuration ----------------------------------------------------------------
def _batch(shape: dict, batch: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], (batch, shape["block_size"] + 1))
    return tokens[:, :-1], tokens[:, 1:]


def _npcpu_step(shape: dict, batch: int, precision: str):
    from npcpu.models import GPT, GPTConfig
    from npcpu.nn import CrossEntropyLoss
    from npcpu.optim import AdamW

    model = GPT(GPTConfig(**shape)).set_precision(precision)
    optimizer = AdamW(model.optimizer_groups(WEIGHT_DECAY), lr=LR, betas=BETAS,
                      state_dtype="bf16" if precision == "bf16" else "fp32")
    loss_fn = CrossEntropyLoss(in_place=True)
    x, y = _batch(shape, batch)

    def step():
        model.zero_grad()
        loss = loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        optimizer.step()
        return loss
    return step, model, optimizer, loss_fn


def _torch_model(torch, shape: dict, dtype):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nanogpt_torch
    model = nanogpt_torch.build(torch)["GPT"](**shape)
    return model.to(dtype)


def _torch_step(shape: dict, batch: int, dtype_name: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    model = _torch_model(torch, shape, getattr(torch, dtype_name))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, fused=True)
    x, y = (torch.from_numpy(a) for a in _batch(shape, batch))

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def _timed(totals: collections.Counter, phase: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - start
    return wrapper


def _profile(step, model, optimizer, loss_fn, steps: int) -> dict:
    """Per-phase milliseconds (medians over `steps` steps): wrappers around the attention core,
    every Linear of the blocks, the head and the loss, and the optimizer; 'rest' is the remainder."""
    from npcpu.nn import attention, linear
    totals: collections.Counter = collections.Counter()
    head = model.lm_head
    patched = []

    def patch(owner, name, phase_of):
        original = getattr(owner, name)
        patched.append((owner, name, original))

        def wrapper(*args, **kwargs):
            return _timed(totals, phase_of(args), original)(*args, **kwargs)
        setattr(owner, name, wrapper)

    for name in ("attention_forward", "attention_backward",  # the fused float32 pass
                 "attention_scores", "weighted_values", "attention_gradients"):  # batched GEMMs
        patch(attention, name, lambda args: "attention")
    for name in ("forward", "backward"):
        patch(linear.Linear, name,
              lambda args: "head + cross-entropy" if args[0] is head else "block Linear GEMMs")
    patch(type(loss_fn), "forward", lambda args: "head + cross-entropy")
    patch(type(optimizer), "step", lambda args: "AdamW")
    per_step = collections.defaultdict(list)
    try:
        for _ in range(steps):
            totals.clear()
            start = time.perf_counter()
            step()
            total = time.perf_counter() - start
            for phase, seconds in totals.items():
                per_step[phase].append(1e3 * seconds)
            per_step["rest"].append(1e3 * (total - sum(totals.values())))
            per_step["step"].append(1e3 * total)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return {phase: statistics.median(ms) for phase, ms in per_step.items()}


def _roofline(shape: dict, batch: int) -> dict:
    """The step's GEMM FLOPs and their time at the speed of the head's forward GEMM alone."""
    from npcpu import blas
    rows, channels = batch * shape["block_size"], shape["n_embd"]
    steps, vocab, layers = shape["block_size"], shape["vocab_size"], shape["n_layer"]
    flops = (3 * 2 * rows * 12 * channels * channels * layers  # the Linears: forward, dx, dW
             + 6 * 2 * batch * steps * steps * channels * layers  # attention: 2 GEMMs + 4 back
             + 3 * 2 * rows * channels * vocab)  # the head
    x = np.random.default_rng(0).standard_normal((rows, channels), dtype=np.float32)
    weight = np.random.default_rng(1).standard_normal((vocab, channels), dtype=np.float32)
    best = min(_seconds(lambda: blas.matmul_weight_transposed(x, weight)) for _ in range(5))
    speed = 2 * rows * channels * vocab / best
    return {"gemm_gflop_per_step": flops / 1e9, "head_gemm_gflops": speed / 1e9,
            "gemm_ms_at_that_speed": 1e3 * flops / speed}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _generation(library: str, shape: dict, prompt: int, new_tokens: int, threads: int) -> float:
    """Tokens per second of generating `new_tokens` after a `prompt`-token prompt, batch 1."""
    idx = np.random.default_rng(2).integers(0, shape["vocab_size"], (1, prompt))
    if library == "npcpu":
        from npcpu.models import GPT, GPTConfig
        model = GPT(GPTConfig(**shape))
        model.generate(idx, 2, temperature=0.8, top_k=200, seed=0)  # compile the kernels
        seconds = _seconds(lambda: model.generate(idx, new_tokens, temperature=0.8, top_k=200,
                                                  seed=0))
    else:
        import torch
        torch.set_num_threads(threads)
        model = _torch_model(torch, shape, torch.float32).eval()
        start = torch.from_numpy(idx)
        model.generate(start, 2, temperature=0.8, top_k=200)
        seconds = _seconds(lambda: model.generate(start, new_tokens, temperature=0.8, top_k=200))
    return new_tokens / seconds


def run_child(args) -> dict:
    shape, batch, (prompt, new_tokens) = SIZES[args.size]
    library, precision = args.config.split()
    if library == "npcpu":
        from npcpu import backend
        backend.set_threads(args.threads)
    if args.mode == "generate":
        return {"tokens_per_s": _generation(library, shape, prompt, new_tokens, args.threads),
                "prompt": prompt, "new_tokens": new_tokens}
    if library == "npcpu":
        step, model, optimizer, loss_fn = _npcpu_step(shape, batch, precision)
    else:
        step = _torch_step(shape, batch, {"fp32": "float32", "bf16": "bfloat16"}[precision],
                           args.threads)
    for _ in range(args.warmup):
        step()
    seconds = [_seconds(step) for _ in range(args.steps)]
    result = {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "loss": float(step())}
    if library == "npcpu" and args.profile_steps:
        result["phases_ms"] = _profile(step, model, optimizer, loss_fn, args.profile_steps)
        result["roofline"] = _roofline(shape, batch)
    return result


# -- the parent: alternating rounds of child processes -------------------------------------------
def _spawn(args, config: str, mode: str, profile_steps: int = 0) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--mode", mode,
               "--size", args.size, "--threads", str(args.threads), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--profile-steps", str(profile_steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_parent(args) -> dict:
    runs = {config: [] for config in args.configs}
    for round_index in range(args.rounds):
        order = args.configs[round_index % len(args.configs):] + \
            args.configs[:round_index % len(args.configs)]
        for config in order:
            profile = args.profile_steps if round_index == 0 and config.startswith("npcpu") else 0
            runs[config].append(_spawn(args, config, "train", profile))
    results = {}
    for config, config_runs in runs.items():
        errors = [r["error"] for r in config_runs if "error" in r]
        if errors:
            results[config] = {"error": errors[0]}
            continue
        seconds = [s for r in config_runs for s in r["seconds"]]
        _, batch, _ = SIZES[args.size]
        tokens = batch * SIZES[args.size][0]["block_size"]
        results[config] = {**summarize(seconds),
                           "tokens_per_s": tokens / statistics.median(seconds),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in config_runs),
                           "loss": config_runs[-1]["loss"],
                           **{k: config_runs[0][k] for k in ("phases_ms", "roofline")
                              if k in config_runs[0]}}
    generation = {}
    for library in ("npcpu", "torch"):
        config = f"{library} fp32"
        generation[f"{library} fp32" + (" (KV cache)" if library == "npcpu" else " (no cache)")] = \
            _spawn(args, config, "generate")
    return {"size": args.size, "model": SIZES[args.size][0], "batch": SIZES[args.size][1],
            "threads": args.threads, "rounds": args.rounds, "results": results,
            "generation": generation, "targets": _targets(results)}


def _targets(results: dict) -> list[dict]:
    targets = []
    for ours, theirs, speedup, memory in TARGETS:
        if ours not in results or theirs not in results or "error" in results[ours] \
                or "error" in results[theirs]:
            continue
        ratio = results[theirs]["median_ms"] / results[ours]["median_ms"]
        rss = results[ours]["peak_rss_mb"] / results[theirs]["peak_rss_mb"]
        targets.append({"what": f"{ours} speed vs {theirs}", "value": ratio, "bound": speedup,
                        "met": bool(ratio >= speedup)})
        targets.append({"what": f"{ours} peak RSS / {theirs}'s", "value": rss, "bound": memory,
                        "met": bool(rss <= memory)})
    return targets


def print_report(record: dict) -> None:
    rows = []
    for config, r in record["results"].items():
        if "error" in r:
            rows.append([config, r["error"], "", "", ""])
            continue
        rows.append([config, r["median_ms"], f"{r['min_ms']:.0f}-{r['max_ms']:.0f}",
                     r["tokens_per_s"], r["peak_rss_mb"]])
    print(f"{record['size']}: {record['model']}, batch {record['batch']}, "
          f"{record['threads']} threads, {record['rounds']} rounds")
    print(markdown_table(["configuration", "median ms/step", "min-max", "tokens/s", "peak RSS MB"],
                         rows))
    for config, r in record["results"].items():
        if "phases_ms" in r:
            print(f"\n{config}, per phase (median ms):")
            print(markdown_table(["phase", "ms"], [[k, v] for k, v in r["phases_ms"].items()]))
            roof = r["roofline"]
            print(f"GEMMs: {roof['gemm_gflop_per_step']:.1f} GFLOP/step; at the head GEMM's "
                  f"{roof['head_gemm_gflops']:.0f} GFLOP/s alone that is "
                  f"{roof['gemm_ms_at_that_speed']:.0f} ms")
    print("\ngeneration:")
    print(markdown_table(["configuration", "tokens/s"],
                         [[k, v.get("tokens_per_s", v.get("error"))]
                          for k, v in record["generation"].items()]))
    print("\ntargets:")
    print(markdown_table(["target", "value", "bound", "met"],
                         [[t["what"], t["value"], t["bound"], t["met"]] for t in record["targets"]]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, 1+2 steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt-small")
    parser.add_argument("--configs", action="append", choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("train", "generate"), default="train",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.configs = args.configs or list(CONFIGS)
    if args.quick:
        args.size, args.rounds, args.warmup, args.steps, args.profile_steps = "tiny", 1, 1, 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        args.config = args.child
        print(json.dumps(run_child(args)))
        return
    record = run_parent(args)
    print_report(record)
    name = "bench_gpt-quick" if args.quick else "bench_gpt"  # a quick run never replaces the full
    path = write_json(name, record, args.output)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
