"""Updates inside backward (Optimizer.fuse_into_backward) and the weight-row blocks behind them."""

import io
import tracemalloc

import numpy as np
import pytest

from npcpu.config import build_config
from npcpu.nn import weight_blocks
from npcpu.nn.activations import ReLU
from npcpu.nn.embedding import Embedding
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.nn.norm import LayerNorm
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.lamb import LAMB
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16
from npcpu.train.build import build_run
from npcpu.train.callbacks import Callback
from npcpu.train.freezing import DynamicFreezer
from statecheck import assert_same_state
from test_trainer import ExplodingOnce, make_data, params_of, quiet_trainer
from test_trainer import make_model as make_trainer_model
from test_trainer_compiled import SGD_ON_DIGITS

OPTIMIZERS = {
    "sgd-momentum": lambda params, **kw: SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "adam": lambda params, **kw: Adam(params, lr=1e-2, **kw),
    "adamw-amsgrad": lambda params, **kw: AdamW(params, lr=1e-2, amsgrad=True, **kw),
}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that small layers take several blocks and a shorter last one."""
    monkeypatch.setattr(weight_blocks, "BLOCK_ELEMENTS", 32)


# -- the optimizer: a tensor updated by ranges equals the tensor updated whole ------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("storage, options", [
    ("fp32", {}),
    ("bf16", {"state_dtype": "bf16"}),                         # stochastic rounding of w, m, v
    ("bf16", {"state_dtype": "bf16", "master_weights": True}),
])
def test_updating_by_ranges_is_bitwise_the_whole_update(num_threads, name, storage, options):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((97, 23)).astype(np.float32)  # 2231 elements
    if storage == "bf16":
        values = values.astype(bfloat16)
    whole, ranged = Parameter(values.copy()), Parameter(values.copy())
    opt_whole = OPTIMIZERS[name]([whole], seed=3, **options)
    opt_ranged = OPTIMIZERS[name]([ranged], seed=3, **options)
    cuts = [0, 4, 1020, 1032, 2000]  # ranges across the kernels' 1024-element blocks
    for _ in range(3):
        grad = rng.standard_normal(values.size).astype(np.float32)
        opt_whole.begin_update(whole)(grad)
        update = opt_ranged.begin_update(ranged)
        for first, stop in zip(cuts, cuts[1:] + [values.size]):
            update(grad[first:stop], first)
    assert_same_state(whole.data, ranged.data)
    assert_same_state(opt_whole.state_dict(), opt_ranged.state_dict())


def test_ranges_must_start_at_a_multiple_of_4_and_stay_inside():
    p = Parameter(np.zeros(10, np.float32))
    update = Adam([p]).begin_update(p)
    with pytest.raises(ValueError, match="multiple of 4"):
        update(np.zeros(3, np.float32), 2)
    with pytest.raises(ValueError, match="inside the parameter"):
        update(np.zeros(8, np.float32), 4)


def test_lamb_refuses_to_update_inside_backward():
    p = Parameter(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="whole tensor"):
        LAMB([p]).fuse_into_backward()
    with pytest.raises(ValueError, match="whole tensors only"):
        LAMB([p]).begin_update(p)(np.zeros(4, np.float32), 0)


def test_step_is_refused_and_a_second_optimizer_is_refused():
    model = Linear(3, 2, seed=0)
    optimizer = SGD(model.parameters(), lr=0.1)
    optimizer.fuse_into_backward()
    with pytest.raises(RuntimeError, match="inside backward"):
        optimizer.step()
    with pytest.raises(ValueError, match="another optimizer"):
        Adam(model.parameters()).fuse_into_backward()


# -- 16-bit weights by blocks of rows ------------------------------------------------------------
@pytest.mark.parametrize("layer_class", [Linear, FusedLinearReLU])
@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_half_weight_blocks_match_the_widened_weight(small_blocks, widened_bf16_gemm, layer_class,
                                                    storage):
    layer = layer_class(7, 10, seed=0)  # 4 rows per block: blocks of 4, 4 and 2 rows
    assert weight_blocks.block_rows(10, 7) == 4
    layer.set_precision(storage)
    reference = layer_class(7, 10, seed=0)
    reference.load_state_dict({k: v.astype(np.float32) for k, v in layer.state_dict().items()})
    layer.input_requires_grad = reference.input_requires_grad = True
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x_stored = x.astype(layer.storage_dtype).astype(np.float32)  # what the half layer keeps
    dy = rng.standard_normal((5, 10)).astype(np.float32)
    np.testing.assert_allclose(layer.forward(x), reference.forward(x), rtol=1e-6, atol=1e-6)
    reference.forward(x_stored)
    np.testing.assert_allclose(layer.backward(dy), reference.backward(dy), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-6)


# -- training with updates inside backward equals backward, then step ----------------------------
def make_model(seed: int = 0) -> Sequential:
    return Sequential(Embedding(11, 6, seed=seed), LayerNorm(6), FusedLinearReLU(6, 18, seed=seed + 1),
                      Linear(18, 9, seed=seed + 2), ReLU(), Linear(9, 5, seed=seed + 3))


def token_batches(steps: int, seed: int = 5) -> list:
    """`steps` batches (tokens (8,), labels (8,)) for make_model."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 11, size=(8,)), rng.integers(0, 5, size=(8,))) for _ in range(steps)]


