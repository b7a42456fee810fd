"""The Trainer's loop over step runners: finished runs, evaluation metrics from the loss, a
runner supplied by a subclass, the optimizer protocol."""

import io
import os

import numpy as np
import pytest

from npcpu.checkpoint import list_checkpoints
from npcpu.nn.linear import Linear
from npcpu.nn.losses import CrossEntropyLoss, MSELoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.protocol import TrainerOptimizer
from npcpu.optim.sgd import SGD
from npcpu.train.runners import ReferenceRunner, StepResult
from npcpu.train.trainer import Trainer
from test_trainer import make_data, make_model, params_of, quiet_trainer


def snapshot(run_dir):
    """Every file under run_dir with its bytes: what "changes nothing" is checked against."""
    return {os.path.relpath(os.path.join(root, name), run_dir):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(run_dir) for name in names}


def finished_run(run_dir, epochs=2):
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1, momentum=0.9))
    trainer.fit(make_data(64), epochs=epochs, batch_size=16, eval_data=make_data(32, seed=1),
                run_dir=run_dir, checkpoint_every=3, progress=False)
    return trainer


def resumed_trainer(run_dir):
    model = make_model(seed=7)  # other weights: the checkpoint must bring the run's back
    log = io.StringIO()
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9),
                      log_stream=log)
    trainer.resume(run_dir)
    return trainer, log


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    first = finished_run(run_dir)
    assert first.step == 8
    before_files, checkpoints = snapshot(run_dir), list_checkpoints(run_dir)
    trainer, log = resumed_trainer(run_dir)
    before_params = params_of(trainer.model)
    result = trainer.fit(make_data(64), epochs=2, batch_size=16, eval_data=make_data(32, seed=1),
                         run_dir=run_dir, checkpoint_every=3, progress=False)
    assert "the run is complete" in log.getvalue() and "step 8" in log.getvalue()
    assert trainer.step == 8 and list_checkpoints(run_dir) == checkpoints
    assert [p.name for p in checkpoints][-1] == "step-000008"  # no step-000008.2
    assert snapshot(run_dir) == before_files
    for key, value in before_params.items():
        assert np.array_equal(trainer.model.state_dict()[key], value)
    assert result["eval_loss"] == first.last_eval["eval_loss"]


def test_resuming_a_finished_run_with_raised_limits_trains_on(tmp_path):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    trainer, log = resumed_trainer(run_dir)
    trainer.fit(make_data(64), epochs=3, batch_size=16, eval_data=make_data(32, seed=1),
                run_dir=run_dir, checkpoint_every=3, progress=False)
    assert "the run is complete" not in log.getvalue()
    assert trainer.step == 12 and list_checkpoints(run_dir)[-1].name == "step-000012"
    # the continued run is the run trained for 3 epochs at once
    uninterrupted = finished_run(tmp_path / "once", epochs=3)
    for key, value in params_of(uninterrupted.model).items():
        np.testing.assert_array_equal(trainer.model.state_dict()[key], value, err_msg=key)


class Regression:
    """A data set of float targets (ArrayDataset holds class labels)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def batch(self, indices):
        return self.x[indices], self.y[indices]


def test_evaluation_metrics_come_from_the_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    data = Regression(x, (x @ rng.standard_normal((6, 3))).astype(np.float32))
    model = Sequential(Linear(6, 3, seed=0))
    trainer = Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.05), log_stream=io.StringIO())
    result = trainer.fit(data, max_steps=4, batch_size=8, eval_data=data, progress=False)
    assert "eval_accuracy" not in result and "eval_loss" in result
    model.eval()
    expected = MSELoss()(model.forward(x), data.y)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-6)

    classifier = make_model()
    trainer = quiet_trainer(classifier, SGD(classifier.parameters(), lr=0.1))
    data = make_data(50)
    metrics = trainer.evaluate(data, batch_size=16)
    classifier.eval()
    predicted = np.argmax(classifier.forward(data.x), axis=1)
    assert sorted(metrics) == ["eval_accuracy", "eval_loss"]
    assert metrics["eval_accuracy"] == np.mean(predicted == data.y)


class CountingRunner(ReferenceRunner):
    """A runner wrapping the reference one, as a data-parallel runner would: it adds a metric."""

    def steps(self, limit):
        for result in super().steps(limit):
            yield StepResult(result.loss, result.items, result.grad_norm, result.skipped,
                             result.frozen_now, extra={"windows_seen": self.trainer.step + 1})


class CountingTrainer(Trainer):
    def make_runner(self, loader, log_every):
        return CountingRunner(self, loader, note="counting runner")


def test_a_subclass_supplies_its_own_runner_and_fit_stays_the_same():
    data = make_data(64)
    steps = []
    runs = {}
    for cls in (Trainer, CountingTrainer):
        model = make_model()
        log = io.StringIO()
        trainer = cls(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), log_stream=log,
                      compiled="off")
        if cls is CountingTrainer:
            from npcpu.train.callbacks import Callback

            class Record(Callback):
                def on_step_end(self, trainer, metrics):
                    steps.append((metrics["step"], metrics["windows_seen"]))
            trainer.callbacks.append(Record())
        trainer.fit(data, max_steps=5, batch_size=16, progress=False)
        runs[cls] = params_of(model), log.getvalue()
    assert steps == [(i, i) for i in range(1, 6)]
    assert "counting runner" in runs[CountingTrainer][1]
    for key, value in runs[Trainer][0].items():
        np.testing.assert_array_equal(runs[CountingTrainer][0][key], value)


def test_optimizers_and_lookahead_share_the_protocol_the_trainer_calls():
    model = make_model()
    adam = Adam(model.parameters())
    lookahead = Lookahead(adam)
    assert isinstance(adam, TrainerOptimizer) and isinstance(lookahead, TrainerOptimizer)
    assert lookahead.describe() == "Lookahead(Adam)" and adam.describe() == "Adam"
    with pytest.raises(TypeError, match="optimizer must be an npcpu Optimizer or Lookahead"):
        Trainer(model, CrossEntropyLoss(), object(), log_stream=io.StringIO())


class PerplexityLoss(CrossEntropyLoss):
    """A loss whose evaluation reports metrics that are not per-sample means."""

    def evaluation_sums(self, logits, targets):
        return {"tokens": targets.size}

    def evaluation_metrics(self, loss, sums, samples):
        return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": sums["tokens"]}


def test_a_loss_defines_metrics_that_are_not_per_sample_means():
    model = make_model()
    trainer = Trainer(model, PerplexityLoss(), SGD(model.parameters(), lr=0.1),
                      log_stream=io.StringIO())
    metrics = trainer.evaluate(make_data(50), batch_size=16)
    assert sorted(metrics) == ["eval_loss", "eval_perplexity", "eval_tokens"]
    assert metrics["eval_tokens"] == 50
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-12)
