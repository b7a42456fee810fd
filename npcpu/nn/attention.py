"""CausalSelfAttention (nanoGPT's), with a hand-derived backward pass and a key/value cache.

Legend: B batch, T positions, C = n_embd channels, H heads, D = C / H the head size, G = B * H.
    x (B, T, C) input and output; q, k, v (B, H, T, D) per head; scores, probs (B, H, T, T).

forward (one (b, h) pair shown):

    qkv = x W_attn^T + b_attn                     c_attn, W_attn (3C, C): q, k, v side by side
    q, k, v = split(qkv) into H heads             (B, H, T, D) each, strided views of qkv
    scores = q k^T / sqrt(D)                      (T, T)
    probs = causal_softmax(scores)                row t over keys 0..t, zero above the diagonal
    dropped = attn_dropout(probs)
    y = dropped v                                 (T, D)
    out = resid_dropout(merge_heads(y) W_proj^T + b_proj)     c_proj; y is written in place
                                                  into the (B, T, C) merged array

backward, each line quoting the forward line it differentiates:

    `out = resid_dropout(...)`, `... W_proj^T + b_proj`: through the Dropout and c_proj layers
    `y = dropped v`:            ddropped = dy v^T,   dv = dropped^T dy
    `dropped = attn_dropout(probs)`:  dprobs = attn_dropout.backward(ddropped)
    `probs = causal_softmax(scores)`: dscores = probs * (dprobs - rowsum(dprobs * probs)) / sqrt(D)
                                      (the scale folded in: dscores is dL/d(q k^T))
    `scores = q k^T / sqrt(D)`: dq = dscores k,   dk = dscores^T q
    `qkv = x W_attn^T + b_attn`: through c_attn, with dqkv = concat(dq, dk, dv)

Kernel choice: training and uncached evaluation in float32, where the native float32 tile runs
(`on_tiles`), make each direction one parallel pass over the (b, h) pairs: every product, the
softmax and its backward of a pair in a row on npcpu.kernels.dpbf16's tile
(npcpu.kernels.attention_tiles: no GEMM call, no thread hand-off and no (T, T) round trip through
memory between the steps, the masked half of the causal products skipped). A dropout on the
probs (training with p > 0), float64 (the gradient checks) and generation's key/value cache take
the batched GEMMs below, whose results the fused pass equals to float32 rounding.
Batched GEMMs: the (T, T) scores are materialized and every product is a BLAS GEMM per (b, h),
with one fused Numba pass (npcpu.kernels.attention) for the scaled, masked softmax in each
direction. The products of many (b, h) pairs are one NumPy batched matmul (`np.matmul` on
(pairs, T, D) stacks), which loops over the pairs in C: a Python call per pair and product cost
more than the product itself at nanoGPT's sizes (T = 64, D = 32). q, k, v, dq, dk, dv and y are
strided views of c_attn's and c_proj's (B, T, .) arrays, whose rows BLAS reads and writes with a
leading dimension (no head split or merge copies). The pairs are split in one block per core
(npcpu.blas.run_independent), each block's GEMMs on one BLAS thread, since a (T, T) x (T, D)
product is too small to be split well between BLAS threads.
The alternative of Numba loops for the products (skipping the masked half, no calls at all) was
measured slower than the batched GEMMs at T = 64: the loops over D = 32 or the t + 1 keys of a
causal row are too short for LLVM's vectorized loops, which spend their time in loop overhead
and scalar remainders.
The alternative, a tiled Numba kernel with an online softmax that recomputes the scores in
backward (flash attention), keeps O(T) memory per head but does its multiply-adds in Numba loops,
which reach a fraction of BLAS's speed, and recomputes the QK^T product in backward: measured at
T = 512 and 1024, even its forward pass, which skips the masked half, was slower than the GEMM
path's. The price is memory: the kept probs are B * H * T * T values per layer. For gpt-small
(4 layers, 4 heads, T = 512) that is less than the (B, T, V) logits of the same step; for 12
layers of 12 heads at T = 1024 the probs of all layers outweigh the logits several times (bf16
storage halves them), and there a flash kernel's O(T) memory would be the better trade.

Kept for backward: c_attn's output qkv (B, T, 3C) and probs, in the storage dtype, and the
two Dropout layers' streams (their masks are regenerated, never stored).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from npcpu import backend, blas
from npcpu.kernels.attention import causal_softmax_backward, causal_softmax_forward
from npcpu.kernels.attention_tiles import attention_backward, attention_forward
from npcpu.nn.dropout import Dropout
from npcpu.nn.linear import Linear
from npcpu.nn.module import Module
from npcpu.precision import to_compute, to_storage



class KVCache:
    """Keys and values of the positions seen so far, per layer, for generation.

    Attributes
    ----------
    keys, values : list of ndarray
        One (B, H, capacity, D) array per layer; positions 0 .. length - 1 are filled.
    length : int
        How many positions the cache holds (the same for every layer once a forward pass ends).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, capacity: int, head_size: int,
                 dtype: np.dtype):
        shape = (batch, n_head, capacity, head_size)
        self.keys = [np.empty(shape, dtype=dtype) for _ in range(n_layer)]
        self.values = [np.empty(shape, dtype=dtype) for _ in range(n_layer)]
        self.capacity = capacity
        self.length = 0

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, H, T, D) after the cached positions; return every key and value so far,
        (B, H, length + T, D) views."""
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.capacity:
            raise ValueError(f"KVCache: {stop} positions do not fit its capacity {self.capacity}")
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


def on_tiles(dtype: np.dtype) -> bool:
    """Whether attention runs on npcpu.kernels.attention_tiles (one fused pass per direction on
    the native float32 tile): float32 where the native float32 GEMM can run and is not turned off
    (set_f32_gemm("blas") or NPCPU_F32_GEMM=blas send attention back to the batched GEMMs too)."""
    return (dtype == np.float32 and backend.native_f32_gemm_unavailable() is None
            and backend.F32_GEMM.setting() != backend.F32_GEMM.fallback)


def _by_thread(batch: int, heads: int) -> list[tuple[slice, slice]]:
    """(batch rows, heads) blocks, one per thread: the batch split when it has a row per
    thread, else the heads (generation's single sequence)."""
    threads = numba.get_num_threads()
    if batch >= threads:
        return [(part, slice(None)) for part in _parts(batch, threads)]
    return [(slice(None), part) for part in _parts(heads, min(threads, heads))]


def _parts(n: int, count: int) -> list[slice]:
    edges = [n * i // count for i in range(count + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(count)]


def _batched(products) -> None:
    """Run products(rows, heads) for each thread's block at once (npcpu.blas.run_independent:
    NumPy's batched matmul loops over the block's (b, h) pairs in C, one BLAS thread each)."""
    blocks = _by_thread(*products.shape)
    blas.run_independent(lambda i: products(*blocks[i]), len(blocks))


def attention_scores(q: np.ndarray, k: np.ndarray, offset: int) -> np.ndarray:
    """probs (B, H, T, S) = causal_softmax(q k^T / sqrt(D)) for q (B, H, T, D), k (B, H, S, D),
    query t at absolute position offset + t (q, k may be strided views)."""
    batch, heads, queries, head_size = q.shape
    probs = np.empty((batch, heads, queries, k.shape[2]), dtype=q.dtype)

    def scores(rows, hs):
        np.matmul(q[rows, hs], k[rows, hs].swapaxes(-1, -2), out=probs[rows, hs])
    scores.shape = (batch, heads)
    _batched(scores)
    causal_softmax_forward(probs.reshape(batch * heads, queries, -1), offset,
                           1.0 / math.sqrt(head_size))
    return probs


def weighted_values(probs: np.ndarray, v: np.ndarray, y: np.ndarray) -> None:
    """y (B, H, T, D) = probs v per (b, h), probs (B, H, T, S), v (B, H, S, D); y may be a
    strided view (the heads' block of a (B, T, C) array)."""
    def product(rows, hs):
        np.matmul(probs[rows, hs], v[rows, hs], out=y[rows, hs])
    product.shape = probs.shape[:2]
    _batched(product)


def attention_gradients(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        probs: np.ndarray, attn_dropout: Dropout, dq: np.ndarray, dk: np.ndarray,
                        dv: np.ndarray) -> None:
    """dq, dk, dv (B, H, T, D), written, from dy = dL/dy (B, H, T, D), the kept q, k, v and probs
    (B, H, T, T), and the Dropout that dropped the probs. Any of the (B, H, T, D) arrays may be
    strided views (heads of c_attn's output and input gradient)."""
    batch, heads, steps, head_size = q.shape
    dropped = attn_dropout.reapply(probs)
    dprobs = np.empty_like(probs)

    def through_values(rows, hs):  # forward: y = dropped v
        np.matmul(dy[rows, hs], v[rows, hs].swapaxes(-1, -2), out=dprobs[rows, hs])
        np.matmul(dropped[rows, hs].swapaxes(-1, -2), dy[rows, hs], out=dv[rows, hs])
    through_values.shape = (batch, heads)
    _batched(through_values)
    del dropped
    # forward: dropped = attn_dropout(probs); probs = causal_softmax(q k^T / sqrt(D))
    dscores = np.ascontiguousarray(attn_dropout.backward(dprobs))
    causal_softmax_backward(dscores.reshape(batch * heads, steps, steps),
                            probs.reshape(batch * heads, steps, steps), 0,
                            1.0 / math.sqrt(head_size))

    def through_scores(rows, hs):  # dscores is dL/d(q k^T) here: the scale is applied
        np.matmul(dscores[rows, hs], k[rows, hs], out=dq[rows, hs])
        np.matmul(dscores[rows, hs].swapaxes(-1, -2), q[rows, hs], out=dk[rows, hs])
    through_scores.shape = (batch, heads)
    _batched(through_scores)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with a fused q/k/v projection (GPT-2, nanoGPT).

    Parameters
    ----------
    n_embd : int
        C, the channels of input and output.
    n_head : int
        H, the number of heads; must divide n_embd.
    dropout : float
        Probability of both dropouts (on the attention probabilities and on the output).
    bias : bool
        Biases in c_attn and c_proj.
    seed : int
        Seed of the two dropout masks (attn_dropout uses seed, resid_dropout seed + 1).

    Notes
    -----
    See the module docstring for the math. The state dict is nanoGPT's: c_attn.weight (3C, C),
    c_attn.bias (3C,), c_proj.weight (C, C), c_proj.bias (C,).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, *,
                 seed: int = 0):
        super().__init__()
        if not isinstance(n_head, (int, np.integer)) or n_head < 1:
            raise ValueError(f"CausalSelfAttention: n_head must be a positive int, got {n_head!r}")
        if not isinstance(n_embd, (int, np.integer)) or n_embd < 1 or n_embd % n_head:
            raise ValueError(f"CausalSelfAttention: n_embd ({n_embd!r}) must be a positive multiple "
                             f"of n_head ({n_head})")
        self.n_embd, self.n_head = int(n_embd), int(n_head)
        self.head_size = self.n_embd // self.n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, bias)
        self.c_proj = Linear(n_embd, n_embd, bias)
        self.attn_dropout = Dropout(dropout, seed=seed)
        self.resid_dropout = Dropout(dropout, seed=seed + 1)
        for inner in (self.c_proj, self.attn_dropout, self.resid_dropout):
            inner.input_requires_grad = True  # inside the layer; c_attn follows the layer's own
        self._qkv = None  # (B, T, 3C), storage dtype
        self._probs = None  # (B, H, T, T), storage dtype
        self._on_tiles = False  # the forward pass's choice (on_tiles), which backward follows

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}"

    def _split(self, rows: np.ndarray, parts: int) -> np.ndarray:
        """(B, T, parts C) -> (B, T, parts, H, D), a view: c_attn's q, k, v (parts = 3) or the
        merged heads (parts = 1)."""
        batch, steps, _ = rows.shape
        return rows.reshape(batch, steps, parts, self.n_head, self.head_size)

    def _heads(self, rows: np.ndarray, parts: int) -> tuple[np.ndarray, ...]:
        """(B, T, parts C) -> `parts` strided (B, H, T, D) views, without copies."""
        heads = self._split(rows, parts)
        return tuple(heads[:, :, i].transpose(0, 2, 1, 3) for i in range(parts))

    def forward(self, x: np.ndarray, cache: KVCache | None = None, layer: int = 0) -> np.ndarray:
        """out (B, T, C) for x (B, T, C). With a `cache` (eval mode only), the keys and values of
        x are appended to layer `layer`'s cache and the queries attend to every cached position."""
        x = self.check_input(x, features=self.n_embd)
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"{self!r}: expected input (B, T, {self.n_embd}) with B and T at least "
                             f"1, got {x.shape}")
        if cache is not None and self.training:
            raise RuntimeError(f"{self!r}: a KVCache is for generation, in eval mode")
        self.c_attn.input_requires_grad = self.input_requires_grad
        qkv = np.ascontiguousarray(self.c_attn.forward(x))
        q, k, v = self._heads(qkv, 3)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.extend(layer, k, v)
        merged = np.empty_like(x, dtype=qkv.dtype)
        dropping = self.training and self.attn_dropout.p > 0.0
        self._on_tiles = on_tiles(qkv.dtype) and not dropping and cache is None
        if self._on_tiles:
            probs = np.empty(q.shape[:3] + (k.shape[2],), dtype=qkv.dtype)
            attention_forward(self._split(qkv, 3), probs, self._split(merged, 1)[:, :, 0],
                              1.0 / math.sqrt(self.head_size))
        else:
            probs = attention_scores(q, k, offset)
            weighted_values(self.attn_dropout.forward(probs), v, self._heads(merged, 1)[0])
        out = self.resid_dropout.forward(self.c_proj.forward(merged))
        if self.training:
            self._qkv = to_storage(qkv, self.storage_dtype)
            self._probs = to_storage(probs, self.storage_dtype)
        else:
            self._qkv = self._probs = None
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        if self._qkv is None:
            raise self.missing_forward()
        dtype = self.compute_dtype
        qkv = to_compute(self._qkv, dtype)
        probs = to_compute(self._probs, dtype)
        self._qkv = self._probs = None
        dmerged = np.ascontiguousarray(self.c_proj.backward(self.resid_dropout.backward(dout)))
        dqkv = np.empty_like(qkv)
        if self._on_tiles:
            attention_backward(self._split(dmerged, 1)[:, :, 0], self._split(qkv, 3),
                               np.ascontiguousarray(probs), self._split(dqkv, 3),
                               1.0 / math.sqrt(self.head_size))
        else:
            attention_gradients(self._heads(dmerged, 1)[0], *self._heads(qkv, 3), probs,
                                self.attn_dropout, *self._heads(dqkv, 3))
        return self.c_attn.backward(dqkv)