def train(model, optimizer, batches, fused: bool) -> list[float]:
    """Forward, loss and backward on each (x, labels) of `batches`, then step and zero_grad, or,
    when `fused`, with the optimizer fused into backward first. The losses."""
    loss_fn = CrossEntropyLoss()
    if fused:
        optimizer.fuse_into_backward()
    losses = []
    for x, labels in batches:
        losses.append(float(loss_fn(model.forward(x), labels)))
        model.backward(loss_fn.backward())
        if not fused:
            optimizer.step()
            optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("precision, rtol", [("fp64", 1e-12), ("fp32", 2e-5)])
def test_training_inside_backward_matches_backward_then_step(small_blocks, name, precision, rtol):
    models = [make_model().set_precision(precision) for _ in range(2)]
    optimizers = [OPTIMIZERS[name](m.parameters()) for m in models]
    losses = [train(m, o, token_batches(4), fused)
              for m, o, fused in zip(models, optimizers, (False, True))]
    np.testing.assert_allclose(losses[1], losses[0], rtol=rtol)
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol, err_msg=key)
    assert all(p.grad is None for p in models[1].parameters())  # dropped after each update
    assert [s["step"] for s in optimizers[1].state.values()] == [4] * len(models[1].parameters())


def test_bf16_training_inside_backward_stays_within_rounding_of_backward_then_step(small_blocks):
    models = [make_model().set_precision("bf16") for _ in range(2)]
    optimizers = [Adam(m.parameters(), lr=1e-2, state_dtype="bf16") for m in models]
    losses = [train(m, o, token_batches(3), fused)
              for m, o, fused in zip(models, optimizers, (False, True))]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
    for a, b in zip(models[0].parameters(), models[1].parameters()):  # the same random bits
        same = np.mean(a.data == b.data)
        assert same > 0.9, (a.name, same)


def test_frozen_layers_are_left_alone_and_a_first_layer_computes_no_dx(small_blocks):
    model = make_model()
    model[2].freeze()
    frozen = {k: v.copy() for k, v in model[2].state_dict().items()}
    optimizer = Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, token_batches(2), fused=True)
    assert_same_state(frozen, dict(model[2].state_dict()))
    assert optimizer.index_of(model[2].weight) not in optimizer.state
    layer = Linear(6, 4, seed=0)  # used alone, without an input gradient
    layer.input_requires_grad = False
    SGD(layer.parameters(), lr=0.1).fuse_into_backward()
    before = layer.weight.data.copy()
    layer.forward(np.ones((3, 6)))
    assert layer.backward(np.ones((3, 4))) is None
    np.testing.assert_allclose(layer.weight.data, before - 0.1 * 3, atol=1e-6)


def peak_traced_bytes_of_training(fused: bool) -> tuple[int, int]:
    """(peak bytes NumPy allocated over two bf16 training steps, bytes of the optimizer's moments),
    from tracemalloc (NumPy reports its allocations to it), the model built beforehand."""
    model = Sequential(FusedLinearReLU(256, 2048, seed=0), Linear(2048, 1024, seed=1))
    model.set_precision("bf16")
    model.input_requires_grad = False
    batch = np.ones((4, 256), np.float32), np.zeros(4, np.int64)
    weight_blocks._buffer = np.empty(0, np.uint8)  # made again inside the traced steps
    tracemalloc.start()
    optimizer = Adam(model.parameters(), state_dtype="bf16")
    train(model, optimizer, [batch, batch], fused)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    moments = sum(a.nbytes for s in optimizer.state.values() for a in s.values()
                  if isinstance(a, np.ndarray))
    return peak, moments


