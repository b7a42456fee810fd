"""CausalSelfAttention (nanoGPT's), with a hand-derived backward pass and a key/value cache.

Legend: B batch, T positions, C = n_embd channels, H heads, D = C / H the head size, G = B * H.
    x (B, T, C) input and output; q, k, v (B, H, T, D) per head; scores, probs (B, H, T, T).

forward (one (b, h) pair shown; the GEMMs run per pair through BLAS):

    qkv = x W_attn^T + b_attn                     c_attn, W_attn (3C, C): q, k, v side by side
    q, k, v = split(qkv) into H heads             (B, H, T, D) each
    scores = q k^T / sqrt(D)                      (T, T)
    probs = causal_softmax(scores)                row t over keys 0..t, zero above the diagonal
    dropped = attn_dropout(probs)
    y = dropped v                                 (T, D)
    out = resid_dropout(merge_heads(y) W_proj^T + b_proj)     c_proj

backward, each line quoting the forward line it differentiates:

    `out = resid_dropout(...)`, `... W_proj^T + b_proj`: through the Dropout and c_proj layers
    `y = dropped v`:            ddropped = dy v^T,   dv = dropped^T dy
    `dropped = attn_dropout(probs)`:  dprobs = attn_dropout.backward(ddropped)
    `probs = causal_softmax(scores)`: dscores = probs * (dprobs - rowsum(dprobs * probs))
    `scores = q k^T / sqrt(D)`: dq = dscores k / sqrt(D),   dk = dscores^T q / sqrt(D)
    `qkv = x W_attn^T + b_attn`: through c_attn, with dqkv = concat(dq, dk, dv)

Kernel choice: the (T, T) scores are materialized and every product is a BLAS GEMM per (b, h),
with one fused Numba pass (npcpu.kernels.attention) for the masked softmax in each direction. The
(b, h) pairs are independent: each runs its GEMMs on one BLAS thread, and the pairs are spread
over the cores (npcpu.blas.run_independent), since a (T, T) x (T, D) product is too small to be
split well between BLAS threads.
The alternative, a tiled Numba kernel with an online softmax that recomputes the scores in
backward (flash attention), keeps O(T) memory per head but does its multiply-adds in Numba loops,
which reach a fraction of BLAS's speed, and recomputes the QK^T product in backward: measured at
T = 512 and 1024, even its forward pass, which skips the masked half, was slower than the GEMM
path's. The price is memory: the kept probs are B * H * T * T values per layer. For gpt-small
(4 layers, 4 heads, T = 512) that is less than the (B, T, V) logits of the same step; for 12
layers of 12 heads at T = 1024 the probs of all layers outweigh the logits several times (bf16
storage halves them), and there a flash kernel's O(T) memory would be the better trade.

Kept for backward: q, k, v (one (3, B, H, T, D) array) and probs, in the storage dtype, and the
two Dropout layers' streams (their masks are regenerated, never stored).
"""

from __future__ import annotations

import math

import numpy as np

from npcpu import blas
from npcpu.kernels.attention import causal_softmax_backward, causal_softmax_forward
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


def attention_scores(q: np.ndarray, k: np.ndarray, offset: int) -> np.ndarray:
    """probs (B, H, T, S) = causal_softmax(q k^T / sqrt(D)) for q (B, H, T, D), k (B, H, S, D),
    query t at absolute position offset + t."""
    batch, heads, queries, head_size = q.shape
    probs = np.empty((batch, heads, queries, k.shape[2]), dtype=q.dtype)
    scale = 1.0 / math.sqrt(head_size)

    def scores(g):
        b, h = divmod(g, heads)
        blas.matmul(q[b, h], np.ascontiguousarray(k[b, h]), transpose_b=True, alpha=scale,
                    out=probs[b, h])
    blas.run_independent(scores, batch * heads)
    causal_softmax_forward(probs.reshape(batch * heads, queries, -1), offset)
    return probs


