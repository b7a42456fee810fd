"""Trainer's compiled path (CompiledClassifierStep in chunks) against its reference loop: the same
per-step metrics, callbacks, parameters, counters, errors and checkpoints; and when it applies."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from npcpu.cli import main
from npcpu.config import ConfigError, build_config, parse_cli_value
from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.nn.activations import GELU, Tanh
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR
from npcpu.optim.schedules import warmup_cosine_decay_schedule
from npcpu.optim.sgd import SGD
from npcpu.train.build import build_run
from npcpu.train.callbacks import Callback, EarlyStopping
from npcpu.train.compiled import CompiledClassifierStep
from npcpu.train.freezing import DynamicFreezer
from npcpu.train import runner_compiled
from npcpu.train.trainer import Trainer
from statecheck import assert_same_state

RTOL, ATOL = 1e-5, 1e-6  # float32: the compiled GEMMs sum in another order than BLAS
BATCH = 16
TINY_TOML = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


def make_data(n=203, d=12, classes=5, seed=0):
    """203 samples: batches of 16 leave a short last batch of 11."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return ArrayDataset(x, np.argmax(x @ rng.standard_normal((d, classes)), axis=1))


MODELS = {
    "logreg": lambda: Sequential(Linear(12, 5, seed=0)),
    "mlp": lambda: Sequential(FusedLinearReLU(12, 16, seed=0), FusedLinearReLU(16, 16, seed=1),
                              Linear(16, 5, seed=2)),
    "gelu_tanh": lambda: Sequential(Linear(12, 16, seed=0), GELU(), Linear(16, 16, seed=1), Tanh(),
                                    Linear(16, 5, seed=2)),
}


def sgd_groups(model, lr=0.1, optimizer=SGD, **settings):
    """Weights and biases in two groups (the biases without weight decay), as build.py makes them;
    SGD unless `optimizer` says otherwise."""
    weights = [p for p in model.parameters() if p.data.ndim > 1]
    biases = [p for p in model.parameters() if p.data.ndim == 1]
    return optimizer([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=lr,
                     **settings)


SETUPS = {  # name: (optimizer settings, scheduler or None)
    "plain": (dict(), lambda opt: None),
    "momentum_steplr": (dict(momentum=0.9, weight_decay=1e-2), lambda opt: StepLR(opt, 5, 0.7)),
    "nesterov_warmup_cosine": (dict(momentum=0.8, nesterov=True), lambda opt: LambdaLR(
        opt, warmup_cosine_decay_schedule(0.1, 1.0, 6, 40, 0.01))),
    # cycles the momentum too: the compiled chunks end after every step
    "onecycle_momentum": (dict(momentum=0.9), lambda opt: OneCycleLR(opt, max_lr=0.2, total_steps=60)),
    "adamw_warmup_cosine": (dict(optimizer=AdamW, lr=0.01, weight_decay=0.05), lambda opt: LambdaLR(
        opt, warmup_cosine_decay_schedule(0.1, 1.0, 6, 40, 0.01))),
    "adam_steplr": (dict(optimizer=Adam, lr=0.01, betas=(0.8, 0.99), weight_decay=1e-3),
                    lambda opt: StepLR(opt, 5, 0.7)),
}


class Recorder(Callback):
    """Every hook's arguments, with the trainer's step at the call."""

    def __init__(self):
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step_end(self, trainer, metrics):
        self.steps.append((trainer.step, dict(metrics)))

    def on_eval_end(self, trainer, metrics):
        self.evals.append(dict(metrics))

    def on_checkpoint(self, trainer, path):
        self.checkpoints.append(trainer.step)


def make_trainer(compiled, model_name="mlp", setup="momentum_steplr", *, callbacks=(), **kwargs):
    model = MODELS[model_name]()
    settings, make_scheduler = SETUPS[setup]
    optimizer = sgd_groups(model, **settings)
    return Trainer(model, CrossEntropyLoss(), optimizer, scheduler=make_scheduler(optimizer),
                   callbacks=callbacks, compiled=compiled, log_stream=io.StringIO(), **kwargs)


def fit(compiled, model_name="mlp", setup="momentum_steplr", data=None, **fit_kwargs):
    recorder = Recorder()
    trainer = make_trainer(compiled, model_name, setup, callbacks=[recorder])
    fit_kwargs = {"batch_size": BATCH, "progress": False, **fit_kwargs}
    trainer.fit(make_data() if data is None else data, **fit_kwargs)
    return trainer, recorder


def assert_same_metrics(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), a["step"]
        for key in a:
            if key in ("loss", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), (a["step"], key)
            elif key != "samples_per_s":  # a rate of the whole chunk on the compiled path
                assert a[key] == b[key], (a["step"], key)


def assert_same_training_state(got: Trainer, want: Trainer):
    for (name, a), (_, b) in zip(got.model.state_dict().items(), want.model.state_dict().items()):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)
    assert got.optimizer.state.keys() == want.optimizer.state.keys()
    for index, state in want.optimizer.state.items():
        assert got.optimizer.state[index].keys() == state.keys()
        assert got.optimizer.state[index]["step"] == state["step"]
        for name in state.keys() - {"step"}:  # momentum_buffer, or exp_avg and exp_avg_sq
            np.testing.assert_allclose(got.optimizer.state[index][name], state[name], rtol=RTOL,
                                       atol=ATOL, err_msg=f"{index} {name}")
    assert got.state_dict()["trainer"] == want.state_dict()["trainer"]
    assert got.state_dict()["scheduler"] == want.state_dict()["scheduler"]
    assert [{k: v for k, v in g.items() if k != "params"} for g in got.optimizer.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in want.optimizer.param_groups]


