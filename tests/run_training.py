"""A training run in its own process, for the resume tests (not collected by pytest).

    python tests/run_training.py RUN_DIR [--resume] [--sleep SECONDS] [--lm]

Trains the small configuration below (bf16, LAMB + Lookahead, dropout, accumulation, warmup +
cosine, freezing) with one thread, logging every step to RUN_DIR/metrics.jsonl and checkpointing
every 4 steps (`--lm`: LM_CONFIG, a small GPT instead). `--sleep` slows each step down so that a
test can kill the process mid-run.
"""

import argparse
import sys
import time

from npcpu import backend
from npcpu.config import build_config
from npcpu.train.build import build_run, save_run_config
from npcpu.train.callbacks import Callback

CONFIG = {
    "model": {"hidden": [48, 32], "dropout": 0.1},
    "data": {"train_size": 1200, "eval_size": 200, "input_dim": 24, "num_classes": 4},
    "schedule": {"warmup_steps": 5},
    "train": {"epochs": None, "max_steps": 40, "batch_size": 32, "accumulation_steps": 2,
              "eval_every": 10, "checkpoint_every": 4, "log_every": 1, "keep_last": 2},
    "freeze": {"threshold": 0.15, "patience": 14, "window": 4, "start_step": 0},
}


# The language-model variant (--lm): a small GPT on SyntheticText, with dropout, bf16 and
# accumulation, so that resume covers the dropout streams and the (seed, step)-addressed batches.
LM_CONFIG = {
    "model": {"kind": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
              "dropout": 0.1},
    "data": {"kind": "synthetic_text", "vocab_size": 12, "train_size": 4000, "eval_size": 16},
    "optim": {"name": "adamw", "lr": 3e-3, "lookahead": False},
    "schedule": {"warmup_steps": 5},
    "train": {"epochs": None, "max_steps": 40, "batch_size": 8, "accumulation_steps": 2,
              "eval_every": 10, "checkpoint_every": 4, "log_every": 1, "keep_last": 2},
    "freeze": {"enabled": False},
}


class Sleep(Callback):
    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, trainer, metrics):
        time.sleep(self.seconds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--lm", action="store_true", help="the language-model configuration")
    args = parser.parse_args()
    backend.set_threads(1)
    config = build_config(overrides=LM_CONFIG if args.lm else CONFIG)
    run = build_run(config, callbacks=[Sleep(args.sleep)] if args.sleep else [])
    if args.resume:
        run.trainer.resume(args.run_dir)
    else:
        save_run_config(args.run_dir, config)
    run.fit(args.run_dir, progress=False)
    return 130 if run.trainer.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
