"""Module, Parameter and Sequential: names, state dicts, precision, routing of input gradients."""

import numpy as np
import pytest

from npcpu.nn import FusedLinearReLU, Linear, Parameter, ReLU, Sequential, work
from npcpu.optim.clip import clip_grad_value
from npcpu.precision import bfloat16


def make_model():
    return Sequential(FusedLinearReLU(5, 7, seed=0), ReLU(), Linear(7, 3, seed=1))


def test_names_follow_torch_and_parameters_know_them():
    model = make_model()
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [p.name for p in model.parameters()] == list(model.state_dict())
    assert model.num_parameters() == 7 * 5 + 7 + 3 * 7 + 3


def test_load_state_dict_checks_everything_before_changing_anything():
    model = make_model()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    bad = {k: v.copy() for k, v in before.items()}
    bad["2.weight"] = np.zeros((3, 8), np.float32)
    del bad["0.bias"]
    bad["extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(bad)
    message = str(info.value)
    assert "missing keys ['0.bias']" in message and "unexpected keys ['extra']" in message
    assert "'2.weight': expected shape (3, 7), got (3, 8)" in message
    for key, value in before.items():
        assert np.array_equal(model.state_dict()[key], value)


def test_load_state_dict_copies_and_converts_to_the_storage_dtype():
    source, target = make_model(), make_model().set_precision("bf16")
    state = {k: v * 2 for k, v in source.state_dict().items()}
    target.load_state_dict(state)
    for key, value in state.items():
        assert target.state_dict()[key].dtype == bfloat16
        np.testing.assert_array_equal(target.state_dict()[key], value.astype(bfloat16))
    state["0.weight"][...] = 0  # the model holds its own copy
    assert np.any(target.state_dict()["0.weight"] != 0)


def test_set_precision_rounds_to_nearest_and_drops_gradients():
    model = make_model()
    model[0].weight.grad_buffer()
    weight = model[0].weight.data.copy()
    model.set_precision("bf16")
    assert model[0].weight.grad is None and model[0].precision == "bf16"
    np.testing.assert_array_equal(model[0].weight.data, weight.astype(bfloat16))


def test_sequential_routes_input_gradients_around_frozen_layers():
    model = make_model()
    model.input_requires_grad = False
    model[0].freeze()
    model.forward(np.ones((2, 5), np.float32))
    assert [layer.input_requires_grad for layer in model] == [False, False, False]
    model[0].unfreeze()
    model.forward(np.ones((2, 5), np.float32))
    assert [layer.input_requires_grad for layer in model] == [False, True, True]


def test_a_model_called_directly_computes_no_input_gradient_unless_asked():
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    model = make_model()
    assert not model.input_requires_grad  # torch's default for an input that asks for nothing
    work.reset()
    model.forward(x)
    assert model.backward(dy) is None
    assert [layer.input_requires_grad for layer in model] == [False, True, True]
    assert work.counts["gemm"] == 2 + 3 and work.counts["gemm_skipped"] == 1  # no dx GEMM in layer 0
    assert all(p.grad is not None for p in model.parameters())
    model.input_requires_grad = True  # the opt-in
    model.forward(x)
    dx = model.backward(dy)
    assert dx.shape == x.shape and np.all(np.isfinite(dx)) and np.any(dx != 0)
    relu = ReLU()
    relu.forward(x)
    assert relu.backward(x) is None  # a layer used alone: no dL/dx either
    relu.input_requires_grad = True
    relu.forward(x)
    np.testing.assert_array_equal(relu.backward(x), np.maximum(x, 0))


def test_parameter_rejects_integer_data_and_sequential_non_modules():
    with pytest.raises(TypeError, match="floating point"):
        Parameter(np.arange(3), name="w")
    with pytest.raises(TypeError, match="item 1 is not a Module"):
        Sequential(Linear(2, 2), np.zeros(2))


def test_extra_state_of_a_plain_module_is_empty_and_strict():
    layer = Linear(2, 2)
    assert layer.extra_state() == {}
    with pytest.raises(ValueError, match="unexpected extra state"):
        layer.load_extra_state({"calls": 3})


def test_zero_grad_is_lazy_and_the_next_gemm_overwrites():
    p = Parameter(np.ones((2, 3), np.float32))
    assert p.grad_for_gemm()[1] == 0.0  # a new accumulator: nothing to add to
    p.grad[...] = np.nan                # what a GEMM with beta = 0 must never read
    p.zero_grad()
    grad, beta = p.grad_for_gemm()
    assert beta == 0.0 and grad is p._grad  # the zeros were not written...
    assert np.isnan(grad).all()
    grad[...] = 5.0                     # ...because the GEMM writes every element
    assert p.grad_for_gemm()[1] == 1.0  # and the next one adds
    p.zero_grad()
    np.testing.assert_array_equal(p.grad, 0.0)  # any other reader sees zeros
    p.zero_grad()
    np.testing.assert_array_equal(p.grad_buffer(), 0.0)  # so does an accumulator
    p.grad = None
    assert p.grad is None and p.grad_buffer().shape == (2, 3)


def test_linear_backward_after_zero_grad_gives_this_gradient_only():
    layer = Linear(5, 3, seed=0)
    layer.input_requires_grad = False
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 5), (4, 3)))
    layer.forward(x)
    layer.backward(dy)
    layer.weight.grad[...] = np.nan  # stale garbage must not survive zero_grad
    layer.zero_grad()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, dy.T @ x, rtol=1e-6)
    layer.forward(x)
    layer.backward(dy)  # the next backward accumulates
    np.testing.assert_allclose(layer.weight.grad, 2 * dy.T @ x, rtol=1e-6)


def test_reading_a_zeroed_gradient_writes_nothing_and_writers_get_the_accumulator():
    p = Parameter(np.ones((2, 3), np.float32))
    accumulator = p.grad_buffer()
    accumulator[...] = np.nan
    p.zero_grad()
    seen = p.grad
    np.testing.assert_array_equal(seen, 0.0)  # a reader sees zeros...
    assert np.isnan(accumulator).all()        # ...and the accumulator was not filled
    with pytest.raises(ValueError, match="read-only"):
        seen[0, 0] = 1.0                      # writing to what a reader got is an error, not lost
    p.zero_grad()
    clip_grad_value([p], 0.5)  # a writer (in place) gets the accumulator, zeros written first
    assert p.grad_buffer() is accumulator
    np.testing.assert_array_equal(accumulator, 0.0)


def test_work_counts_and_weight_block_buffers_are_per_thread():
    import threading

    from npcpu.nn import weight_blocks

    work.reset()
    work.record("gemm", 3)
    seen = {}

    def other_thread():
        work.record("gemm")
        seen["counts"] = dict(work.counts)
        seen["buffer"] = weight_blocks._scratch(2, 3, np.dtype(np.float32))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen["counts"] == {"gemm": 1} and work.counts["gemm"] == 3
    mine = weight_blocks._scratch(2, 3, np.dtype(np.float32))
    assert not np.shares_memory(mine, seen["buffer"])
