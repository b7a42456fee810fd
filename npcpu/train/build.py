"""From a checked configuration (npcpu.config) to a model, data, optimizer and Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npcpu.config import ConfigError, build_config, from_json, merge, to_json, validate
from npcpu.data.digits import load_digits
from npcpu.data.mnist import load_mnist
from npcpu.data.synthetic import SyntheticClassification
from npcpu.models.gpt import GPT, GPTConfig
from npcpu.nn.dropout import Dropout
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.lamb import LAMB
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.lr_scheduler import LambdaLR
from npcpu.optim.schedules import (constant_schedule, warmup_cosine_decay_schedule,
                                   warmup_step_decay_schedule)
from npcpu.optim.sgd import SGD
from npcpu.text import SyntheticText, TextDataset, load_tokenizer
from npcpu.train.callbacks import EarlyStopping
from npcpu.train.freezing import DynamicFreezer
from npcpu.train.lm import LanguageModelBatches, LanguageModelTrainer
from npcpu.train.trainer import Trainer

CONFIG_FILE = "config.json"


@dataclass
class Run:
    """Everything a configuration describes, ready to `fit`."""
    config: dict
    trainer: Trainer
    train_data: object
    eval_data: object
    num_classes: int
    total_steps: int

    def fit(self, run_dir, *, progress: bool | None = None) -> dict:
        train = self.config["train"]
        return self.trainer.fit(
            self.train_data, epochs=train["epochs"], max_steps=train["max_steps"],
            batch_size=train["batch_size"], eval_data=self.eval_data,
            eval_every=train["eval_every"], run_dir=run_dir,
            checkpoint_every=train["checkpoint_every"], keep_last=train["keep_last"],
            log_every=train["log_every"], progress=progress)


def build_data(data: dict):
    """(train set, eval set, input features, classes) for the [data] section."""
    if data["kind"] == "synthetic":
        full = SyntheticClassification(data["train_size"] + data["eval_size"], data["input_dim"],
                                       data["num_classes"], data["seed"],
                                       label_noise=data["label_noise"])
        train = full.subset(0, data["train_size"])
        held_out = full.subset(data["train_size"], data["train_size"] + data["eval_size"])
        return train, held_out, data["input_dim"], data["num_classes"]
    if data["kind"] == "digits":
        train, test = load_digits(seed=data["seed"])
        return train, test, train.input_dim, 10
    train = load_mnist(data["path"], train=True)
    test = load_mnist(data["path"], train=False)
    return train, test, train.input_dim, 10


def build_language_data(data: dict, model: dict, batch_size: int):
    """(training batches, evaluation data set, vocabulary) for data.kind "text" or
    "synthetic_text": a TextDataset of a prepare-text directory (its windows of
    model.block_size positions drawn by (data.seed, step)) or a SyntheticText."""
    if data["kind"] == "text":
        if not data["path"]:  # checked here, not in validate: the text presets name no path
            raise ConfigError("config: data.kind = 'text' needs data.path (a directory made by "
                              "npcpu prepare-text), e.g. --data.path DIR")
        dataset = TextDataset(data["path"], model["block_size"], seed=data["seed"])
        windows = None  # the training split cut into block_size pieces
    else:
        dataset = SyntheticText(data["vocab_size"], model["block_size"], order=data["order"],
                                branching=data["branching"], seed=data["seed"],
                                eval_sequences=data["eval_size"])
        windows = data["train_size"]
    return LanguageModelBatches(dataset, batch_size, windows), dataset, dataset.vocab_size


def build_gpt(model: dict, data_vocab_size: int, seed: int) -> GPT:
    """A GPT of the [model] section; its vocabulary the data's unless model.vocab_size pads it."""
    vocab_size = model["vocab_size"] or data_vocab_size
    if vocab_size < data_vocab_size:
        raise ConfigError(f"config: model.vocab_size {vocab_size} is smaller than the data's "
                          f"vocabulary of {data_vocab_size} token ids")
    return GPT(GPTConfig(vocab_size, model["block_size"], model["n_layer"], model["n_head"],
                         model["n_embd"], model["dropout"], model["bias"]), seed=seed)


