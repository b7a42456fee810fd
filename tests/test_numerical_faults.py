"""Numerical faults: a non-finite loss or gradient without a loss scaler stops the run naming the
step and the first layer whose gradient is non-finite; an update that overflows a 16-bit
parameter's storage is an error naming the parameter, and is not stored."""

import io

import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.scaling import DynamicLossScaler
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16, overflow_threshold
from npcpu.train.callbacks import Callback
from npcpu.train.trainer import Trainer


def make_data(n=64, d=12, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return ArrayDataset(x, np.argmax(x @ rng.standard_normal((d, classes)), axis=1))


def make_model():
    return Sequential(FusedLinearReLU(12, 16, seed=0), FusedLinearReLU(16, 16, seed=1),
                      Linear(16, 5, seed=2))


def poison_gradient_at_call(layer, parameter: str, call: int, value=np.inf):
    """Make `layer`'s backward write `value` into one entry of its `parameter` gradient at its
    `call`-th backward (the loss stays finite: the forward is untouched)."""
    original, calls = layer.backward, [0]

    def backward(dy):
        result = original(dy)
        calls[0] += 1
        if calls[0] == call:
            getattr(layer, parameter).grad.reshape(-1)[3] = value
        return result

    layer.backward = backward


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_non_finite_gradient_with_finite_loss_stops_naming_step_and_layer(clip, value):
    model = make_model()
    poison_gradient_at_call(model[1], "bias", call=3, value=value)
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      clip_grad_norm=clip, compiled="off", log_stream=io.StringIO())
    trainer.fit(make_data(), max_steps=2, batch_size=16, progress=False)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError) as raised:
        trainer.fit(make_data(), max_steps=4, batch_size=16, progress=False)
    message = str(raised.value)
    assert "at step 3 (epoch 0)" in message and "finite loss" in message
    assert "first in layer '1' (FusedLinearReLU), parameter 1.bias; 1 of 6" in message
    assert trainer.step == 2
    for key, array in model.state_dict().items():  # the step was not taken
        np.testing.assert_array_equal(array, before[key], err_msg=key)


@pytest.mark.parametrize("compiled", ["auto", "off"])  # auto: the compiled step applies here
def test_non_finite_loss_names_the_first_layer_with_a_non_finite_gradient(compiled):
    data = make_data()
    data.x[5, 2] = np.nan
    model = make_model()
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      compiled=compiled, log_stream=io.StringIO())
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(epoch 0\); non-finite "
                                                 r"gradient first in layer '0' \(FusedLinearReLU\)"
                                                 r", parameter 0.weight.*micro-batch\(es\) \[0\]"):
        trainer.fit(data, max_steps=1, batch_size=64, progress=False)


def test_under_a_loss_scaler_a_non_finite_gradient_is_skipped_and_counted():
    model = make_model()
    poison_gradient_at_call(model[1], "bias", call=2)
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      loss_scaler=DynamicLossScaler(init_scale=8.0), compiled="off",
                      log_stream=io.StringIO())
    trainer.fit(make_data(), max_steps=3, batch_size=16, progress=False)
    assert trainer.step == 3 and trainer.skipped_steps == 1


class StateAfterEachStep(Callback):
    def __init__(self):
        self.states = []

    def on_step_end(self, trainer, metrics):
        self.states.append({k: v.copy() for k, v in trainer.model.state_dict().items()})


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_on_nonfinite_skip_logs_the_layer_skips_the_step_and_counts_it(value):
    model = make_model()
    poison_gradient_at_call(model[1], "bias", call=3, value=value)
    log, states = io.StringIO(), StateAfterEachStep()
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      on_nonfinite="skip", callbacks=[states], log_stream=log)
    trainer.fit(make_data(), max_steps=4, batch_size=16, progress=False)
    text = log.getvalue()
    assert "compiled step: off (non-finite steps are skipped" in text
    assert ("skipped the optimizer step: gradient norm is" in text and "at step 3 (epoch 0)" in text
            and "first in layer '1' (FusedLinearReLU), parameter 1.bias" in text)
    assert trainer.step == 4 and trainer.skipped_steps == 1
    for key in states.states[1]:
        np.testing.assert_array_equal(states.states[2][key], states.states[1][key], err_msg=key)
        assert np.all(np.isfinite(states.states[3][key])), key
    assert any(not np.array_equal(states.states[3][k], states.states[2][k]) for k in states.states[2])


def test_on_nonfinite_is_checked_and_excludes_updates_inside_backward():
    model = make_model()
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip', got 'ignore'"):
        Trainer(model, CrossEntropyLoss(), SGD(model.parameters()), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="non-finite steps are skipped"):
        Trainer(model, CrossEntropyLoss(), SGD(model.parameters()), on_nonfinite="skip",
                update_in_backward=True)


# -- 16-bit parameter storage --------------------------------------------------------------------
def test_overflow_thresholds_are_where_rounding_reaches_inf():
    for dtype in (np.dtype(np.float16), bfloat16):
        threshold = np.float32(overflow_threshold(dtype))
        below = np.nextafter(threshold, np.float32(0))
        with np.errstate(over="ignore"):
            assert np.isinf(np.array([threshold]).astype(dtype)[0].astype(np.float32)), dtype
        assert np.isfinite(np.array([below]).astype(dtype)[0].astype(np.float32)), dtype


@pytest.mark.parametrize("make_optimizer", [
    lambda p, size: SGD([p], lr=size, master_weights=True),
    lambda p, size: SGD([p], lr=size, momentum=0.9, master_weights=True),
    lambda p, size: Adam([p], lr=size, master_weights=True),  # a first Adam step moves by ~lr
], ids=["sgd", "sgd-momentum", "adam"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_update_that_overflows_16_bit_storage_is_an_error_and_not_stored(make_optimizer, dtype):
    """Through the float32 master copy (always for float16; bfloat16 with master_weights): the
    new value is finite in float32 but beyond what the 16-bit storage holds. (A bfloat16 parameter
    updated in place is checked after the kernel: test_inplace_overflow.)"""
    dtype = np.dtype(np.float16) if dtype == "float16" else bfloat16
    # float16: 60000 + 15000; bfloat16: its largest finite + 1e36, below float32's largest
    top, size = (60000.0, 15000.0) if dtype == np.float16 else (3.3895e38, 1e36)
    p = Parameter(np.array([top, 1.0, -2.0, 0.5, 7.0], np.float32).astype(dtype), "fc.weight")
    optimizer = make_optimizer(p, size)
    p.grad = np.array([-1.0, 0, 0, 0, 0], np.float32)
    before = p.data.copy()
    with pytest.raises(FloatingPointError, match=rf"{type(optimizer).__name__}: the update of "
                                                 rf"Parameter\('fc.weight'.*overflows {dtype}"):
        optimizer.step()
    np.testing.assert_array_equal(p.data.view(np.uint16), before.view(np.uint16))


def test_an_update_that_fits_is_stored_unchanged_by_the_check():
    p = Parameter(np.array([60000.0, 1.0], np.float16), "w")
    optimizer = SGD([p], lr=1.0)
    p.grad = np.array([-5000.0, 0.5], np.float32)  # 65000 rounds to 64992, finite
    optimizer.step()
    assert p.data.tolist() == [np.float16(65000.0), np.float16(0.5)]
