"""npcpu.kernels.attention_tiles (attention on the native float32 tile) against plain NumPy, and
the attention layer on it against the batched-GEMM path."""

import math

import numpy as np
import pytest

from npcpu import backend
from npcpu.nn import CausalSelfAttention, KVCache
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


def heads_source(x):
    """X (R, D) as head 1 of part 1 of a (1, R, 3, 2, D) array, the kernels' source layout."""
    source = np.full((1, x.shape[0], 3, 2, x.shape[1]), np.nan, np.float32)
    source[0, :, 1, 1] = x
    return source


@pytest.mark.parametrize("rows, depth", [(1, 1), (7, 5), (33, 32), (64, 45), (65, 70)])
def test_packing_matches_numpy(rows, depth):
    from npcpu.kernels.attention_tiles import pack_rows, pack_transposed

    x = np.random.default_rng(rows * depth).standard_normal((rows, depth)).astype(np.float32)
    out = np.full(-(-depth // COLUMNS) * rows * COLUMNS, np.nan, np.float32)
    pack_rows(heads_source(x), 0, 1, 1, out)
    np.testing.assert_array_equal(out, pack_rows_numpy(x))
    out = np.full(-(-rows // COLUMNS) * -(-depth // COLUMNS) * COLUMNS ** 2, np.nan, np.float32)
    pack_transposed(heads_source(x), 0, 1, 1, out)
    np.testing.assert_array_equal(out, pack_transposed_numpy(x))


@pytest.mark.parametrize("batch, heads, steps, depth", [
    (2, 3, 17, 5),      # odd sizes, one partial tile of keys
    (3, 4, 64, 32),     # gpt-char's attention
    (1, 2, 33, 45),     # two panels of the head size, the second partial
    (2, 1, 70, 64),     # three panels of keys, row tiles straddling them
    (2, 2, 1, 8),       # one position
])
def test_attention_tiles_match_numpy(num_threads, batch, heads, steps, depth):
    from npcpu.kernels.attention_tiles import attention_backward, attention_forward

    rng = np.random.default_rng(batch * steps + depth)
    scale = 1.0 / math.sqrt(depth)
    qkv = rng.standard_normal((batch, steps, 3, heads, depth)).astype(np.float32)
    dy = rng.standard_normal((batch, steps, heads, depth)).astype(np.float32)
    probs = np.full((batch, heads, steps, steps), np.nan, np.float32)
    y = np.full((batch, steps, heads, depth), np.nan, np.float32)
    attention_forward(qkv, probs, y, scale)
    dqkv = np.full_like(qkv, np.nan)
    attention_backward(dy, qkv, probs, dqkv, scale)

    by_head = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (B, T, H, D) -> (B, H, T, D)
    q, k, v = (by_head(qkv[:, :, i]) for i in range(3))
    expected = attention_numpy(q, k, v, by_head(dy), 0, scale)
    assert np.all(probs[expected[0] == 0] == 0)  # masked keys are exact zeros
    got = (probs, by_head(y), *(by_head(dqkv[:, :, i]) for i in range(3)))
    for name, one, want in zip(("probs", "y", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=2e-6, err_msg=name)


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


def test_dropout_float64_the_cache_and_the_blas_setting_take_the_batched_gemms(native_f32_gemm):
    x = np.random.default_rng(9).standard_normal((2, 6, 8)).astype(np.float32)
    dropping = CausalSelfAttention(8, 2, dropout=0.3)
    dropping.forward(x)
    assert not dropping._on_tiles  # the mask is applied between the softmax and the product
    dropping.eval()
    dropping.forward(x)
    assert dropping._on_tiles  # eval mode drops nothing
    dropping.forward(x, KVCache(1, 2, 2, 6, 4, np.float32), 0)
    assert not dropping._on_tiles
    assert not attention_module.on_tiles(np.dtype(np.float64))
    assert attention_module.on_tiles(np.dtype(np.float32))
    backend.set_f32_gemm("blas")
    try:
        assert not attention_module.on_tiles(np.dtype(np.float32))
    finally:
        backend.set_f32_gemm("native")