def build_model(model: dict, input_dim: int, num_classes: int, seed: int) -> Sequential:
    """A FusedLinearReLU MLP (optional Dropout after each hidden layer) and a Linear head."""
    layers, width = [], input_dim
    for i, hidden in enumerate(model["hidden"]):
        layers.append(FusedLinearReLU(width, hidden, seed=seed + i))
        if model["dropout"] > 0:
            layers.append(Dropout(model["dropout"], seed=seed + 1000 + i))
        width = hidden
    layers.append(Linear(width, num_classes, seed=seed + len(model["hidden"])))
    return Sequential(*layers)


def build_optimizer(optim: dict, model, seed: int, precision: str):
    """The optimizer; biases get no weight decay (and, for LAMB, no trust-ratio adaptation)."""
    state_dtype = optim["state_dtype"]
    if state_dtype == "auto":
        state_dtype = "bf16" if precision == "bf16" else "fp32"
    params = model.parameters()
    weights = [p for p in params if p.data.ndim > 1]
    biases = [p for p in params if p.data.ndim <= 1]
    common = dict(lr=optim["lr"], weight_decay=optim["weight_decay"])
    no_decay = {"params": biases, "weight_decay": 0.0}
    name = optim["name"]
    if name == "sgd":
        optimizer = SGD([{"params": weights}, no_decay], momentum=optim["momentum"],
                        seed=seed, **common)
    elif name in ("adam", "adamw"):
        cls = Adam if name == "adam" else AdamW
        optimizer = cls([{"params": weights}, no_decay], betas=tuple(optim["betas"]),
                        eps=optim["eps"], state_dtype=state_dtype, seed=seed, **common)
    else:
        optimizer = LAMB([{"params": weights}, {**no_decay, "adaptation": False}],
                         betas=tuple(optim["betas"]), eps=optim["eps"],
                         state_dtype=state_dtype, seed=seed, **common)
    if optim["lookahead"]:
        optimizer = Lookahead(optimizer, k=optim["lookahead_k"], alpha=optim["lookahead_alpha"])
    return optimizer


def build_schedule(schedule: dict, total_steps: int):
    """The lr multiplier as a pure function of the step (LambdaLR applies it to the peak lr)."""
    warmup = min(schedule["warmup_steps"], max(total_steps - 1, 0))
    if schedule["name"] == "constant":
        return constant_schedule(1.0)
    if schedule["name"] == "warmup_cosine":
        return warmup_cosine_decay_schedule(1.0 / (warmup + 1), 1.0, warmup,
                                            max(total_steps, warmup + 1),
                                            end_value=schedule["min_lr_ratio"])
    return warmup_step_decay_schedule(1.0 / (warmup + 1), 1.0, warmup,
                                      schedule["decay_steps"], schedule["decay_factor"])


