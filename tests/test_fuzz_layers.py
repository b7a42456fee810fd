"""Property-based fuzzing of every layer, loss and optimizer (tests/fuzzing.py: the outcomes).

Each gets arrays as hostile callers pass them: random shapes (empty batches and 0-d arrays
included), dtypes (int, bool, object, float16, bfloat16, float64, big-endian, complex), NaN and
Inf, non-contiguous and read-only layouts. The result, when there is one, must be the one the
same values give as a C-contiguous native float32 array, to the bit (a layer computes in float32
whatever it is given), and the input must be left as it was.
"""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzing import FUZZ, attempt, hostile_arrays, quiet, table_fixture
from npcpu.nn import (GELU, MLP, Block, CausalSelfAttention, CrossEntropyLoss, Dropout, Embedding,
                      Flatten, FusedLinearReLU, LayerNorm, Linear, MSELoss, Parameter, ReLU, Tanh)
from npcpu.optim import LAMB, SGD, Adam, AdamW, Lookahead

LAYERS = {
    "Linear": lambda f: Linear(f, 3, seed=0),
    "FusedLinearReLU": lambda f: FusedLinearReLU(f, 3, seed=0),
    "ReLU": lambda f: ReLU(),
    "GELU": lambda f: GELU(),
    "Tanh": lambda f: Tanh(),
    "Dropout": lambda f: Dropout(0.3, seed=1),
    "Flatten": lambda f: Flatten(),
    "LayerNorm": lambda f: LayerNorm(f),
    "MLP": lambda f: MLP(f),
    "CausalSelfAttention": lambda f: CausalSelfAttention(f, 2 if f % 2 == 0 else 1),
    "Block": lambda f: Block(f, 1),
}
# an error of a layer inside another (a Block's LayerNorm) names the inner one
LAYER_NAMES = (*LAYERS, "CausalSelfAttention", "LayerNorm", "Linear", "GELU", "Dropout")
OPTIMIZERS = {
    "SGD": lambda params, **kw: SGD(params, lr=0.1, momentum=0.9, **kw),
    "Adam": lambda params, **kw: Adam(params, lr=0.01, **kw),
    "AdamW": lambda params, **kw: AdamW(params, lr=0.01, **kw),
    "LAMB": lambda params, **kw: LAMB(params, lr=0.01, **kw),
    "Lookahead": lambda params, **kw: Lookahead(SGD(params, lr=0.1, **kw), k=2),
}

table = table_fixture(*(f"layer {name}" for name in LAYERS), "layer Embedding",
                      "loss CrossEntropyLoss", "loss MSELoss",
                      *(f"optimizer {name}" for name in OPTIMIZERS), "optimizer hyperparameters")


def canonical(x: np.ndarray) -> np.ndarray:
    """The same values as a C-contiguous native float32 array."""
    with quiet():
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def same(a, b) -> bool:
    if a.dtype == object or b.dtype == object:
        return a.shape == b.shape and a.dtype == b.dtype and all(
            x is y or x == y or (x != x and y != y) for x, y in zip(a.flat, b.flat))
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


LAYER_DTYPES = ("float32", "float32", "float64", "float16", "bfloat16", ">f4", ">f8", "int32",
                "bool", "object", "complex64")


@st.composite
def layer_cases(draw, name):
    # the sequence layers mostly get (B, T, C) inputs, else few would pass their shape check
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=3, max_size=3))) \
        if name in ("CausalSelfAttention", "Block") and draw(st.integers(0, 4)) else None
    x = draw(hostile_arrays(shape=shape, max_dims=4, max_side=5, dtypes=LAYER_DTYPES))
    # a layer built for the input's last dimension, mostly (else for another width)
    features = x.shape[-1] if x.ndim and x.shape[-1] > 0 and draw(st.booleans()) else \
        draw(st.integers(1, 5))
    precision = draw(st.sampled_from(("fp32", "fp32", "bf16")))
    return x, features, precision


@pytest.mark.parametrize("name", sorted(LAYERS))
@FUZZ
@given(st.data(), st.integers(0, 2**32 - 1))
def test_layers_give_the_float32_result_or_a_clear_error(name, data, seed):
    x, features, precision = data.draw(layer_cases(name))
    layer = LAYERS[name](features)
    layer.set_precision(precision)
    twin = copy.deepcopy(layer)
    before = x.copy()
    category = f"layer {name}"
    with quiet():
        ok, y = attempt(category, lambda: layer.forward(x), *LAYER_NAMES)
        assert same(x, before), "forward changed its input"
        if not ok:
            return
        assert same(y, twin.forward(canonical(x)))
        dy = np.random.default_rng(seed).standard_normal(y.shape).astype(np.float32)
        dy_strided = np.repeat(dy, 2, axis=-1)[..., ::2] if dy.ndim else dy
        dy_strided.flags.writeable = False
        ok, dx = attempt(category, lambda: layer.backward(dy_strided), *LAYER_NAMES)
    if ok:
        expected = twin.backward(dy)
        assert (dx is None) == (expected is None)
        if dx is not None:
            assert same(dx, expected)


@FUZZ
@given(hostile_arrays(max_dims=3, max_side=5, dtypes=("int64", "int32", "uint8", "bool", "float32",
                                                       "object", ">i8", "int8")),
       st.integers(-3, 7), st.sampled_from((None, 0, 2)))
