"""CausalSelfAttention, MLP and Block: kernels against NumPy, float64 gradients, torch parity."""

import sys

import numpy as np
import pytest

from npcpu import backend
from npcpu.kernels.attention import causal_softmax_backward, causal_softmax_forward
from npcpu.nn import MLP, Block, CausalSelfAttention, Dropout, KVCache, Module
from bench import nanogpt_torch
from tests.gradcheck import check_layer_gradients
from tests.torchcheck import assert_forward_backward_match_torch


# -- the kernels against their plain-NumPy statement ---------------------------------------------

def causal_softmax_numpy(scores, offset):
    """Softmax of each row t over keys 0 .. offset + t; zeros at the masked keys."""
    queries, keys = scores.shape[-2:]
    allowed = np.arange(keys)[None, :] <= np.arange(queries)[:, None] + offset
    masked = np.where(allowed, scores.astype(np.float64), -np.inf)
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("groups, queries, keys, offset", [(1, 1, 1, 0), (3, 7, 7, 0), (2, 3, 11, 8),
                                                           (5, 1, 9, 8)])
def test_causal_softmax_kernels_match_numpy(num_threads, groups, queries, keys, offset, dtype, rtol):
    rng = np.random.default_rng(queries * keys + offset)
    scores = (rng.standard_normal((groups, queries, keys)) * 4).astype(dtype)
    probs, scale = scores.copy(), 0.7
    causal_softmax_forward(probs, offset, scale)
    expected = causal_softmax_numpy(scale * scores, offset)
    np.testing.assert_allclose(probs, expected, rtol=rtol, atol=rtol * 1e-2)
    assert np.all(probs[expected == 0] == 0)  # masked keys are exact zeros

    dprobs = rng.standard_normal(probs.shape).astype(dtype)
    dscores = dprobs.copy()
    causal_softmax_backward(dscores, probs, offset, scale)
    dot = (dprobs * expected).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(dscores, scale * expected * (dprobs - dot), rtol=rtol * 10,
                               atol=rtol)


def test_masked_keys_do_not_leak_inf_into_the_gradient():
    probs = np.zeros((1, 2, 2))
    causal_softmax_forward(probs, 0, 1.0)
    dprobs = np.array([[[1.0, np.inf], [2.0, 3.0]]])
    causal_softmax_backward(dprobs, probs, 0, 1.0)
    assert np.isfinite(dprobs).all()


# -- float64 central differences -----------------------------------------------------------------