def count_steps(train: dict, train_size: int) -> int:
    """Optimizer steps the [train] section asks for."""
    micro_batches = -(-train_size // train["batch_size"])
    per_epoch = -(-micro_batches // train["accumulation_steps"])
    steps = [s for s in (train["max_steps"],
                         train["epochs"] * per_epoch if train["epochs"] else None) if s]
    return min(steps)


def build_run(config: dict, *, callbacks=(), log_stream=None, world=None) -> Run:
    """The Run of `config`; with a `world` of several processes (npcpu.dist.init_world), or
    `dist.deterministic`, its trainer is npcpu.dist's DataParallelTrainer."""
    train_cfg = config["train"]
    language_model = config["model"]["kind"] == "gpt"
    if language_model:
        monitor = ("eval_loss", "min")
        train_data, eval_data, num_classes = build_language_data(
            config["data"], config["model"], train_cfg["batch_size"])
        model = build_gpt(config["model"], num_classes, train_cfg["seed"])
        train_size = train_data.windows_per_epoch
    else:
        monitor = ("eval_accuracy", "max")
        train_data, eval_data, input_dim, num_classes = build_data(config["data"])
        model = build_model(config["model"], input_dim, num_classes, train_cfg["seed"])
        train_size = len(train_data)
    if train_cfg["early_stopping_patience"] is not None:
        callbacks = [*callbacks, EarlyStopping(*monitor, train_cfg["early_stopping_patience"])]
    optimizer = build_optimizer(config["optim"], model, train_cfg["seed"], train_cfg["precision"])
    total_steps = count_steps(train_cfg, train_size)
    scheduler = LambdaLR(optimizer, build_schedule(config["schedule"], total_steps))
    freeze = config["freeze"]
    freezer = DynamicFreezer(freeze["threshold"], freeze["patience"], freeze["window"],
                             prefix_only=freeze["prefix_only"], relative=freeze["relative"],
                             start_step=freeze["start_step"]) \
        if freeze["enabled"] else None
    dist = config["dist"]
    trainer_class, options = Trainer, {"compiled": train_cfg["compiled"]}
    if world is not None and (world.size > 1 or dist["deterministic"]):
        from npcpu.dist import DataParallelLanguageModelTrainer, DataParallelTrainer
        trainer_class, options = ((DataParallelLanguageModelTrainer, dict(world=world, **dist))
                                  if language_model else
                                  (DataParallelTrainer, dict(world=world, **dist, **options)))
    elif language_model:
        trainer_class, options = LanguageModelTrainer, {}
    loss_fn = CrossEntropyLoss(in_place=True) if language_model else CrossEntropyLoss()
    trainer = trainer_class(model, loss_fn, optimizer, scheduler=scheduler,
                            accumulation_steps=train_cfg["accumulation_steps"],
                            precision=train_cfg["precision"],
                            clip_grad_norm=train_cfg["clip_grad_norm"], freezer=freezer,
                            callbacks=callbacks, seed=train_cfg["seed"],
                            update_in_backward=train_cfg["update_in_backward"],
                            memory_check=train_cfg["memory_check"],
                            on_nonfinite=train_cfg["on_nonfinite"],
                            log_stream=log_stream, **options)
    return Run(config, trainer, train_data, eval_data, num_classes, total_steps)


def bind_tokenizer(run: Run, run_dir, *, new_run: bool) -> None:
    """A text run keeps its tokenizer in RUN_DIR/tokenizer.json: written when the run starts,
    and checked against the data directory's when it is resumed, evaluated or sampled (a data
    directory prepared again with another tokenizer is refused, naming both)."""
    tokenizer = getattr(run.eval_data, "tokenizer", None)
    if tokenizer is None:
        return
    path = Path(run_dir) / "tokenizer.json"
    if new_run:
        tokenizer.save(path)
    elif path.is_file():
        run.eval_data.check_tokenizer(load_tokenizer(path))


def save_run_config(run_dir, config: dict) -> None:
    """Write the run's configuration (JSON) so that `--resume` and `eval` rebuild the same run."""
    from npcpu.checkpoint import ensure_writable
    run_dir = ensure_writable(run_dir)
    path = run_dir / CONFIG_FILE
    if path.exists():
        raise ConfigError(f"{run_dir} already holds a run ({path} exists): use --resume {run_dir} "
                          "to continue it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(config))


def load_run_config(run_dir, overrides: dict | None = None) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an npcpu run directory (no {CONFIG_FILE})")
    config = from_json(path.read_text(), str(path))
    if overrides:
        config = merge(config, overrides, "command line")
        validate(config)
    return config


__all__ = ["Run", "build_config", "build_run", "load_run_config", "save_run_config"]