def test_embedding_looks_up_rows_or_says_why_not(indices, shift, padding_idx):
    if indices.dtype.kind in "iu":  # mostly in range, some negative
        indices = indices.astype(np.int64) % 6 + min(shift, 0)
    layer = Embedding(6, 4, padding_idx=padding_idx, seed=0)
    ok, y = attempt("layer Embedding", lambda: layer.forward(indices), "Embedding")
    if ok:
        assert same(y, layer.weight.data[np.asarray(indices, dtype=np.int64)])


@st.composite
def loss_cases(draw):
    logits = draw(hostile_arrays(max_dims=3, max_side=5))
    classes = logits.shape[-1] if logits.ndim else 1
    # mostly the shape and an integer dtype the loss takes, else anything
    targets_shape = logits.shape[:-1] if logits.ndim and draw(st.integers(0, 3)) else \
        tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    targets = draw(hostile_arrays(shape=targets_shape, dtypes=(
        "int64", "int64", "int64", "int32", "float32", "bool", "object", ">i8")))
    if targets.dtype.kind in "iu":
        targets = np.abs(targets) % max(classes + draw(st.integers(0, 1)), 1)
    return logits, targets


def cross_entropy_reference(logits, targets):
    """(mean loss, dL/dlogits) in float64 from the float32 values."""
    x = canonical(logits).astype(np.float64).reshape(-1, logits.shape[-1])
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(t)), t].mean()
    grad = np.exp(log_probs)
    grad[np.arange(len(t)), t] -= 1
    return loss, (grad / len(t)).reshape(logits.shape)


@settings(FUZZ, max_examples=150)
@given(loss_cases())
def test_cross_entropy_is_right_or_says_why_not(case):
    logits, targets = case
    loss_fn = CrossEntropyLoss()
    with quiet():
        ok, loss = attempt("loss CrossEntropyLoss", lambda: loss_fn(logits, targets),
                           "CrossEntropyLoss")
        if not ok:
            return
        ok, grad = attempt("loss CrossEntropyLoss", loss_fn.backward, "CrossEntropyLoss")
        expected_loss, expected_grad = cross_entropy_reference(logits, targets)
    if np.isfinite(expected_loss):
        assert loss == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)
        assert ok and np.allclose(grad, expected_grad, rtol=1e-3, atol=1e-5)
    else:
        assert not np.isfinite(loss)


@FUZZ
@given(hostile_arrays(max_dims=3, max_side=5), st.data())
def test_mse_is_right_or_says_why_not(outputs, data):
    shape = outputs.shape if data.draw(st.integers(0, 3)) else data.draw(
        st.lists(st.integers(0, 4), max_size=3).map(tuple))
    targets = data.draw(hostile_arrays(shape=shape))
    loss_fn = MSELoss()
    with quiet():
        ok, loss = attempt("loss MSELoss", lambda: loss_fn(outputs, targets), "MSELoss")
        if not ok:
            return
        a, b = canonical(outputs).astype(np.float64), canonical(targets).astype(np.float64)
        expected = np.mean((a - b) ** 2)
    if np.isfinite(expected):
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-6)


@st.composite
def optimizer_cases(draw):
    data = draw(hostile_arrays(max_dims=3, max_side=5, dtypes=("float32", "float64", "float16",
                                                                "bfloat16", ">f4", "int32")))
    grad_shape = data.shape if draw(st.booleans()) else draw(
        st.lists(st.integers(0, 4), max_size=3).map(tuple))
    grad = draw(hostile_arrays(shape=grad_shape, dtypes=("float32", "float64", "float16", ">f4",
                                                          "int32", "object")))
    return data, grad


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@FUZZ
@given(optimizer_cases())
def test_optimizers_step_as_on_a_clean_gradient_or_say_why_not(name, case):
    data, grad = case
    category = f"optimizer {name}"
    ok, param = attempt(category, lambda: Parameter(data, name="w"), "Parameter", "w")
    if not ok:
        return
    twin = copy.deepcopy(param)
    optimizer, reference = OPTIMIZERS[name]([param]), OPTIMIZERS[name]([twin])
    before = grad.copy()
    param.grad = grad
    with quiet():
        ok, _ = attempt(category, optimizer.step, name, "w")
        assert same(grad, before), "step changed the gradient it was given"
        if not ok:
            return
        twin.grad = np.ascontiguousarray(grad, dtype=grad.dtype.newbyteorder("="))
        reference.step()
    assert same(param.data, twin.data)


@FUZZ
@given(st.sampled_from(sorted(OPTIMIZERS)), st.sampled_from(("lr", "momentum", "weight_decay",
                                                             "betas", "eps", "state_dtype")),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                 st.text(max_size=3), st.none(), st.booleans(),
                 st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True))))
def test_optimizer_hyperparameters_are_checked(name, key, value):
    build = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW, "LAMB": LAMB,
             "Lookahead": lambda params, **kw: Lookahead(SGD(params, **kw))}[name]
    if key in ("momentum",) and name not in ("SGD", "Lookahead"):
        return
    if key in ("betas", "eps") and name in ("SGD", "Lookahead"):
        return
    param = Parameter(np.ones(3, np.float32), name="w")
    ok, optimizer = attempt("optimizer hyperparameters", lambda: build([param], **{key: value}),
                            key)
    if ok:  # accepted: one step on a finite gradient runs
        param.grad = np.ones(3, np.float32)
        with quiet():
            attempt("optimizer hyperparameters", optimizer.step, key)
