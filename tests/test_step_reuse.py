"""What a small model's step reuses between calls (Optimizer.step's TensorStep, the loss's row
workspace) changes no result and lets no bad input through: `step()` equals the reference
(`begin_update` on each whole tensor, which makes everything afresh) bit for bit over runs that
change what a step is made from, and a bad gradient, input or target after good calls is still
refused."""

import numpy as np
import pytest

from npcpu.nn.linear import Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import AdamW
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16


def reference_step(optimizer):
    """step() as the optimizer defines it: each unfrozen parameter with a gradient updated by
    `begin_update` (its whole gradient, made contiguous, at once)."""
    for _, p in optimizer.indexed_params():
        if not p.frozen and p.grad is not None:
            optimizer.begin_update(p)(np.ascontiguousarray(p.grad).reshape(-1))


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(shape).astype(np.float32).astype(dtype), name=name)
            for name, shape in (("w", (7, 13)), ("b", (13,)), ("v", (3, 1030)))]


def run(optimizer_class, kwargs, dtype, use_reference, steps=12):
    """`steps` steps on three parameters with a script of changes between them; the parameters'
    values and the optimizer's state at the end."""
    params = make_params(dtype)
    optimizer = optimizer_class(params, **kwargs)
    rng = np.random.default_rng(1)
    for t in range(steps):
        for p in params:
            if t == 4 and p.name == "w":
                p.grad = np.asfortranarray(rng.standard_normal(p.shape).astype(p.compute_dtype))
            elif t != 7 or p.name != "b":  # at step 7 b keeps the gradient of step 6
                p.grad_buffer()[...] = rng.standard_normal(p.shape)
        if t == 3:
            optimizer.param_groups[0]["lr"] *= 0.5  # a schedule
        if t == 5 and "momentum" in optimizer.param_groups[0]:
            optimizer.param_groups[0]["momentum"] = 0.9  # a momentum switched on mid-run
        params[2].frozen = t in (6, 9)
        if t == 8:  # a state dict loaded mid-run: new state dicts, the same values
            optimizer.load_state_dict(optimizer.state_dict())
        if t == 10:
            params[1].grad = None  # no gradient: not updated
        (reference_step if use_reference else type(optimizer).step)(optimizer)
        if t == 11:
            optimizer.zero_grad()
    values = [optimizer.param_values(p) for p in params]
    arrays = {(index, name): a for index, s in optimizer.state.items() for name, a in s.items()}
    return values, arrays


@pytest.mark.parametrize("optimizer_class, kwargs, dtype", [
    (SGD, dict(lr=0.1), np.float32),
    (SGD, dict(lr=0.1, momentum=0.5, weight_decay=0.01, nesterov=True), np.float32),
    (SGD, dict(lr=0.1, momentum=0.9, state_dtype="bf16"), np.float32),
    (SGD, dict(lr=0.1), np.float64),
    (SGD, dict(lr=0.05, momentum=0.9), bfloat16),
    (AdamW, dict(lr=0.01), np.float32),
    (AdamW, dict(lr=0.01, state_dtype="bf16", amsgrad=True), np.float32),
    (AdamW, dict(lr=0.01, master_weights=True), bfloat16),
    (AdamW, dict(lr=0.01), np.float16),
])
def test_step_equals_the_reference_bit_for_bit(optimizer_class, kwargs, dtype):
    values, states = run(optimizer_class, kwargs, dtype, use_reference=False)
    ref_values, ref_states = run(optimizer_class, kwargs, dtype, use_reference=True)
    for value, ref in zip(values, ref_values):
        np.testing.assert_array_equal(value, ref)
    assert states.keys() == ref_states.keys()
    for key, ref in ref_states.items():
        np.testing.assert_array_equal(states[key], ref, err_msg=str(key))
    assert not np.array_equal(values[0], make_params(dtype)[0].values())  # the steps did move w


