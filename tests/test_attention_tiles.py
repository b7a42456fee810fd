"""npcpu.kernels.attention_tiles (attention on the native float32 tile) against plain NumPy, and
the attention layer on it against the batched-GEMM path."""

import math

import numpy as np
import pytest

from npcpu import backend
from npcpu.nn import CausalSelfAttention
from npcpu.nn import attention as attention_module

pytestmark = pytest.mark.skipif(backend.native_f32_gemm_unavailable() is not None,
                                reason=f"native float32 tile unavailable: "
                                       f"{backend.native_f32_gemm_unavailable()}")

COLUMNS = 32  # the tile's width, as the packed layouts below spell out


def pack_rows_numpy(x):
    rows, depth = x.shape
    panels = -(-depth // COLUMNS)
    padded = np.zeros((rows, panels * COLUMNS), np.float32)
    padded[:, :depth] = x
    return padded.reshape(rows, panels, COLUMNS).transpose(1, 0, 2).reshape(-1)


def pack_transposed_numpy(x):
    rows, depth = x.shape
    panels, padded_depth = -(-rows // COLUMNS), -(-depth // COLUMNS) * COLUMNS
    padded = np.zeros((panels * COLUMNS, padded_depth), np.float32)
    padded[:rows, :depth] = x
    return padded.reshape(panels, COLUMNS, padded_depth).transpose(0, 2, 1).reshape(-1)


def attention_numpy(q, k, v, dy, offset, scale):
    """probs, y, dq, dk, dv in float64: the module docstring's lines, the mask as -inf."""
    q, k, v, dy = (a.astype(np.float64) for a in (q, k, v, dy))
    queries, keys = q.shape[2], k.shape[2]
    scores = scale * q @ k.swapaxes(-1, -2)
    scores[..., np.arange(keys)[None, :] > offset + np.arange(queries)[:, None]] = -np.inf
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    dprobs = dy @ v.swapaxes(-1, -2)
    dscores = scale * probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
    return (probs, probs @ v, dscores @ k, dscores.swapaxes(-1, -2) @ q,
            probs.swapaxes(-1, -2) @ dy)


@pytest.mark.parametrize("rows, depth", [(1, 1), (7, 5), (33, 32), (64, 45), (65, 70)])
def test_packing_matches_numpy(rows, depth):
    from npcpu.kernels.attention_tiles import pack_rows, pack_transposed

    x = np.random.default_rng(rows * depth).standard_normal((rows, depth)).astype(np.float32)
    strided = np.empty((rows, 2 * depth), np.float32)[:, ::2]  # a head's view: not contiguous
    strided[...] = x
    out = np.full(-(-depth // COLUMNS) * rows * COLUMNS, np.nan, np.float32)
    pack_rows(strided, out)
    np.testing.assert_array_equal(out, pack_rows_numpy(x))
    out = np.full(-(-rows // COLUMNS) * -(-depth // COLUMNS) * COLUMNS ** 2, np.nan, np.float32)
    pack_transposed(strided, out)
    np.testing.assert_array_equal(out, pack_transposed_numpy(x))


@pytest.mark.parametrize("batch, heads, queries, keys, depth", [
    (2, 3, 17, 17, 5),      # odd sizes, one partial tile of keys
    (3, 4, 64, 64, 32),     # gpt-char's attention
    (1, 2, 33, 33, 45),     # two panels of the head size, the second partial
    (2, 1, 70, 70, 64),     # three panels of keys, row tiles straddling them
    (1, 2, 5, 40, 33),      # a key/value cache: queries after 35 cached positions
    (2, 2, 1, 9, 8),        # one new token (generation)
])
def test_attention_tiles_match_numpy(num_threads, batch, heads, queries, keys, depth):
    from npcpu.kernels.attention_tiles import attention_backward, attention_forward

    rng = np.random.default_rng(batch * queries * keys + depth)
    offset, scale = keys - queries, 1.0 / math.sqrt(depth)
    # q, k, v and dy as heads of (B, T, .) arrays, strided as the layer passes them
    qkv = rng.standard_normal((batch, keys, 3, heads, depth)).astype(np.float32)
    q = qkv[:, offset:, 0].transpose(0, 2, 1, 3)
    k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in (1, 2))
    dy = rng.standard_normal((batch, queries, heads, depth)).astype(np.float32).transpose(0, 2, 1, 3)
    probs = np.full((batch, heads, queries, keys), np.nan, np.float32)
    y = np.full((batch, queries, heads, depth), np.nan, np.float32).transpose(0, 2, 1, 3)
    attention_forward(q, k, v, probs, y, offset, scale)
    grads = [np.full(a.shape, np.nan, np.float32) for a in (q, k, v)]
    attention_backward(dy, q, k, v, probs, *grads, offset, scale)

    expected = attention_numpy(q, k, v, dy, offset, scale)
    assert np.all(probs[expected[0] == 0] == 0)  # masked keys are exact zeros
    for name, got, want in zip(("probs", "y", "dq", "dk", "dv"), (probs, y, *grads), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6, err_msg=name)


@pytest.fixture
def layers():
    """Two CausalSelfAttention layers with the same weights (odd sizes: C = 15, H = 3, D = 5)."""
    rng = np.random.default_rng(7)
    made = [CausalSelfAttention(15, 3, seed=1) for _ in range(2)]
    for layer in made:
        layer.input_requires_grad = True
    for p, q in zip(made[0].parameters(), made[1].parameters()):
        p.data[...] = q.data[...] = rng.standard_normal(p.shape) * 0.3
    return made


def run_layer(layer, x, dy):
    out = layer.forward(x)
    dx = layer.backward(dy)
    return out, dx, *(p.grad.copy() for p in layer.parameters())


def test_layer_on_tiles_equals_the_batched_gemms(layers, native_f32_gemm):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 19, 15)).astype(np.float32)
    dy = rng.standard_normal((3, 19, 15)).astype(np.float32)
    tiles = run_layer(layers[0], x, dy)
    assert layers[0]._on_tiles
    original = attention_module.on_tiles
    attention_module.on_tiles = lambda dtype: False
    try:
        batched = run_layer(layers[1], x, dy)
    finally:
        attention_module.on_tiles = original
    assert not layers[1]._on_tiles
    for got, want in zip(tiles, batched):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_float64_and_the_blas_setting_take_the_batched_gemms(native_f32_gemm):
    x = np.random.default_rng(9).standard_normal((2, 6, 8)).astype(np.float32)
    dropping = CausalSelfAttention(8, 2, dropout=0.3)
    dropping.forward(x)
    assert not dropping._on_tiles  # the mask is applied between the softmax and the product
    dropping.eval()
    dropping.forward(x)
    assert dropping._on_tiles  # eval mode drops nothing
    assert not attention_module.on_tiles(np.dtype(np.float64))
    assert attention_module.on_tiles(np.dtype(np.float32))
    backend.set_f32_gemm("blas")
    try:
        assert not attention_module.on_tiles(np.dtype(np.float32))
    finally:
        backend.set_f32_gemm("native")