class FixedMasks(Module):
    """Runs `inner` with every Dropout's call counter reset first, so that repeated forward passes
    (the central differences) see the same masks."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.inner.input_requires_grad = self.input_requires_grad
        for m in self.inner.modules():
            if isinstance(m, Dropout):
                m.calls = 0
        return self.inner.forward(x)

    def backward(self, dy):
        return self.inner.backward(dy)


def randomize(module, rng, scale=0.5):
    for p in module.parameters():
        p.data[...] = rng.standard_normal(p.shape) * scale


SHAPES = [(2, 5, 6, 2), (1, 1, 6, 1), (2, 7, 10, 5), (1, 4, 9, 1)]  # (B, T, C, H)


@pytest.mark.parametrize("batch, steps, channels, heads", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_attention_gradients(batch, steps, channels, heads, bias):
    rng = np.random.default_rng(steps * channels + heads)
    layer = CausalSelfAttention(channels, heads, bias=bias)
    randomize(layer, rng)
    check_layer_gradients(layer, rng.standard_normal((batch, steps, channels)), rng, rtol=1e-5,
                          atol=1e-8)


def test_attention_gradients_with_dropout():
    rng = np.random.default_rng(7)
    layer = FixedMasks(CausalSelfAttention(6, 2, dropout=0.3, seed=5))
    randomize(layer, rng)
    check_layer_gradients(layer, rng.standard_normal((2, 5, 6)), rng, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_block_gradients(approximate, bias):
    rng = np.random.default_rng(11)
    block = FixedMasks(Block(10, 2, dropout=0.2, bias=bias, approximate=approximate, seed=3))
    randomize(block, rng)
    check_layer_gradients(block, rng.standard_normal((2, 3, 10)), rng, rtol=1e-5, atol=1e-8)


def test_mlp_gradients():
    rng = np.random.default_rng(12)
    mlp = MLP(5, approximate="tanh")
    randomize(mlp, rng)
    check_layer_gradients(mlp, rng.standard_normal((1, 3, 5)), rng, rtol=1e-5, atol=1e-8)


def test_n_embd_not_divisible_by_n_head_is_named():
    with pytest.raises(ValueError, match="n_embd .10. must be a positive multiple of n_head .3."):
        CausalSelfAttention(10, 3)


# -- parity with torch (float32) -----------------------------------------------------------------

def assert_parameter_grads_match(module, reference):
    grads = dict(reference.named_parameters())
    for name, p in module.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name].grad.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("kind", ["attention", "mlp", "block"])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_match_torch(torch, kind, bias):
    reference_classes = nanogpt_torch.build(torch)
    rng = np.random.default_rng(21)
    channels, heads = 12, 3
    if kind == "attention":
        module, reference = CausalSelfAttention(channels, heads, bias=bias), \
            reference_classes["CausalSelfAttention"](channels, heads, bias)
    elif kind == "mlp":
        module, reference = MLP(channels, bias=bias, approximate="tanh"), \
            reference_classes["MLP"](channels, bias, "tanh")
    else:
        module, reference = Block(channels, heads, bias=bias), \
            reference_classes["Block"](channels, heads, bias)
    randomize(module, rng, scale=0.2)  # activations of order one, as in a trained model
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in module.state_dict().items()})
    x = rng.standard_normal((2, 9, channels)).astype(np.float32)
    upstream = rng.standard_normal((2, 9, channels)).astype(np.float32)
    assert_forward_backward_match_torch(torch, module, reference, x, upstream)
    assert_parameter_grads_match(module, reference)


# -- the key/value cache -------------------------------------------------------------------------

def test_cached_attention_equals_full_attention():
    rng = np.random.default_rng(31)
    layer = CausalSelfAttention(8, 2)
    randomize(layer, rng)
    layer.eval()
    x = rng.standard_normal((2, 7, 8)).astype(np.float32)
    full = layer.forward(x)
    cache = KVCache(1, 2, 2, 7, 4, np.float32)
    pieces = []
    for start, stop in ((0, 3), (3, 4), (4, 7)):  # a prefix, one token, then several
        pieces.append(layer.forward(x[:, start:stop], cache, 0))
        cache.length = stop
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [3, 1])  # pairs split by batch rows, or by heads
def test_attention_does_not_depend_on_the_thread_count(batch):
    import numba

    rng = np.random.default_rng(41)
    x = rng.standard_normal((batch, 6, 8)).astype(np.float32)
    dy = rng.standard_normal((batch, 6, 8)).astype(np.float32)
    results = []
    previous = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            layer = CausalSelfAttention(8, 2)
            randomize(layer, np.random.default_rng(42))
            out = layer.forward(x)
            dx = layer.backward(dy)
            results.append((out, dx, layer.c_attn.weight.grad.copy()))
    finally:
        numba.set_num_threads(previous)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_attention_runs_in_a_forked_child_after_the_parent_ran_it():
    import multiprocessing

    layer = CausalSelfAttention(8, 2)
    x = np.random.default_rng(43).standard_normal((3, 6, 8)).astype(np.float32)
    expected = layer.forward(x)  # the parent's GEMM thread pool now exists
    if backend.threading_info()["layer"] == "omp" and sys.platform.startswith("linux"):
        pytest.skip("Numba's GNU OpenMP layer (Linux without tbb, e.g. aarch64) terminates a "
                    "forked child that runs a kernel after its parent did: fork is unsupported there")
    with multiprocessing.get_context("fork").Pool(1) as pool:
        # a pool inherited without its threads would wait forever: fail after a minute instead
        np.testing.assert_array_equal(pool.apply_async(layer.forward, (x,)).get(timeout=60),
                                      expected)
