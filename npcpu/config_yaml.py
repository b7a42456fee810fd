"""The LLM-trainer guide's YAML configurations, read as npcpu configuration sections.

A guide config has three top-level keys:

    model:    {vocab_size, d_model, n_heads, n_layers, max_seq_len, d_ff, dropout,
               gradient_checkpointing}
    training: {batch_size, gradient_accumulation_steps, learning_rate, num_epochs, max_steps,
               warmup_steps, max_grad_norm, weight_decay, logging_steps, eval_steps, save_steps,
               seed, adam_beta1, adam_beta2, adam_epsilon, use_amp, dataloader_pin_memory,
               dataloader_num_workers}
    device:   "cpu"

Each key maps to one npcpu field (GUIDE_KEYS); the whole file selects a GPT trained with AdamW
(matrices decayed), no Lookahead and no freezing. Keys that only mean something on a GPU are
accepted and reported once each as not applying; an unknown key is an error that names it, and
a value of the wrong type is the same error as in a TOML file (npcpu.config.merge checks it). The
data is not part of a guide config: give it with --data.kind / --data.path.
"""

from __future__ import annotations

from pathlib import Path

from npcpu.config import SCHEMA, ConfigError, _check_value

# guide section -> guide key -> (npcpu section, npcpu field)
GUIDE_KEYS = {
    "model": {
        "vocab_size": ("model", "vocab_size"), "d_model": ("model", "n_embd"),
        "n_heads": ("model", "n_head"), "n_layers": ("model", "n_layer"),
        "max_seq_len": ("model", "block_size"), "dropout": ("model", "dropout"),
    },
    "training": {
        "batch_size": ("train", "batch_size"),
        "gradient_accumulation_steps": ("train", "accumulation_steps"),
        "learning_rate": ("optim", "lr"), "num_epochs": ("train", "epochs"),
        "max_steps": ("train", "max_steps"), "warmup_steps": ("schedule", "warmup_steps"),
        "max_grad_norm": ("train", "clip_grad_norm"), "weight_decay": ("optim", "weight_decay"),
        "logging_steps": ("train", "log_every"), "eval_steps": ("train", "eval_every"),
        "save_steps": ("train", "checkpoint_every"), "seed": ("train", "seed"),
        "adam_epsilon": ("optim", "eps"),
    },
}
GPU_ONLY = {"use_amp", "dataloader_pin_memory", "dataloader_num_workers"}
# What a guide config implies beyond its keys.
GUIDE_BASE = {
    "model": {"kind": "gpt"},
    "optim": {"name": "adamw", "lookahead": False},
    "schedule": {"name": "warmup_cosine"},
    "freeze": {"enabled": False},
}


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a YAML config needs PyYAML, an optional extra: "
                          "pip install 'npcpu[yaml]' (or pip install pyyaml)") from None
    return yaml


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(value).__name__}")
    return value


def translate_guide(data, source: str, notices: list) -> dict:
    """npcpu sections for a guide config `data` (the parsed YAML); one line per GPU-only key or
    key npcpu ignores goes to `notices`."""
    data = _mapping(data, source)
    sections = {name: dict(fields) for name, fields in GUIDE_BASE.items()}
    for top, value in data.items():
        if top == "device":
            if value != "cpu":
                raise ConfigError(f"{source}: device {value!r}: npcpu trains on the CPU only "
                                  f"(device: \"cpu\")")
            continue
        if top not in GUIDE_KEYS:
            raise ConfigError(f"{source}: unknown key {top!r} (keys: model, training, device)")
        fields = _mapping(value, f"{source}: {top}")
        for key, item in fields.items():
            where = f"{source}: {top}.{key}"
            if top == "training" and key in GPU_ONLY:
                notices.append(f"{where} does not apply on a CPU; ignored")
            elif top == "training" and key in ("adam_beta1", "adam_beta2"):
                betas = sections.setdefault("optim", {}).setdefault("betas", [0.9, 0.999])
                betas[key == "adam_beta2"] = item
            elif top == "model" and key == "gradient_checkpointing":
                if item:
                    notices.append(f"{where}: npcpu keeps every activation (no recomputation); "
                                   f"ignored")
            elif top == "model" and key == "d_ff":
                d_model = fields.get("d_model")
                if d_model is not None and item != 4 * d_model:
                    raise ConfigError(f"{where} = {item!r}: npcpu's GPT blocks have an MLP of "
                                      f"4 * d_model = {4 * d_model} units")
            elif key in GUIDE_KEYS[top]:
                section, name = GUIDE_KEYS[top][key]
                sections.setdefault(section, {})[name] = _check_value(
                    f"{top}.{key} (npcpu's {section}.{name}) in {source}",
                    SCHEMA[section][name], item)
            else:
                known = sorted({*GUIDE_KEYS[top], *(GPU_ONLY if top == "training" else ()),
                                *(("adam_beta1", "adam_beta2") if top == "training" else
                                  ("d_ff", "gradient_checkpointing"))})
                raise ConfigError(f"{where}: unknown key {key!r} (keys of {top}: "
                                  f"{', '.join(known)})")
    if "epochs" in sections.get("train", {}) and "max_steps" not in sections["train"]:
        sections["train"]["max_steps"] = None  # num_epochs alone decides the length
    return sections


def load_guide_yaml(path, notices: list) -> dict:
    """The npcpu sections of the guide config at `path` (translate_guide)."""
    path = Path(path)
    yaml = _yaml()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: YAML nested too deeply to read") from None
    return translate_guide(data, str(path), notices)
