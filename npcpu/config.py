"""Run configuration: a schema, the embedded presets, TOML files and command-line overrides.

A configuration is a dict of sections ("model", "data", "optim", "schedule", "train", "dist",
"freeze"),
each a dict of fields. Every field is declared once in SCHEMA with its type, default and allowed
range; TOML files and `--section.field VALUE` command-line options are both checked against it
before any work starts, and an error names the bad key.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from npcpu.checks import parse_json


class ConfigError(ValueError):
    """A configuration that cannot be run: unknown key, wrong type, value out of range."""


@dataclass(frozen=True)
class Field:
    type: str                 # "int", "float", "bool", "str", "int_list", "float_list"
    default: Any
    help: str
    choices: tuple = ()
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    optional: bool = False    # None allowed ("none" on the command line, omitted in TOML)


SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "kind": Field("str", "mlp", "model", choices=("mlp", "gpt")),
        "hidden": Field("int_list", [1024, 512, 512], "mlp: hidden layer widths "
                        "(FusedLinearReLU each)", min=1),
        "dropout": Field("float", 0.0, "mlp: dropout after each hidden layer; gpt: every dropout",
                         min=0.0, max=0.99),
        "n_layer": Field("int", 4, "gpt: transformer blocks", min=1),
        "n_head": Field("int", 4, "gpt: attention heads (divide n_embd)", min=1),
        "n_embd": Field("int", 128, "gpt: channels", min=1),
        "block_size": Field("int", 64, "gpt: context length (positions per training window)",
                            min=1),
        "bias": Field("bool", True, "gpt: biases in the Linear layers and LayerNorms"),
        "vocab_size": Field("int", None, "gpt: rows of the token table (default: the data's "
                            "vocabulary; a larger value pads it)", min=2, optional=True),
    },
    "data": {
        "kind": Field("str", "synthetic", "data set", choices=(
            "synthetic", "digits", "mnist", "text", "synthetic_text")),
        "train_size": Field("int", 100_000, "synthetic: training samples; synthetic_text: "
                            "sequences per epoch", min=1),
        "eval_size": Field("int", 10_000, "synthetic: evaluation samples; synthetic_text: "
                           "evaluation sequences", min=1),
        "vocab_size": Field("int", 16, "synthetic_text: tokens of the Markov source", min=2),
        "order": Field("int", 2, "synthetic_text: tokens of context of the Markov source", min=1),
        "branching": Field("int", 4, "synthetic_text: tokens that may follow each context",
                           min=1),
        "input_dim": Field("int", 128, "synthetic: features per sample", min=1),
        "num_classes": Field("int", 10, "synthetic: classes", min=2),
        "label_noise": Field("float", 0.0, "synthetic: fraction of labels replaced at random",
                             min=0.0, max=1.0),
        "seed": Field("int", 0, "data seed (synthetic teacher and samples; digits split)", min=0),
        "path": Field("str", "", "mnist: directory holding the IDX files; text: a prepare-text "
                      "directory"),
    },
    "optim": {
        "name": Field("str", "lamb", "optimizer", choices=("sgd", "adam", "adamw", "lamb")),
        "lr": Field("float", 4e-3, "peak learning rate", min=0.0),
        "weight_decay": Field("float", 0.01, "weight decay (L2 for sgd/adam, decoupled otherwise)",
                              min=0.0),
        "momentum": Field("float", 0.9, "sgd: momentum", min=0.0, max=1.0),
        "betas": Field("float_list", [0.9, 0.999], "adam/adamw/lamb: (beta1, beta2)", min=0.0,
                       max=1.0),
        "eps": Field("float", 1e-6, "adam/adamw/lamb: epsilon", min=0.0),
        "state_dtype": Field("str", "auto", "storage of optimizer moments (auto: bf16 under "
                             "bf16 precision, else fp32)", choices=("auto", "fp32", "bf16")),
        "lookahead": Field("bool", True, "wrap the optimizer in Lookahead"),
        "lookahead_k": Field("int", 5, "Lookahead: fast steps per slow update", min=1),
        "lookahead_alpha": Field("float", 0.5, "Lookahead: slow-weight step size", min=0.0, max=1.0),
    },
    "schedule": {
        "name": Field("str", "warmup_cosine", "learning-rate schedule",
                      choices=("constant", "warmup_cosine", "warmup_exponential")),
        "warmup_steps": Field("int", 100, "linear warmup steps", min=0),
        "min_lr_ratio": Field("float", 0.01, "warmup_cosine: final lr as a fraction of the peak",
                              min=0.0, max=1.0),
        "decay_factor": Field("float", 0.5, "warmup_exponential: factor per decay period",
                              min=0.0, max=1.0),
        "decay_steps": Field("int", 1000, "warmup_exponential: steps per decay period", min=1),
    },
    "train": {
        "epochs": Field("int", 4, "epochs (the run ends at epochs or max_steps, the sooner)",
                        min=1, optional=True),
        "max_steps": Field("int", None, "optimizer steps", min=1, optional=True),
        "batch_size": Field("int", 128, "micro-batch size (the global one: data-parallel ranks "
                            "each take their share of it)", min=1),
        "accumulation_steps": Field("int", 2, "micro-batches per optimizer step", min=1),
        "precision": Field("str", "bf16", "storage precision", choices=("fp32", "bf16", "fp16")),
        "bf16_gemm": Field("str", "auto", "GEMMs under bf16 (auto: native where the CPU has "
                           "AVX512_BF16, else widened to fp32)", choices=("auto", "native", "widened")),
        "clip_grad_norm": Field("float", 1.0, "clip the gradient norm", min=0.0, optional=True),
        "seed": Field("int", 0, "seed for initialization and data order", min=0),
        "eval_every": Field("int", 200, "evaluate every N steps", min=1, optional=True),
        "checkpoint_every": Field("int", 200, "checkpoint every N steps", min=1, optional=True),
        "keep_last": Field("int", 3, "checkpoints kept (plus the best)", min=1),
        "early_stopping_patience": Field("int", None, "stop after N evaluations without a better "
                                         "eval accuracy (gpt: eval loss)", min=1, optional=True),
        "log_every": Field("int", 20, "log every N steps", min=1),
        "threads": Field("int", None, "threads for BLAS and Numba (default: all cores; under "
                         "MPI the node's cores divided by its ranks), per process", min=1,
                         optional=True),
        "compiled": Field("str", "auto", "compiled whole-step path for small SGD classifiers "
                          "(auto: where it applies; on: an error where it does not)",
                          choices=("auto", "on", "off")),
        "update_in_backward": Field("bool", False, "update each parameter inside backward and never "
                                    "hold the whole gradients (less memory; no accumulation, "
                                    "clipping, loss scaling or freezing)"),
        "memory_check": Field("bool", True, "refuse a run whose estimated peak memory exceeds "
                              "the machine's available memory (the estimate is printed either way)"),
        "on_nonfinite": Field("str", "stop", "a non-finite loss or gradient without a loss "
                              "scaler: stop the run naming the layer, or skip the step (counted)",
                              choices=("stop", "skip")),
    },
    "dist": {
        "deterministic": Field("bool", False, "data parallel (mpiexec): add the ranks' gradients "
                               "in a fixed order, bitwise the same run for any number of ranks "
                               "dividing dist.parts (slower)"),
        "parts": Field("int", 12, "deterministic: pieces each global micro-batch is cut into, "
                       "a multiple of the number of ranks", min=1),
        "timeout": Field("float", 60.0, "seconds a rank waits for the others before it fails",
                         min=1.0),
        "bucket_mb": Field("float", 25.0, "size of the gradient buckets reduced at once (MB)",
                           min=0.001),
        "overlap": Field("bool", True, "start each bucket's all-reduce during backward, as soon "
                         "as its gradients are finished (MPI's all-reduce only)"),
        "shard_optimizer": Field("bool", False, "each range of the parameters' optimizer step and "
                                 "state on one rank, the updated parameters broadcast (ZeRO "
                                 "stage 1)"),
        "shared_memory": Field("bool", True, "ranks all on one node sum the gradients (and "
                               "publish sharded parameters) through shared memory, not MPI's "
                               "collectives"),
    },
    "freeze": {
        "enabled": Field("bool", True, "dynamic layer freezing"),
        "threshold": Field("float", 0.45, "gradient-norm threshold", min=0.0),
        "patience": Field("int", 30, "quiet steps before a layer freezes", min=1),
        "window": Field("int", 10, "steps averaged", min=1),
        "prefix_only": Field("bool", True, "freeze only a prefix of the layers"),
        "relative": Field("bool", False, "compare ||g||/||w|| with the threshold"),
        "start_step": Field("int", 600, "no layer freezes before this optimizer step", min=0),
    },
}

PRESETS: dict[str, dict] = {
    # The embedded default: the whole seed system, every feature on.
    "default": {},
    # The mlp52m scale from docs/DESIGN.md: 784-4096-4096-4096-4096-100, batch 128.
    "mlp52m": {
        "model": {"hidden": [4096, 4096, 4096, 4096]},
        "data": {"input_dim": 784, "num_classes": 100, "train_size": 60_000, "eval_size": 5_000},
        "optim": {"lr": 2e-3},
        "train": {"epochs": 1, "accumulation_steps": 1, "eval_every": None,
                  "checkpoint_every": 100, "log_every": 5},
    },
    # The digits set shipped with scikit-learn: a real data set, accuracy matters.
    "digits": {
        "model": {"hidden": [256, 128]},
        "data": {"kind": "digits"},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "eps": 1e-8,
                  "lookahead": False},
        "schedule": {"warmup_steps": 20},
        "train": {"epochs": 60, "batch_size": 64, "accumulation_steps": 1, "precision": "fp32",
                  "eval_every": 500, "checkpoint_every": 500, "log_every": 100},
        "freeze": {"enabled": False},
    },
}


# What every language-model preset shares: AdamW without Lookahead or freezing, fp32, one
# micro-batch per step, a run counted in steps.
_GPT = {
    "model": {"kind": "gpt", "dropout": 0.0},
    "optim": {"name": "adamw", "lookahead": False, "weight_decay": 0.1, "betas": [0.9, 0.95],
              "eps": 1e-8},
    "schedule": {"name": "warmup_cosine", "min_lr_ratio": 0.1},
    "train": {"epochs": None, "accumulation_steps": 1, "precision": "fp32",
              "clip_grad_norm": 1.0},
    "freeze": {"enabled": False},
}


def _gpt_preset(**sections) -> dict:
    """_GPT with each section updated by the given one."""
    return {name: {**_GPT.get(name, {}), **sections.get(name, {})}
            for name in {*_GPT, *sections}}


PRESETS.update({
    # A Markov source of known entropy rate: the loss should reach its floor in well under a minute.
    "gpt-synthetic": _gpt_preset(
        model={"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        data={"kind": "synthetic_text", "vocab_size": 16, "order": 2, "branching": 4,
              "train_size": 100_000, "eval_size": 128},
        optim={"lr": 6e-3, "betas": [0.9, 0.99]},
        schedule={"warmup_steps": 30},
        train={"max_steps": 600, "batch_size": 32, "eval_every": 200, "checkpoint_every": 200,
               "log_every": 50}),
    # nanoGPT's CPU run (shakespeare_char on a laptop): give the prepared text as --data.path.
    "gpt-char": _gpt_preset(
        model={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
        data={"kind": "text"},
        optim={"lr": 1e-3, "betas": [0.9, 0.99]},
        schedule={"warmup_steps": 100},
        train={"max_steps": 2000, "batch_size": 12, "eval_every": 250, "checkpoint_every": 500,
               "log_every": 50}),
    # The LLM-trainer guide's cpu_small_model and cpu_medium_model.
    "gpt-small": _gpt_preset(
        model={"vocab_size": 32000, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512},
        data={"kind": "text"},
        optim={"lr": 8e-4},
        schedule={"warmup_steps": 100},
        train={"max_steps": 2000, "batch_size": 2, "accumulation_steps": 8, "eval_every": 200,
               "checkpoint_every": 200, "log_every": 10}),
    "gpt-medium": _gpt_preset(
        model={"vocab_size": 50000, "n_layer": 12, "n_head": 12, "n_embd": 768,
               "block_size": 1024},
        data={"kind": "text"},
        optim={"lr": 3e-4},
        schedule={"warmup_steps": 200},
        train={"max_steps": 5000, "batch_size": 1, "accumulation_steps": 16, "eval_every": 500,
               "checkpoint_every": 500, "log_every": 10}),
})

LANGUAGE_DATA = ("text", "synthetic_text")


def defaults() -> dict:
    return {section: {name: copy.deepcopy(f.default) for name, f in fields.items()}
            for section, fields in SCHEMA.items()}


def _check_value(key: str, field: Field, value: Any) -> Any:
    """Return `value` checked (and widened: int -> float) against `field`, or raise ConfigError."""
    if value is None:
        if field.optional:
            return None
        raise ConfigError(f"config key {key!r} may not be empty")
    kind = field.type
    if kind in ("int_list", "float_list"):
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"config key {key!r} must be a non-empty list, got {value!r}")
        item = Field(kind.split("_")[0], None, field.help, min=field.min, max=field.max)
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        if field.choices and value not in field.choices:
            raise ConfigError(f"config key {key!r} must be one of {list(field.choices)}, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        value = float(value)
    if field.min is not None and value < field.min:
        raise ConfigError(f"config key {key!r} must be >= {field.min}, got {value!r}")
    if field.max is not None and value > field.max:
        raise ConfigError(f"config key {key!r} must be <= {field.max}, got {value!r}")
    return value


def merge(config: dict, overrides: dict, source: str) -> dict:
    """`config` updated with `overrides` (sections of fields), every key and value checked."""
    merged = copy.deepcopy(config)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(overrides).__name__}")
    for section, fields in overrides.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section {section!r} "
                              f"(sections: {', '.join(SCHEMA)})")
        if not isinstance(fields, dict):
            raise ConfigError(f"{source}: section {section!r} must be a table")
        for name, value in fields.items():
            if name not in SCHEMA[section]:
                raise ConfigError(f"{source}: unknown key {section}.{name} "
                                  f"(keys of [{section}]: {', '.join(SCHEMA[section])})")
            try:
                merged[section][name] = _check_value(f"{section}.{name}", SCHEMA[section][name],
                                                     value)
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from None
    return merged


def parse_cli_value(key: str, text: str) -> Any:
    """A command-line string for `section.field` as the field's type ("none" for empty)."""
    section, name = key.split(".", 1)
    field = SCHEMA[section][name]
    if text.lower() in ("none", "null") and field.optional:
        return None
    try:
        if field.type in ("int_list", "float_list"):
            cast = int if field.type == "int_list" else float
            return [cast(v) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
        if field.type == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if field.type == "int":
            return int(text)
        if field.type == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}: cannot read {text!r} as {field.type}") from None
    return text