def log_of(trainer):
    return trainer.log_stream.getvalue()


# ---------------------------------------------------------------------------------------------
# the same training on both paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_compiled_fit_matches_the_reference_loop(model_name, setup):
    compiled, compiled_calls = fit("auto", model_name, setup, epochs=3, log_every=5)
    reference, reference_calls = fit("off", model_name, setup, epochs=3, log_every=5)
    assert re.search(r"compiled step: on \(CompiledClassifierStep, \d threads\)", log_of(compiled))
    assert "compiled step: off (compiled='off')" in log_of(reference)
    assert compiled.step == 3 * 13 and compiled.epoch == 2 and compiled.batch_index == 13
    assert_same_metrics([m for _, m in compiled_calls.steps], [m for _, m in reference_calls.steps])
    assert_same_training_state(compiled, reference)


def test_uint8_pixels_take_the_compiled_path_and_train_as_the_reference():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (203, 12), dtype=np.uint8)
    data = ArrayDataset(pixels, rng.integers(0, 5, 203), scale=1 / 255)
    compiled, compiled_calls = fit("auto", data=data, epochs=2)
    reference, reference_calls = fit("off", data=data, epochs=2)
    assert "compiled step: on" in log_of(compiled)
    assert_same_metrics([m for _, m in compiled_calls.steps], [m for _, m in reference_calls.steps])
    assert_same_training_state(compiled, reference)


def test_a_drop_last_loader_is_followed_exactly():
    loaders = [DataLoader(make_data(), BATCH, seed=3, drop_last=True) for _ in range(2)]
    compiled, compiled_calls = fit("auto", data=loaders[0], epochs=2)
    reference, reference_calls = fit("off", data=loaders[1], epochs=2)
    assert "compiled step: on" in log_of(compiled)
    assert compiled.step == 2 * 12 and compiled.samples_seen == 2 * 12 * BATCH
    assert_same_metrics([m for _, m in compiled_calls.steps], [m for _, m in reference_calls.steps])
    assert_same_training_state(compiled, reference)


def test_log_eval_and_checkpoint_points_are_the_same_and_chunks_end_there(tmp_path):
    every = dict(log_every=4, eval_every=6, checkpoint_every=5)
    runs = {}
    for mode in ("auto", "off"):
        trainer, calls = fit(mode, epochs=2, eval_data=make_data(64, seed=1),
                             run_dir=tmp_path / mode, **every)
        lines = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text()
                 .splitlines()]
        progress = [line for line in log_of(trainer).splitlines() if line.startswith("step ")]
        runs[mode] = trainer, calls, lines, progress
    (_, compiled_calls, compiled_lines, compiled_progress) = runs["auto"]
    (_, reference_calls, reference_lines, reference_progress) = runs["off"]

    assert [(r["kind"], r["step"]) for r in compiled_lines] == \
        [(r["kind"], r["step"]) for r in reference_lines]
    assert_same_metrics([r for r in compiled_lines if r["kind"] == "train"],
                        [r for r in reference_lines if r["kind"] == "train"])
    for a, b in zip(compiled_calls.evals, reference_calls.evals):
        assert a["step"] == b["step"] and a["eval_loss"] == pytest.approx(b["eval_loss"], rel=RTOL)
    assert [e["step"] for e in compiled_calls.evals] == [6, 12, 18, 24, 26]
    assert compiled_calls.checkpoints == reference_calls.checkpoints == [5, 10, 15, 20, 25, 26]
    assert [line.split()[1] for line in compiled_progress] == \
        [line.split()[1] for line in reference_progress] == ["4/26", "8/26", "12/26", "16/26",
                                                             "20/26", "24/26"]
    # the reference loop calls back after every step; the compiled one after each chunk, which
    # ends at a multiple of 5 or 6 (checkpoint, evaluation), at an epoch's end (13, 26), at the
    # last step, or after at least max(log_every, COMPILED_CHUNK_STEPS) = 100 steps: log lines wait
    assert [at for at, _ in reference_calls.steps] == [m["step"] for _, m in reference_calls.steps]
    chunk_ends = sorted({at for at, _ in compiled_calls.steps})
    assert chunk_ends == [5, 6, 10, 12, 13, 15, 18, 20, 24, 25, 26]
    assert all(at >= m["step"] for at, m in compiled_calls.steps)


