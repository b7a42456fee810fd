"""The compiled step (npcpu.train.compiled) on bfloat16 parameters: each update stored bit for bit
as the reference optimizer stores it (stochastic rounding keyed by seed, step, parameter index and
element; rounding to nearest; an fp32 master copy), whole epochs against the reference loop on the
native bf16 GEMMs, and the fallbacks."""

import io

import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.dtypes import bfloat16
from npcpu.kernels import compiled_step as kernels
from npcpu.kernels import compiled_update
from npcpu.nn.activations import Tanh
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.sgd import SGD
from npcpu.train.compiled import CompiledClassifierStep
from npcpu.train.compiled_optim import optimizer_settings
from npcpu.train.trainer import Trainer
from tests.test_compiled import MODELS as COMPILED_MODELS

OPTIMIZERS = {
    "sgd": (SGD, dict(lr=0.1)),
    "sgd_nesterov_decay": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adam_decay": (Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw_maximize": (AdamW, dict(lr=0.02, maximize=True)),
}
STORAGE = {  # how the optimizer stores into a bf16 parameter
    "stochastic": dict(seed=11),
    "nearest": dict(stochastic_rounding=False),
    "master": dict(master_weights=True),
}


def _bf16_model(layers):
    model = Sequential(*layers)
    model.input_requires_grad = False
    model.set_precision("bf16")
    return model


def _optimizer(model, optimizer_name, storage_name):
    kind, settings = OPTIMIZERS[optimizer_name]
    return kind(model.parameters(), **settings, **STORAGE[storage_name])


# ---------------------------------------------------------------------------------------------
# one update, bit for bit the reference optimizer's
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage_name", STORAGE)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_bf16_update_matches_the_reference_optimizer(optimizer_name, storage_name):
    """update_parameter on the float32 copy of a bf16 weight (7 x 3: runs of 4 elements that cross
    rows) and bias, in two runs of columns as W_0's column blocks, over 3 steps: the stored bf16
    values, the moments and the master copy bit for bit the reference optimizer's."""
    rng = np.random.default_rng(5)
    reference_model, model = (_bf16_model([Linear(7, 3, seed=0)]) for _ in range(2))
    reference = _optimizer(reference_model, optimizer_name, storage_name)
    optimizer = _optimizer(model, optimizer_name, storage_name)
    settings = optimizer_settings(optimizer, list(model))
    weight, bias = (a.astype(np.float32) for a in (settings["weights"][0], settings["biases"][0]))
    thread_model = kernels.ThreadModel(
        weights=(weight,), biases=(bias,), activations=np.zeros(1, np.int64),
        adam=settings["adam"], first_moments=settings["first_moments"],
        second_moments=settings["second_moments"], hyper=settings["hyper"],
        flags=settings["flags"], storage=settings["storage"], masters=settings["masters"],
        tensor_index=settings["tensor_index"], seed=settings["seed"], bf16_inputs=True,
        grad_weights=(), grad_biases=())
    expected_storage = compiled_update.NEAREST if storage_name != "stochastic" \
        else compiled_update.STOCHASTIC
    assert list(settings["storage"]) == [expected_storage] * 2
    lr = OPTIMIZERS[optimizer_name][1]["lr"]
    for t in (1, 2, 3):
        grad_w = rng.standard_normal((3, 7)).astype(np.float32)
        grad_b = rng.standard_normal((1, 3)).astype(np.float32)
        reference_model[0].weight.grad = grad_w.copy()
        reference_model[0].bias.grad = grad_b.reshape(-1).copy()
        reference.step()
        betas = OPTIMIZERS[optimizer_name][1].get("betas", (0.9, 0.999))
        corrections = np.array([1 - betas[0] ** t, (1 - betas[1] ** t) ** 0.5])
        for first, stop in ((0, 4), (4, 7)):
            compiled_update.update_parameter(thread_model, 0, weight, grad_w, first, stop, lr,
                                             corrections, t)
        compiled_update.update_parameter(thread_model, 1, bias.reshape(1, -1), grad_b, 0, 3, lr,
                                         corrections, t)
        for p, got, kept in ((0, weight, reference_model[0].weight),
                             (1, bias, reference_model[0].bias)):
            want = kept.data.astype(np.float32).reshape(got.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"step {t} parameter {p}")
            state = reference.state[reference.index_of(kept)]
            for name, array in (("master_param", settings["masters"][p]),
                                ("momentum_buffer", settings["first_moments"][p]),
                                ("exp_avg", settings["first_moments"][p]),
                                ("exp_avg_sq", settings["second_moments"][p])):
                if name in state:
                    np.testing.assert_array_equal(array, state[name].reshape(-1),
                                                  err_msg=f"step {t} parameter {p} {name}")