def test_the_model_never_holds_a_gradient_the_size_of_a_weight(monkeypatch):
    monkeypatch.setattr(weight_blocks, "BLOCK_ELEMENTS", 1 << 18)  # 1 MB: 128 rows of 2048
    largest_weight_fp32 = 2048 * 1024 * 4
    # Once untraced first: compiling or loading a kernel allocates through Python, and tracemalloc
    # would count it (the first run after a kernel changed failed this way).
    peak_traced_bytes_of_training(fused=True)
    peak, moments = peak_traced_bytes_of_training(fused=True)
    assert peak - moments < largest_weight_fp32 / 4, (peak, moments)  # the 1 MB block buffer
    peak, moments = peak_traced_bytes_of_training(fused=False)  # the same measure sees the grads
    assert peak - moments > largest_weight_fp32, (peak, moments)


# -- the Trainer ------------------------------------------------------------------------------
def trainer_pair_results(precision: str):
    """Parameters, step metrics and model of the same run with and without updates inside backward."""
    results = []
    for update_in_backward in (False, True):
        model = make_trainer_model()
        record = RecordMetrics()
        trainer = quiet_trainer(model, Adam(model.parameters(), lr=1e-2), precision=precision,
                                compiled="off", update_in_backward=update_in_backward,
                                callbacks=[record])
        trainer.fit(make_data(96), epochs=2, batch_size=16, progress=False)
        results.append((params_of(model), record.metrics, model))
    return results


class RecordMetrics(Callback):
    def __init__(self):
        self.metrics = []

    def on_step_end(self, trainer, metrics):
        self.metrics.append(metrics)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_updating_inside_backward_trains_the_same_model(precision):
    (reference, reference_metrics, _), (fused, metrics, model) = trainer_pair_results(precision)
    tolerance = 2e-5 if precision == "fp32" else 3e-2
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in reference_metrics],
                               rtol=tolerance)
    for key in reference:
        np.testing.assert_allclose(np.float32(fused[key]), np.float32(reference[key]),
                                   rtol=tolerance, atol=tolerance, err_msg=key)
    assert all(m["grad_norm"] is None for m in metrics)
    assert all(p.grad is None for p in model.parameters())


def test_trainer_checks_the_loss_before_backward_updates_anything():
    model = make_trainer_model()
    trainer = quiet_trainer(model, SGD(model.parameters(), lr=0.1), update_in_backward=True)
    before = params_of(model)
    with pytest.raises(FloatingPointError, match="optimizer step was not taken"):
        trainer.fit(ExplodingOnce(make_data(64)), max_steps=1, batch_size=64, progress=False)
    assert_same_state(before, params_of(model))


@pytest.mark.parametrize("options, error, message", [
    ({"accumulation_steps": 2}, ValueError, "accumulation_steps is 2, not 1"),
    ({"clip_grad_norm": 1.0}, ValueError, "clip_grad_norm is 1.0"),
    ({"precision": "fp16"}, ValueError, r"a loss scaler is set \(precision 'fp16' sets one\)"),
    ({"freezer": DynamicFreezer(0.1, 2, 2)}, ValueError, "a freezer is set"),
    ({"lookahead": True}, TypeError, "got Lookahead"),
])
def test_trainer_refuses_what_needs_the_finished_gradients(options, error, message):
    model = make_trainer_model()
    optimizer = Adam(model.parameters())
    if options.pop("lookahead", False):
        optimizer = Lookahead(optimizer)
    with pytest.raises(error, match=message):
        quiet_trainer(model, optimizer, update_in_backward=True, **options)


def test_the_config_field_reaches_the_trainer(tmp_path):
    config = build_config(overrides={**SGD_ON_DIGITS, "train": {**SGD_ON_DIGITS["train"],
                                                                "update_in_backward": True}})
    log = io.StringIO()
    run = build_run(config, log_stream=log)
    run.fit(tmp_path / "run", progress=False)
    assert run.trainer.update_in_backward and run.trainer.optimizer.fused_into_backward
    assert "updates inside backward" in log.getvalue()
    assert "compiled step: off (the optimizer updates inside backward)" in log.getvalue()
    assert build_config()["train"]["update_in_backward"] is False