@pytest.mark.parametrize("seconds, chunk_ends", [(0.0, [100, 200, 300, 400, 500, 520]),
                                                   (1e9, [100, 520])])
def test_chunks_grow_to_about_compiled_chunk_seconds_of_steps(monkeypatch, seconds, chunk_ends):
    """After a first chunk of COMPILED_CHUNK_STEPS, a chunk runs as many steps as the one before
    ran in COMPILED_CHUNK_SECONDS (here 0 s: never more than 100; 1e9 s: the rest of the epoch)."""
    monkeypatch.setattr(runner_compiled, "COMPILED_CHUNK_SECONDS", seconds)
    trainer, calls = fit("auto", "logreg", "plain", data=make_data(n=520 * 4), batch_size=4,
                         epochs=1, log_every=10)
    assert sorted({at for at, _ in calls.steps}) == chunk_ends
    assert [m["step"] for _, m in calls.steps] == list(range(1, 521))


def test_a_call_that_goes_on_alone_moves_the_rest_of_the_fit_to_one_thread(monkeypatch):
    """Chunks of 100 steps on two threads. A late_limit passed from step 50 on whatever the real
    late meetings (allowed 9998, share -100: at most 4 s late by step s, and 9998 - 200 s < 0
    first at s = 50), as a busy machine's would pass it, makes the first call go on alone from its
    step 50 and the later calls run on one thread; the results are the same bit for bit as on
    two threads throughout."""
    monkeypatch.setattr(runner_compiled, "COMPILED_CHUNK_SECONDS", 0.0)
    monkeypatch.setattr(CompiledClassifierStep, "default_threads", lambda self, batch_size: 2)
    data = make_data(n=520 * 4)
    monkeypatch.setattr(CompiledClassifierStep, "late_limit", (1e9, 0.0))
    together, _ = fit("auto", "logreg", "plain", data=data, batch_size=4, epochs=1, log_every=10)
    train_steps, calls = CompiledClassifierStep.train_steps, []

    def recorded(self, *args, **kwargs):
        losses = train_steps(self, *args, **kwargs)
        calls.append((kwargs["threads"], self.alone_from))
        return losses
    monkeypatch.setattr(CompiledClassifierStep, "train_steps", recorded)
    monkeypatch.setattr(CompiledClassifierStep, "late_limit", (9998.0, -100.0))
    alone, _ = fit("auto", "logreg", "plain", data=data, batch_size=4, epochs=1, log_every=10)
    assert calls == [(2, 50)] + [(1, 100)] * 4 + [(1, 20)]
    for (name, a), (_, b) in zip(alone.model.state_dict().items(),
                                 together.model.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_early_stopping_stops_both_paths_at_the_same_evaluation():
    stopped = []
    for mode in ("auto", "off"):
        stopper = EarlyStopping("eval_loss", "min", patience=2)
        model = MODELS["logreg"]()
        # lr 0: the eval loss never improves after the first evaluation
        trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.0),
                          callbacks=[stopper], compiled=mode, log_stream=io.StringIO())
        trainer.fit(make_data(), max_steps=50, batch_size=BATCH, eval_data=make_data(64, seed=1),
                    eval_every=3, progress=False)
        stopped.append((trainer.step, stopper.bad_evals))
    assert stopped[0] == stopped[1] == (9, 2)