def load_toml(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except ValueError as e:  # TOMLDecodeError, not UTF-8, an integer of over 4300 digits
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: TOML nested too deeply to read") from None


def build_config(*, preset: str = "default", files=(), overrides: dict | None = None) -> dict:
    """Defaults, then the preset, then each file (TOML; .yaml / .yml: the LLM-trainer guide's
    format, npcpu.config_yaml), then command-line overrides; all checked."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    config = merge(defaults(), PRESETS[preset], f"preset {preset!r}")
    for path in files:
        if Path(path).suffix.lower() in (".yaml", ".yml"):  # the LLM-trainer guide's format
            from npcpu.config_yaml import load_guide_yaml
            notices: list = []
            config = merge(config, load_guide_yaml(path, notices), str(path))
            for line in notices:
                print(line, file=sys.stderr)
        else:
            config = merge(config, load_toml(path), str(path))
    if overrides:
        config = merge(config, overrides, "command line")
    validate(config)
    return config


def validate(config: dict) -> None:
    """Checks across fields, after every source is merged."""
    train = config["train"]
    if train["epochs"] is None and train["max_steps"] is None:
        raise ConfigError("config: set train.epochs or train.max_steps")
    data, model = config["data"], config["model"]
    if data["kind"] == "mnist" and not data["path"]:
        raise ConfigError("config: data.kind = 'mnist' needs data.path (a directory of IDX files)")
    if (model["kind"] == "gpt") != (data["kind"] in LANGUAGE_DATA):
        raise ConfigError(f"config: model.kind {model['kind']!r} cannot train on data.kind "
                          f"{data['kind']!r}: a gpt takes 'text' (--data.kind text --data.path "
                          f"DIR) or 'synthetic_text', an mlp the others")
    if model["kind"] == "gpt":
        if model["n_embd"] % model["n_head"]:
            raise ConfigError(f"config: model.n_embd ({model['n_embd']}) must be divisible by "
                              f"model.n_head ({model['n_head']})")
        if data["kind"] == "synthetic_text" and data["branching"] > data["vocab_size"]:
            raise ConfigError(f"config: data.branching ({data['branching']}) must be <= "
                              f"data.vocab_size ({data['vocab_size']})")
    betas = config["optim"]["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {betas!r}")
    if config["optim"]["eps"] <= 0:
        raise ConfigError("config key 'optim.eps' must be > 0")
    if config["optim"]["lookahead_alpha"] <= 0:
        raise ConfigError("config key 'optim.lookahead_alpha' must be in (0, 1]")


def to_json(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True)


def from_json(text: str, source: str) -> dict:
    """A configuration saved by a run, checked again (a hand-edited file gets the same checks)."""
    data = parse_json(text, source, ConfigError)
    config = merge(defaults(), data, source)
    validate(config)
    return config