# ---------------------------------------------------------------------------------------------
# whole epochs against the reference loop
# ---------------------------------------------------------------------------------------------
MODELS = {name: COMPILED_MODELS[name] for name in ("logreg", "mlp", "gelu_tanh")}
# The compiled GEMMs sum in another order than the native bf16 kernels: float32 rounding apart,
# until an update or an activation lands on the other side of a bf16 rounding boundary, which
# then moves that value by one bf16 unit (2^-8 relative) and the losses by less.
LOSS_RTOL = 1e-3
WEIGHT_RTOL, WEIGHT_ATOL = 2 ** -7, 1e-3
MOST = 0.95  # of the weights stored bit for bit the reference's


def _reference_epoch(model, loss_fn, optimizer, loader, epoch):
    losses = []
    for x, y in loader.iter_from(epoch, 0):
        losses.append(loss_fn(model.forward(x), y))
        model.backward(loss_fn.backward())
        optimizer.step()
        optimizer.zero_grad()
    return np.array(losses)


def _assert_close_bf16(got_model, want_model):
    for (name, want), (_, got) in zip(want_model.state_dict().items(),
                                      got_model.state_dict().items()):
        assert got.dtype == want.dtype == bfloat16, name
        got, want = got.astype(np.float32), want.astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=name)
        assert np.mean(got == want) >= MOST, name


@pytest.mark.parametrize("storage_name", STORAGE)
@pytest.mark.parametrize("optimizer_name", ["sgd_nesterov_decay", "adamw_maximize"])
@pytest.mark.parametrize("model_name", MODELS)
def test_bf16_epochs_match_the_reference_loop(model_name, optimizer_name, storage_name,
                                              native_bf16_gemm):
    """Two epochs on 1 and on 2 threads (bit for bit the same) against the reference loop on the
    native bf16 GEMMs (to the tolerances above); the optimizer's state continues as the
    reference's (step counts, moments, master copies)."""
    rng = np.random.default_rng(3)
    dataset = ArrayDataset(rng.standard_normal((203, 23)).astype(np.float32),
                           rng.integers(0, 5, 203))
    loader = DataLoader(dataset, 16, seed=7, prefetch=0)
    reference_model = _bf16_model(MODELS[model_name]())
    reference = (reference_model, CrossEntropyLoss(),
                 _optimizer(reference_model, optimizer_name, storage_name))
    steps = {}
    for threads in (1, 2):
        model = _bf16_model(MODELS[model_name]())
        steps[threads] = CompiledClassifierStep(model, CrossEntropyLoss(),
                                                _optimizer(model, optimizer_name, storage_name))
    x = steps[1].gemm_input(dataset.x)
    assert x.dtype == np.float32 and np.array_equal(x, dataset.x.astype(bfloat16).astype(np.float32))
    for epoch in (0, 1):
        expected = _reference_epoch(*reference, loader, epoch)
        losses = {threads: step.train_steps(x, dataset.y, loader.order(epoch), 16, threads=threads)
                  for threads, step in steps.items()}
        np.testing.assert_array_equal(losses[1], losses[2])
        np.testing.assert_allclose(losses[1], expected, rtol=LOSS_RTOL)
    one, two = steps[1].model.state_dict(), steps[2].model.state_dict()
    for name in one:
        np.testing.assert_array_equal(one[name].view(np.uint16), two[name].view(np.uint16), name)
    _assert_close_bf16(steps[1].model, reference_model)
    for index, state in reference[2].state.items():
        got = steps[1].optimizer.state[index]
        assert got.keys() == state.keys() and got["step"] == state["step"] == 2 * len(loader)
        for name in state.keys() - {"step"}:
            assert got[name].dtype == state[name].dtype == np.float32
            np.testing.assert_allclose(got[name], state[name], rtol=WEIGHT_RTOL,
                                       atol=WEIGHT_ATOL, err_msg=f"{index} {name}")