def test_step_reuses_a_parameters_update_only_while_it_fits():
    p = Parameter(np.ones((4, 5), np.float32), name="w")
    optimizer = SGD([p], lr=0.1)
    p.grad_buffer()[...] = 1.0
    optimizer.step()
    first = optimizer._tensor_steps[0]
    optimizer.step()
    assert optimizer._tensor_steps[0] is first  # the same accumulator: reused
    p.grad = np.ones((4, 5), np.float32)
    optimizer.step()
    assert optimizer._tensor_steps[0] is not first  # another gradient array: made afresh
    assert optimizer.state[0]["step"] == 3
    p.grad = None
    optimizer.step()
    assert 0 not in optimizer._tensor_steps  # a parameter not updated: none of its arrays kept


@pytest.mark.parametrize("bad, error, match", [
    (np.ones((5, 4), np.float32), ValueError, r"gradient of shape \(5, 4\), expected \(4, 5\)"),
    (np.ones((4, 5), np.float64), TypeError, "float64 gradient, expected float32"),
    ("not an array", ValueError, "gradient of shape str"),
])
def test_a_bad_gradient_after_good_steps_is_refused(bad, error, match):
    p = Parameter(np.ones((4, 5), np.float32), name="w")
    optimizer = SGD([p], lr=0.1)
    for _ in range(3):
        p.grad_buffer()[...] = 1.0
        optimizer.step()
    before = p.data.copy()
    p.grad = bad
    with pytest.raises(error, match=match):
        optimizer.step()
    np.testing.assert_array_equal(p.data, before)


def test_a_gradient_reshaped_in_place_after_good_steps_is_refused():
    p = Parameter(np.ones((4, 5), np.float32), name="w")
    optimizer = SGD([p], lr=0.1)
    for _ in range(2):
        p.grad_buffer()[...] = 1.0
        optimizer.step()
    p.grad_buffer().shape = (5, 4)  # the same array object, another shape
    with pytest.raises(ValueError, match=r"gradient of shape \(5, 4\)"):
        optimizer.step()


def test_a_nonfinite_update_in_place_after_good_steps_is_still_refused():
    p = Parameter(np.ones(8, np.float32).astype(bfloat16), name="w")
    optimizer = SGD([p], lr=0.1)
    for _ in range(2):
        p.grad_buffer()[...] = 1.0
        optimizer.step()
    p.grad_buffer()[3] = np.nan
    with pytest.raises(FloatingPointError, match="Inf or NaN"):
        optimizer.step()


def test_a_bad_input_target_or_gradient_after_good_calls_is_refused():
    layer, loss = Linear(6, 3, seed=0), CrossEntropyLoss()
    x, y = np.random.default_rng(0).random((5, 6), dtype=np.float32), np.array([0, 2, 1, 1, 0])
    for _ in range(3):
        loss(layer(x), y)
        layer.backward(loss.backward())
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 6\)"):
        layer(x[:, :5])
    with pytest.raises(TypeError, match="floating-point input"):
        layer(x.astype(np.int32))
    with pytest.raises(ValueError, match="target 3 is out of range"):
        loss(layer(x), np.array([0, 2, 3, 1, 0]))
    with pytest.raises(TypeError, match="integer array"):
        loss(layer(x), y.astype(np.float32))
    layer(x)
    with pytest.raises(ValueError, match=r"gradient of shape \(5, 3\), got \(4, 3\)"):
        layer.backward(np.ones((4, 3), np.float32))
    assert np.isnan(loss(np.full((5, 3), np.nan, np.float32), y))  # NaN passes, as documented


def test_the_loss_row_workspace_follows_the_batch_size():
    loss, rng = CrossEntropyLoss(), np.random.default_rng(0)
    for rows in (5, 3, 300, 5):  # smaller, and past the short-sum length (NumPy's sum)
        logits = rng.standard_normal((rows, 4)).astype(np.float32)
        targets = rng.integers(0, 4, rows)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_softmax = shifted.astype(np.float64) - np.log(np.exp(shifted.astype(np.float64)).sum(
            axis=1, keepdims=True))
        expected = -log_softmax[np.arange(rows), targets].mean()
        np.testing.assert_allclose(loss(logits, targets), expected, rtol=1e-6)
