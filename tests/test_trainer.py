"""Trainer: accumulation, freezing, precision, loss scaling, Lookahead evaluation, bad input."""

import io
import math

import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.nn import work
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam
from npcpu.optim.clip import get_total_norm
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.scaling import DynamicLossScaler
from npcpu.optim.sgd import SGD
from npcpu.train.freezing import DynamicFreezer
from npcpu.train.trainer import Trainer


def make_data(n=100, d=12, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, classes))
    return ArrayDataset(x, np.argmax(x @ w, axis=1))


def make_model(d=12, classes=5, hidden=16, seed=0):
    return Sequential(FusedLinearReLU(d, hidden, seed=seed), FusedLinearReLU(hidden, hidden, seed=seed + 1),
                      Linear(hidden, classes, seed=seed + 2))


def quiet_trainer(model, optimizer, **kwargs):
    return Trainer(model, CrossEntropyLoss(), optimizer, log_stream=io.StringIO(), **kwargs)


def params_of(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n", [96, 100])  # 100: the last window is short (uneven)
def test_k_micro_batches_equal_one_big_batch(n):
    """batch 8 x 4 accumulation and batch 32 x 1 see the same windows: same parameters."""
    data = make_data(n)
    results = []
    for batch_size, accumulation in ((8, 4), (32, 1)):
        model = make_model()
        trainer = quiet_trainer(model, Adam(model.parameters(), lr=1e-2),
                                accumulation_steps=accumulation)
        trainer.fit(data, epochs=2, batch_size=batch_size, progress=False)
        assert trainer.step == 2 * -(-n // 32)
        results.append(params_of(model))
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=2e-5, atol=2e-6,
                                   err_msg=key)


def test_uneven_window_is_weighted_by_its_real_size():
    """A 4-item window's gradient is the mean over its 4 items, not over a full window's 32."""
    data = make_data(36)
    model = make_model()
    reference = make_model()
    optimizer = SGD(model.parameters(), lr=0.1)
    trainer = quiet_trainer(model, optimizer, accumulation_steps=4)
    trainer.fit(ArrayDataset(data.x[32:], data.y[32:]), max_steps=1, batch_size=8, progress=False)
    loss = CrossEntropyLoss()
    reference.input_requires_grad = False
    loss(reference.forward(data.x[32:]), data.y[32:])
    reference.backward(loss.backward())
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        expected = p.data - 0.1 * p.grad
        np.testing.assert_allclose(q.data, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_freezing_skips_work_and_leaves_frozen_parameters_bit_identical():
    data = make_data(256)
    model = make_model()
    freezer = DynamicFreezer(threshold=1e9, patience=2, window=1)  # every layer qualifies at once
    trainer = quiet_trainer(model, Adam(model.parameters(), lr=1e-2), freezer=freezer)
    trainer.fit(data, max_steps=2, batch_size=32, progress=False)
    # prefix_only with min_active=1: the two hidden layers freeze, the head stays trainable
    assert sorted(freezer.frozen_at) == ["0", "1"]
    assert freezer.frozen_at == {"0": 2, "1": 2}
    frozen_before = {k: v.copy() for k, v in model.state_dict().items() if not k.startswith("2.")}
    head_before = model.state_dict()["2.weight"].copy()

    work.reset()
    trainer.fit(data, max_steps=6, batch_size=32, progress=False)
    steps = 4
    # forward: 3 GEMMs a micro-batch; backward: only the head's dW (its dx is not needed: the
    # layers below are frozen), so 1 GEMM instead of 5 (3 dW + 2 dx)
    assert work.counts["gemm"] == steps * (3 + 1)
    # skipped: the head's dx, and dW + dx of each frozen layer
    assert work.counts["gemm_skipped"] == steps * (1 + 2 + 2)
    for key, before in frozen_before.items():
        assert np.array_equal(model.state_dict()[key], before), key
    assert not np.array_equal(model.state_dict()["2.weight"], head_before)
    assert all(p.grad is None for p in model[0].parameters())


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_freezer_sees_the_clipped_norms_the_norm_pass_kept(clip):
    seen = []

    class Recording(DynamicFreezer):
        def observe(self, model, step, gradient_norm=get_total_norm):
            for _, layer in self.layers(model):  # the runner's norms, and read again now
                seen.append((self.layer_signal(layer, gradient_norm), self.layer_signal(layer)))
            return super().observe(model, step, gradient_norm)

    model = make_model()
    freezer = Recording(threshold=1e-12, patience=100, window=2)
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1), freezer=freezer,
                            clip_grad_norm=clip)
    trainer.fit(make_data(256), max_steps=3, batch_size=32, progress=False)
    assert len(seen) == 9 and all(kept == read for kept, read in seen)
    if clip is not None:  # clipping was active: each step's clipped total norm is the clip
        for step in range(3):
            layers = [kept for kept, _ in seen[3 * step:3 * step + 3]]
            assert math.isclose(math.sqrt(sum(n * n for n in layers)), clip, rel_tol=1e-4)