def test_bf16_fit_takes_the_compiled_path(native_bf16_gemm):
    """Trainer.fit(precision="bf16") runs the compiled step and ends where the reference loop
    ends (to the tolerances above)."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((203, 12)).astype(np.float32), rng.integers(0, 5, 203))
    trainers = {}
    for compiled in ("off", "auto"):
        model = Sequential(FusedLinearReLU(12, 16, seed=0), Linear(16, 5, seed=1))
        optimizer = Adam(model.parameters(), lr=0.01, seed=3)
        trainers[compiled] = Trainer(model, CrossEntropyLoss(), optimizer, precision="bf16",
                                     compiled=compiled, log_stream=io.StringIO())
        trainers[compiled].fit(data, epochs=2, batch_size=16, progress=False)
    log = trainers["auto"].log_stream.getvalue()
    assert "compiled step: on (CompiledClassifierStep" in log
    assert trainers["auto"].step == trainers["off"].step == 26
    _assert_close_bf16(trainers["auto"].model, trainers["off"].model)


# ---------------------------------------------------------------------------------------------
# what bf16 does not take the compiled path for
# ---------------------------------------------------------------------------------------------
def test_bf16_with_widened_gemms_falls_back_with_its_reason(widened_bf16_gemm):
    model = Sequential(Linear(12, 5, seed=0))
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      precision="bf16", log_stream=io.StringIO())
    trainer.fit(ArrayDataset(np.ones((32, 12), np.float32), np.zeros(32, np.int64)), max_steps=2,
                batch_size=16, progress=False)
    assert trainer.step == 2
    assert ("compiled step: off (CompiledClassifierStep: the bf16 GEMMs are widened to fp32, and "
            "the compiled step rounds as the native bf16 GEMMs do only") \
        in trainer.log_stream.getvalue()


def test_bf16_refusals(native_bf16_gemm):
    model = _bf16_model([Linear(6, 4, seed=0), Tanh()])
    with pytest.raises(ValueError, match="under bf16 the last Linear is followed by a Tanh"):
        CompiledClassifierStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    model = _bf16_model([Linear(6, 4, seed=0)])
    step = CompiledClassifierStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    pixels = np.zeros((5, 6), np.uint8)
    with pytest.raises(ValueError, match="uint8 features with a scale under bf16"):
        step.train_steps(pixels, np.zeros(5, np.int64), np.arange(5), 2, x_scale=1 / 255)
    with pytest.raises(ValueError, match="state_dtype='bf16'"):
        CompiledClassifierStep(model, CrossEntropyLoss(),
                               SGD(model.parameters(), lr=0.1, state_dtype="bf16"))



def test_fit_on_scaled_pixels_under_bf16_falls_back_with_its_reason(native_bf16_gemm):
    model = Sequential(Linear(12, 5, seed=0))
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      precision="bf16", log_stream=io.StringIO())
    pixels = ArrayDataset(np.full((32, 12), 128, np.uint8), np.zeros(32, np.int64), scale=1 / 255)
    trainer.fit(pixels, max_steps=2, batch_size=16, progress=False)
    assert trainer.step == 2
    assert ("compiled step: off (CompiledClassifierStep: uint8 features with a scale under bf16"
            in trainer.log_stream.getvalue())