def weighted_values(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """y (B, H, T, D) = probs v per (b, h), probs (B, H, T, S), v (B, H, S, D)."""
    batch, heads, queries, _ = probs.shape
    y = np.empty((batch, heads, queries, v.shape[3]), dtype=probs.dtype)

    def product(g):
        b, h = divmod(g, heads)
        blas.matmul(probs[b, h], np.ascontiguousarray(v[b, h]), out=y[b, h])
    blas.run_independent(product, batch * heads)
    return y



def attention_gradients(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        probs: np.ndarray, attn_dropout: Dropout) -> np.ndarray:
    """dL/dqkv (B, T, 3, H, D), the layout of c_attn's output, from dy = dL/dy (B, H, T, D), the
    kept q, k, v (B, H, T, D) and probs (B, H, T, T), and the Dropout that dropped the probs."""
    batch, heads, steps, head_size = q.shape
    dqkv = np.empty((batch, steps, 3, heads, head_size), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    dropped = attn_dropout.reapply(probs)
    dprobs = np.empty_like(probs)

    def through_values(g):  # forward: y = dropped v
        b, h = divmod(g, heads)
        blas.matmul(dy[b, h], v[b, h], transpose_b=True, out=dprobs[b, h])
        dv[b, h] = blas.matmul(dropped[b, h], dy[b, h], transpose_a=True)
    blas.run_independent(through_values, batch * heads)
    del dropped
    # forward: dropped = attn_dropout(probs); probs = causal_softmax(scores)
    dscores = np.ascontiguousarray(attn_dropout.backward(dprobs))
    causal_softmax_backward(dscores.reshape(batch * heads, steps, steps),
                            probs.reshape(batch * heads, steps, steps), 0)
    scale = 1.0 / math.sqrt(head_size)

    def through_scores(g):  # forward: scores = q k^T / sqrt(D)
        b, h = divmod(g, heads)
        dq[b, h] = blas.matmul(dscores[b, h], k[b, h], alpha=scale)
        dk[b, h] = blas.matmul(dscores[b, h], q[b, h], transpose_a=True, alpha=scale)
    blas.run_independent(through_scores, batch * heads)
    return dqkv

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
        self._qkv = None  # (3, B, H, T, D), storage dtype
        self._probs = None  # (B, H, T, T), storage dtype

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}"

    def _split_heads(self, qkv: np.ndarray) -> np.ndarray:
        """(B, T, 3C) -> (3, B, H, T, D): q, k, v, each with its heads as a leading dimension."""
        batch, steps, _ = qkv.shape
        heads = qkv.reshape(batch, steps, 3, self.n_head, self.head_size)
        return np.ascontiguousarray(heads.transpose(2, 0, 3, 1, 4))

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
        q, k, v = self._split_heads(self.c_attn.forward(x))
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.extend(layer, k, v)
        probs = attention_scores(q, k, offset)
        y = weighted_values(self.attn_dropout.forward(probs), v)
        batch, steps = x.shape[:2]
        merged = np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(batch, steps, self.n_embd)
        out = self.resid_dropout.forward(self.c_proj.forward(merged))
        if self.training:
            self._qkv = to_storage(np.stack((q, k, v)), self.storage_dtype)
            self._probs = to_storage(probs, self.storage_dtype)
        else:
            self._qkv = self._probs = None
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        if self._qkv is None:
            raise self.missing_forward()
        dtype = self.compute_dtype
        q, k, v = to_compute(self._qkv, dtype)
        probs = to_compute(self._probs, dtype)
        self._qkv = self._probs = None
        batch, heads, steps, head_size = q.shape
        dmerged = self.c_proj.backward(self.resid_dropout.backward(dout))
        dy = np.ascontiguousarray(
            dmerged.reshape(batch, steps, heads, head_size).transpose(0, 2, 1, 3))
        dqkv = attention_gradients(dy, q, k, v, probs, self.attn_dropout)
        return self.c_attn.backward(dqkv.reshape(batch, steps, 3 * self.n_embd))