def test_freezing_any_layer_skips_its_dw_gemm_only():
    data = make_data(256)
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.01))
    model[1].freeze()  # a middle layer, not a prefix
    work.reset()
    trainer.fit(data, max_steps=1, batch_size=256, progress=False)
    # forward 3; backward: head dW + dx, layer 1 dx only (dW skipped), layer 0 dW only
    assert work.counts["gemm"] == 3 + 2 + 1 + 1
    assert work.counts["gemm_skipped"] >= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_learns(precision):
    data = make_data(512, d=12, classes=3)
    model = make_model(classes=3)
    trainer = quiet_trainer(model, Adam(model.parameters(), lr=1e-2), precision=precision)
    before = trainer.evaluate(data)["eval_loss"]
    trainer.fit(data, epochs=10, batch_size=64, progress=False)
    after = trainer.evaluate(data)
    assert model[0].weight.data.dtype.name == ("bfloat16" if precision == "bf16" else "float16")
    assert after["eval_loss"] < 0.6 * before and after["eval_accuracy"] > 0.8
    if precision == "fp16":
        assert isinstance(trainer.loss_scaler, DynamicLossScaler)


class ExplodingOnce:
    """A data set whose batch holding sample 0 overflows the logits (finite input, inf loss)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def batch(self, indices):
        x, y = self.base.batch(indices)
        x = x.copy()
        x[indices == 0] = 3e38
        return x, y


def test_non_finite_loss_without_scaler_is_a_clear_error_and_changes_nothing():
    data = ExplodingOnce(make_data(64))
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1))
    before = params_of(model)
    with pytest.raises(FloatingPointError, match="optimizer step was not taken"):
        trainer.fit(data, max_steps=1, batch_size=64, progress=False)
    for key, value in before.items():
        assert np.array_equal(model.state_dict()[key], value)


def test_non_finite_gradients_under_a_loss_scaler_skip_the_step():
    data = ExplodingOnce(make_data(64))
    model = make_model()
    scaler = DynamicLossScaler(init_scale=1024.0)
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1), loss_scaler=scaler)
    before = params_of(model)
    trainer.fit(data, max_steps=1, batch_size=64, progress=False)
    assert trainer.skipped_steps == 1 and scaler.scale == 512.0
    for key, value in before.items():
        assert np.array_equal(model.state_dict()[key], value)


def test_bad_labels_and_shapes_are_clear_errors():
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1))
    data = make_data(32)
    with pytest.raises(ValueError, match="5"):
        trainer.fit(ArrayDataset(data.x, data.y + 5), max_steps=1, batch_size=32, progress=False)
    with pytest.raises(ValueError, match=r"\(32, 11\)"):
        trainer.fit(ArrayDataset(data.x[:, :11], data.y), max_steps=1, batch_size=32, progress=False)


def test_nan_in_array_data_is_rejected_up_front():
    data = make_data(32)
    x = data.x.copy()
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="7"):
        ArrayDataset(x, data.y)


def test_evaluation_uses_lookahead_slow_weights_and_restores_fast_ones():
    data = make_data(128)
    model = make_model()
    lookahead = Lookahead(SGD(model.parameters(), lr=0.2), k=5, alpha=0.5)
    trainer = quiet_trainer(model, lookahead)
    trainer.fit(data, max_steps=3, batch_size=32, progress=False)  # mid-cycle: slow != fast
    fast = params_of(model)
    result = trainer.evaluate(data)
    for key, value in fast.items():
        assert np.array_equal(model.state_dict()[key], value)
    slow = make_model()
    slow.load_state_dict({name: lookahead.slow_weights[i]
                          for i, (name, _) in enumerate(model.named_parameters())})
    loss = CrossEntropyLoss()
    slow.eval()
    expected = loss(slow.forward(data.x), data.y)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-6)
    model.eval()
    fast_loss = loss(model.forward(data.x), data.y)
    assert abs(fast_loss - expected) > 1e-6


def test_invalid_arguments():
    model = make_model()
    opt = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulation_steps"):
        quiet_trainer(model, opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="precision"):
        quiet_trainer(model, opt, precision="fp8")
    trainer = quiet_trainer(model, opt)
    with pytest.raises(ValueError, match="epochs or max_steps"):
        trainer.fit(make_data(8), batch_size=4)


def test_unwritable_run_dir_is_an_error_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1))
    before = params_of(model)
    with pytest.raises(NotADirectoryError):
        trainer.fit(make_data(32), max_steps=2, batch_size=8, run_dir=blocker / "run",
                    progress=False)
    assert trainer.step == 0
    for key, value in before.items():
        assert np.array_equal(model.state_dict()[key], value)


def test_a_new_nested_run_dir_is_created(tmp_path):
    model = make_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1))
    run_dir = tmp_path / "runs" / "first"
    trainer.fit(make_data(32), max_steps=2, batch_size=8, run_dir=run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").is_file()
    assert trainer.resume(run_dir)["step"] == 2


def test_early_stopping_stops_when_the_metric_stops_improving():
    from npcpu.train.callbacks import EarlyStopping

    data = make_data(64)
    model = make_model()
    stopper = EarlyStopping("eval_loss", "min", patience=2)
    # lr 0: the eval loss never improves after the first evaluation
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.0), callbacks=[stopper])
    trainer.fit(data, max_steps=50, batch_size=16, eval_data=data, eval_every=1, progress=False)
    assert trainer.step == 3 and stopper.bad_evals == 2
    assert trainer.stop_training
