"""One training run measured for the memory-estimate test (not collected by pytest).

    python tests/measure_memory.py {mlp,gpt}

Prints JSON: the run's memory estimate (npcpu.train.memory) and the memory its fit() added at
peak (the high-water mark of the resident set, reset before fit, minus the resident set then).
A one-step run of the same configuration goes first, so that the kernels Numba loads from its
cache are not counted as the run's.
"""

import gc
import json
import sys

from npcpu import backend
from npcpu.config import build_config
from npcpu.train import memory
from npcpu.train.build import build_run

CONFIGS = {
    "mlp": {"model": {"hidden": [1024, 1024], "dropout": 0.1},
            "data": {"train_size": 4096, "eval_size": 64, "input_dim": 512, "num_classes": 10},
            "optim": {"name": "adamw", "lookahead": False},
            "train": {"batch_size": 1024, "accumulation_steps": 1, "precision": "fp32",
                      "clip_grad_norm": None, "compiled": "off"}},
    "gpt": {"model": {"kind": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128,
                      "dropout": 0.1},
            "data": {"kind": "synthetic_text", "vocab_size": 64, "train_size": 40000,
                     "eval_size": 16},
            "optim": {"name": "adamw", "lookahead": False},
            "train": {"batch_size": 16, "accumulation_steps": 1, "precision": "fp32"}},
}


def status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def run(system: str, steps: int):
    config = build_config(overrides={**CONFIGS[system], "train": {
        **CONFIGS[system]["train"], "epochs": None, "max_steps": steps, "eval_every": None,
        "checkpoint_every": None, "log_every": 1000}, "freeze": {"enabled": False}})
    return build_run(config)


def main():
    system = sys.argv[1]
    backend.set_threads(1)
    warm = run(system, 1)
    warm.trainer.fit(warm.train_data, max_steps=1, batch_size=warm.config["train"]["batch_size"],
                     progress=False)
    del warm
    gc.collect()
    measured = run(system, 3)
    trainer = measured.trainer
    loader = trainer.make_loader(measured.train_data, measured.config["train"]["batch_size"])
    estimate = memory.estimate_memory(trainer, loader)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = status("VmRSS")
    trainer.fit(measured.train_data, max_steps=3, batch_size=measured.config["train"]["batch_size"],
                progress=False)
    print(json.dumps({"parameters": estimate.parameters, "gradients": estimate.gradients,
                      "optimizer": estimate.optimizer, "activations": estimate.activations,
                      "added_at_peak": status("VmHWM") - before}))


if __name__ == "__main__":
    main()
