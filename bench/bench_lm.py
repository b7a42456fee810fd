"""Language-model training: nanoGPT's CPU run with --preset gpt-char against torch, and the
Trainer's overhead over the bare gpt-small step.

    python bench/bench_lm.py                 # the full run (2 rounds of 2000 steps each side)
    python bench/bench_lm.py --quick         # 20 steps, 1 round: the smoke test's run

Corpus: the first ~1 MB of the Python standard library's top-level source files (sorted by
name, UTF-8 ones only), a real char-level text every machine has; prepared once with
`npcpu prepare-text --tokenizer char` (90/10 split).

    npcpu gpt-char   `--preset gpt-char` through the Trainer (LanguageModelTrainer): 4 layers,
                     4 heads, n_embd 128, block 64, batch 12, 2000 steps, AdamW lr 1e-3 cosine
                     to 1e-4, warmup 100, betas (0.9, 0.99), weight decay 0.1, clip 1.0, fp32
    torch gpt-char   nanoGPT's train.py loop for the same run: bench/nanogpt_torch.py's model,
                     random windows from the memory-mapped train.bin, its get_lr, AdamW
                     (fused=True, the fastest CPU setting), clip 1.0, zero_grad(set_to_none)
    ... bf16         the same two runs in bfloat16: npcpu with `--train.precision bf16` (bf16
                     storage, the native AVX512_BF16 GEMMs where the CPU has them), torch with
                     torch.autocast("cpu", dtype=torch.bfloat16) around forward and loss (float32
                     parameters and optimizer, as a torch user on a bf16 CPU would run it)

Both train without intermediate evaluations, then evaluate the whole validation split in the
same fixed windows (npcpu.text.dataset.fixed_windows); the table gives training wall time
(median, min-max over rounds, the four rotating within each round), final val loss, and each
npcpu setup's time over the fastest torch setup's. gpt-small: tokens/s of the Trainer
(accumulation 1, no clipping: the same work) against the bare step (zero_grad, forward,
cross-entropy, backward, AdamW), alternating.
Results: bench/results/bench_lm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from common import markdown_table, peak_rss_mb, write_json

CORPUS_BYTES = 1_000_000
THREADS = 2  # the default of --threads
CHAR_CONFIGS = ("npcpu gpt-char", "torch gpt-char", "npcpu gpt-char bf16", "torch gpt-char bf16")


def corpus_files(limit: int = CORPUS_BYTES) -> list[Path]:
    """Top-level standard-library .py files in name order, UTF-8 only, up to `limit` bytes."""
    files, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not data.strip():
            continue
        files.append(path)
        total += len(data)
        if total >= limit:
            break
    return files


def prepare(work: Path) -> Path:
    data_dir = work / "stdlib-char"
    if not (data_dir / "meta.json").is_file():
        from npcpu.text import prepare_text
        prepare_text(corpus_files(), data_dir, tokenizer="char", progress=False)
    return data_dir


# -- children: one configuration each -------------------------------------------------------
def _npcpu_char(data_dir: Path, steps: int, precision: str, threads: int) -> dict:
    from npcpu.config import build_config
    from npcpu.train.build import build_run
    config = build_config(preset="gpt-char", overrides={
        "data": {"path": str(data_dir)},
        "train": {"max_steps": steps, "eval_every": None, "checkpoint_every": None,
                  "log_every": 10**6, "threads": threads, "precision": precision}})
    run = build_run(config, log_stream=open("/dev/null", "w"))
    start = time.perf_counter()
    run.trainer.fit(run.train_data, max_steps=steps, batch_size=config["train"]["batch_size"],
                    progress=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    loss = run.trainer.evaluate(run.eval_data)["eval_loss"]
    return {"train_s": train_s, "eval_s": time.perf_counter() - start, "val_loss": loss}


def _torch_char(data_dir: Path, steps: int, precision: str, threads: int) -> dict:
    """nanoGPT's train.py for its CPU run (no evaluations until the end); precision "bf16" runs
    forward and loss under torch.autocast (bfloat16), as nanoGPT does with dtype = 'bfloat16'."""
    import contextlib
    import math

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nanogpt_torch

    from npcpu.text import TextDataset
    from npcpu.text.dataset import fixed_windows
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    data = TextDataset(data_dir, 64)
    train = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    model = nanogpt_torch.build(torch)["GPT"](vocab_size=data.vocab_size, block_size=block,
                                              n_layer=4, n_head=4, n_embd=128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99), fused=True)

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / max(steps - warmup, 1)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    def get_batch():
        ix = torch.randint(len(train) - block, (batch,))
        x = torch.stack([torch.from_numpy(train[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + block].astype(np.int64))
                         for i in ix])
        return x, y

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    start = time.perf_counter()
    for it in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        x, y = get_batch()
        with autocast():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    model.eval()
    summed, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in fixed_windows(data.val_tokens, block, 64):
            with autocast():
                logits = model(torch.from_numpy(x)).float()
            target = torch.from_numpy(y).view(-1)
            summed += torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), target, ignore_index=-100,
                reduction="sum").item()
            tokens += int((target != -100).sum())
    return {"train_s": train_s, "eval_s": time.perf_counter() - start,
            "val_loss": summed / tokens}


def _gpt_small(data_dir: Path, steps: int, mode: str, threads: int) -> dict:
    """Tokens/s of gpt-small (vocab padded to 32000 over the char data) through the Trainer or
    the bare step on the same batches."""
    from npcpu.config import build_config
    from npcpu.train.build import build_run
    config = build_config(preset="gpt-small", overrides={
        "data": {"path": str(data_dir)},
        "train": {"max_steps": steps + 2, "eval_every": None, "checkpoint_every": None,
                  "accumulation_steps": 1, "clip_grad_norm": None, "log_every": 10**6,
                  "threads": threads}})
    run = build_run(config, log_stream=open("/dev/null", "w"))
    trainer, batch = run.trainer, config["train"]["batch_size"]
    tokens = batch * config["model"]["block_size"]
    if mode == "trainer":
        trainer.fit(run.train_data, max_steps=2, batch_size=batch, progress=False)  # warm-up
        start = time.perf_counter()
        trainer.fit(run.train_data, max_steps=steps + 2, batch_size=batch, progress=False)
    else:
        model, loss_fn, optimizer = trainer.model, trainer.loss_fn, trainer.optimizer
        batches = [run.eval_data.batch(s, batch) for s in range(steps + 2)]

        def step(x, y):
            model.zero_grad()
            loss = loss_fn(model.forward(x), y)
            model.backward(loss_fn.backward())
            optimizer.step()
            return loss
        for x, y in batches[:2]:
            step(x, y)
        start = time.perf_counter()
        for x, y in batches[2:]:
            step(x, y)
    return {"tokens_per_s": steps * tokens / (time.perf_counter() - start)}


def run_child(args) -> dict:
    from npcpu import backend
    backend.set_threads(args.threads)
    data_dir = Path(args.data)
    precision = "bf16" if args.child.endswith(" bf16") else "fp32"
    if args.child.startswith("npcpu gpt-char"):
        result = _npcpu_char(data_dir, args.steps, precision, args.threads)
    elif args.child.startswith("torch gpt-char"):
        result = _torch_char(data_dir, args.steps, precision, args.threads)
    else:
        result = _gpt_small(data_dir, args.small_steps, args.child.split()[-1], args.threads)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def _spawn(args, config: str, data_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", config, "--data", str(data_dir),
               "--steps", str(args.steps), "--small-steps", str(args.small_steps),
               "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--small-steps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/npcpu-bench-lm"))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-small", action="store_true", help="gpt-char only (no gpt-small)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="threads of every setup (1: a comparison that a busy machine "
                        "disturbs less)")
    parser.add_argument("--configs", nargs="+", choices=CHAR_CONFIGS, default=list(CHAR_CONFIGS),
                        help="the gpt-char setups to run (default: all four)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.quick:
        args.rounds, args.steps, args.small_steps = 1, 20, 1
    data_dir = prepare(args.work)
    results: dict = {}
    char_configs = tuple(c for c in CHAR_CONFIGS if c in args.configs)
    groups = [char_configs] + ([] if args.no_small else [("gpt-small trainer", "gpt-small bare")])
    for r in range(args.rounds):
        for group in groups:
            shift = r % len(group)  # each setup in each position once every len(group) rounds
            for config in group[shift:] + group[:shift]:
                results.setdefault(config, []).append(_spawn(args, config, data_dir))
                print(f"round {r + 1}: {config}: {results[config][-1]}", file=sys.stderr)
    meta = json.loads((data_dir / "meta.json").read_text())
    rows, summary = [], {}
    for config in char_configs:
        train = [run["train_s"] for run in results[config]]
        loss = [run["val_loss"] for run in results[config]]
        summary[config] = {"train_s_median": statistics.median(train), "train_s": train,
                           "val_loss": loss, "eval_s": [run["eval_s"] for run in results[config]],
                           "peak_rss_mb": max(run["peak_rss_mb"] for run in results[config])}
        rows.append([config, f"{statistics.median(train):.1f} ({min(train):.1f}-{max(train):.1f})",
                     f"{statistics.median(loss):.4f}", f"{summary[config]['peak_rss_mb']:.0f}"])
    median = {config: summary[config]["train_s_median"] for config in char_configs}
    ratio = (median["npcpu gpt-char"] / median["torch gpt-char"]
             if {"npcpu gpt-char", "torch gpt-char"} <= set(median) else None)
    torches = [c for c in char_configs if c.startswith("torch")]
    fastest_torch = min(torches, key=median.get) if torches else None
    to_fastest = {c: median[c] / median[fastest_torch]
                  for c in char_configs if c.startswith("npcpu") and fastest_torch}
    print(f"corpus: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val chars, vocab "
          f"{meta['vocab_size']}; {args.steps} steps, {args.rounds} rounds, {args.threads} threads")
    print(markdown_table(["gpt-char", "train s median (min-max)", "val loss", "peak RSS MB"],
                         rows))
    if ratio is not None:
        print(f"npcpu / torch wall time (fp32 both): {ratio:.3f}")
    for config, value in to_fastest.items():
        print(f"{config} / fastest torch ({fastest_torch}): {value:.3f} (target <= 0.67)")
    record = {"steps": args.steps, "rounds": args.rounds, "threads": args.threads,
              "corpus": meta, "gpt_char": summary,
              "ratio": ratio, "fastest_torch": fastest_torch, "ratio_to_fastest_torch": to_fastest,
              "runs": results}
    if not args.no_small:
        small = {config: statistics.median(run["tokens_per_s"] for run in results[config])
                 for config in ("gpt-small trainer", "gpt-small bare")}
        overhead = small["gpt-small bare"] / small["gpt-small trainer"] - 1.0
        print(f"gpt-small tokens/s: Trainer {small['gpt-small trainer']:.0f}, bare step "
              f"{small['gpt-small bare']:.0f}: Trainer overhead {100 * overhead:.1f}% "
              f"(target < 5%)")
        record.update(gpt_small=small, trainer_overhead=overhead)
    write_json("bench_lm", record, args.output)


if __name__ == "__main__":
    main()