# ---------------------------------------------------------------------------------------------
# when the compiled path applies
# ---------------------------------------------------------------------------------------------
class NoArrays:
    """A data set with `batch` but no x and y arrays."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def batch(self, indices):
        return self.base.batch(indices)


def _with_amsgrad(model):
    return Trainer(model, CrossEntropyLoss(), Adam(model.parameters(), lr=1e-2, amsgrad=True),
                   log_stream=io.StringIO())


def _with(**kwargs):
    return lambda model: Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                                 log_stream=io.StringIO(), **kwargs)


UNSUPPORTED = {  # name: (trainer for a model, training data, what the reason says)
    "amsgrad": (_with_amsgrad, make_data, "Adam has amsgrad=True"),
    "accumulation": (_with(accumulation_steps=2), make_data, "accumulation_steps is 2, not 1"),
    "clipping": (_with(clip_grad_norm=1.0), make_data, "clip_grad_norm is 1.0"),
    "freezer": (_with(freezer=DynamicFreezer(0.1)), make_data, "a freezer is set"),
    "fp16": (_with(precision="fp16"), make_data, "a loss scaler is set (precision 'fp16' sets one)"),
    "fp64_with_fp32_data": (_with(precision="fp64"), make_data,
                            "the training data's x is float32 (203, 12); the compiled step takes "
                            "float64"),
    "no_arrays": (_with(), lambda: NoArrays(make_data()), "the training data is a NoArrays"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_auto_falls_back_with_its_reason_and_on_refuses(case):
    make, data, reason = UNSUPPORTED[case]
    trainer = make(MODELS["mlp"]())
    trainer.compiled = "auto"
    trainer.fit(data(), max_steps=3, batch_size=BATCH, progress=False)
    assert trainer.step == 3
    note = [line for line in log_of(trainer).splitlines() if line.startswith("compiled step:")]
    assert len(note) == 1 and note[0].startswith("compiled step: off (") and reason in note[0]

    trainer = make(MODELS["mlp"]())
    trainer.compiled = "on"
    before = {k: v.copy() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="compiled='on' but the compiled step does not apply") as e:
        trainer.fit(data(), max_steps=3, batch_size=BATCH, progress=False)
    assert reason in str(e.value)
    assert trainer.step == 0
    for key, value in before.items():
        assert np.array_equal(trainer.model.state_dict()[key], value)


def test_a_frozen_parameter_or_eval_mode_means_the_reference_loop():
    trainer = make_trainer("auto")
    trainer.model[0].freeze()
    trainer.fit(make_data(), max_steps=2, batch_size=BATCH, progress=False)
    assert "compiled step: off (CompiledClassifierStep: parameter '0.weight' is frozen" \
        in log_of(trainer)
    trainer = make_trainer("on")
    trainer.model.eval()
    with pytest.raises(ValueError, match="the model is in eval mode"):
        trainer.fit(make_data(), max_steps=2, batch_size=BATCH, progress=False)


def test_compiled_must_be_auto_on_or_off():
    with pytest.raises(ValueError, match=r"compiled must be one of \('auto', 'on', 'off'\), got 'yes'"):
        make_trainer("yes")


# ---------------------------------------------------------------------------------------------
# a non-finite loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, value, where", [
    # NaN through the logreg: the reference FusedLinearReLU maps a NaN pre-activation to 0, so
    # through the MLP the reference loss stays finite while the weights turn NaN
    ("logreg", np.nan, r"micro-batch\(es\) \[0\] of this window contain NaN/Inf inputs"),
    ("mlp", 3e38, "the inputs are finite, so the model diverged"),  # overflows the activations
])
def test_a_non_finite_loss_stops_both_paths_at_the_same_step(model_name, value, where):
    data = make_data()
    bad_sample = 100
    position = int(np.flatnonzero(DataLoader(data, BATCH, seed=0).order(0) == bad_sample)[0])
    bad_batch = position // BATCH
    assert bad_batch >= 2  # the failing step is inside a chunk, not its first step
    data.x[bad_sample] = value  # after ArrayDataset's own check of its rows
    results = {}
    for mode in ("auto", "off"):
        recorder = Recorder()
        trainer = make_trainer(mode, model_name, callbacks=[recorder])
        with pytest.raises(FloatingPointError) as error:
            trainer.fit(data, epochs=1, batch_size=BATCH, log_every=100, progress=False)
        results[mode] = trainer, recorder, str(error.value)
    (compiled, compiled_calls, message), (reference, reference_calls, reference_message) = \
        results["auto"], results["off"]
    assert "compiled step: on" in log_of(compiled)
    assert message == reference_message
    assert f"at step {bad_batch + 1} (epoch 0)" in message
    assert re.search(where, message) and "The optimizer step was not taken" in message
    assert compiled.step == bad_batch and compiled.batch_index == bad_batch + 1
    assert compiled.samples_seen == bad_batch * BATCH
    assert compiled.scheduler.last_epoch == bad_batch
    assert len(compiled_calls.steps) == bad_batch
    assert_same_metrics([m for _, m in compiled_calls.steps], [m for _, m in reference_calls.steps])
    assert_same_training_state(compiled, reference)


# ---------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------
TOTAL, STOP = 30, 17  # step 17 is no chunk boundary of the uninterrupted run (log 5, checkpoint 7)


@pytest.mark.parametrize("model_name, setup", [("mlp", "momentum_steplr"),
                                               ("gelu_tanh", "adamw_warmup_cosine")])
@pytest.mark.parametrize("first, second", [("auto", "auto"), ("auto", "off"), ("off", "auto")])
def test_a_resumed_run_equals_an_uninterrupted_compiled_one(tmp_path, first, second, model_name,
                                                            setup):
    kwargs = dict(batch_size=BATCH, log_every=5, checkpoint_every=7, progress=False)
    whole_dir, run_dir = tmp_path / "whole", tmp_path / "resumed"
    whole = make_trainer("auto", model_name, setup)
    whole.fit(make_data(), max_steps=TOTAL, run_dir=whole_dir, **kwargs)

    make_trainer(first, model_name, setup).fit(make_data(), max_steps=STOP, run_dir=run_dir,
                                               **kwargs)
    resumed = make_trainer(second, model_name, setup)
    assert resumed.resume(run_dir)["step"] == STOP
    assert (resumed.epoch, resumed.batch_index) == divmod(STOP, 13)
    resumed.fit(make_data(), max_steps=TOTAL, run_dir=run_dir, **kwargs)

    def train_lines(directory):
        return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]

    if first == second == "auto":
        assert_same_state(resumed.state_dict(), whole.state_dict())
        assert [(r["step"], r["loss"], r["lr"]) for r in train_lines(run_dir)] == \
            [(r["step"], r["loss"], r["lr"]) for r in train_lines(whole_dir)]
    else:
        assert_same_training_state(resumed, whole)
        assert_same_metrics(train_lines(run_dir), train_lines(whole_dir))


# ---------------------------------------------------------------------------------------------
# configuration and command line
# ---------------------------------------------------------------------------------------------
SGD_ON_DIGITS = {
    "model": {"hidden": [32]},
    "data": {"kind": "digits"},
    "optim": {"name": "sgd", "lr": 0.05, "lookahead": False},
    "train": {"epochs": None, "max_steps": 6, "batch_size": 64, "accumulation_steps": 1,
              "precision": "fp32", "clip_grad_norm": None, "eval_every": None,
              "checkpoint_every": None, "log_every": 3},
    "freeze": {"enabled": False},
}


def test_config_field_defaults_to_auto_and_is_checked():
    assert build_config()["train"]["compiled"] == "auto"
    assert parse_cli_value("train.compiled", "off") == "off"
    with pytest.raises(ConfigError, match=r"'train.compiled' must be one of \['auto', 'on', 'off'\]"):
        build_config(overrides={"train": {"compiled": "always"}})


@pytest.mark.parametrize("mode, note", [("auto", "compiled step: on (CompiledClassifierStep"),
                                        ("off", "compiled step: off (compiled='off')")])
def test_a_configured_sgd_run_takes_the_configured_path(tmp_path, mode, note):
    config = build_config(overrides={**SGD_ON_DIGITS,
                                     "train": {**SGD_ON_DIGITS["train"], "compiled": mode}})
    log = io.StringIO()
    run = build_run(config, log_stream=log)
    assert run.trainer.compiled == mode
    run.fit(tmp_path / "run", progress=False)
    assert note in log.getvalue() and run.trainer.step == 6


def test_cli_compiled_on_names_why_it_does_not_apply(tmp_path, capsys):
    code = main(["train", "--config", str(TINY_TOML), "--run-dir", str(tmp_path / "run"),
                 "--threads", "1", "--progress", "lines", "--train.compiled", "on"])
    assert code == 2
    err = capsys.readouterr().err
    assert "compiled='on' but the compiled step does not apply: accumulation_steps is 2" in err

