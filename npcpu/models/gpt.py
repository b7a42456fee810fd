"""GPT: a decoder-only transformer with nanoGPT's architecture and state dict, without autograd.

Legend: B batch, T positions (T <= block_size), C = n_embd, V = vocab_size, L = n_layer.
    idx (B, T) integer token ids; x (B, T, C) the residual stream; logits (B, T, V).

forward:
    x = drop(wte[idx] + wpe[0 .. T-1])          token and position embeddings
    x = h[L-1]( ... h[0](x))                    pre-LayerNorm Blocks (npcpu.nn.transformer)
    logits = ln_f(x) W_head^T                   lm_head, no bias; W_head is wte's weight when tied
backward (from dlogits = dL/dlogits):
    `logits = ln_f(x) W_head^T`: lm_head.backward (adds dlogits^T ln_f(x) to W_head's gradient),
                                 then ln_f.backward
    `x = h[i](x)`:               the Blocks' backward, last to first
    `x = drop(wte[idx] + wpe[0 .. T-1])`: the sum's gradient goes to both tables:
                                 wte[idx[b, t]] += dx[b, t],  wpe[t] += sum_b dx[b, t]
With a tied head, W_head is transformer.wte.weight itself (one Parameter): its gradient is the sum
of the head's GEMM and the embedding's scatter, as the two `+=` make it.

The state dict has nanoGPT's keys and layouts (transformer.wte.weight (V, C), transformer.wpe.weight,
transformer.h.{i}.ln_1.weight, ....attn.c_attn.weight (3C, C), ..., transformer.ln_f.weight,
lm_head.weight), both head keys present when tied, as torch lists a shared tensor under each name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from npcpu.nn import (Block, Dropout, Embedding, KVCache, LayerNorm, Linear, Module, Sequential)
from npcpu.nn.module import ModuleDict


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT (nanoGPT's GPTConfig, plus `tied` and `approximate`).

    vocab_size : V, rows of the token table and columns of the logits (may include padding)
    block_size : the longest sequence, rows of the position table
    n_layer, n_head, n_embd : Blocks, heads per attention, channels C (n_head must divide n_embd)
    dropout : probability of every dropout (embeddings, attention, residuals)
    bias : biases in the Linear layers and LayerNorms
    tied : the output head shares the token embedding's weight (GPT-2 and nanoGPT do)
    approximate : the MLPs' GELU, "none" (exact, nanoGPT) or "tanh" (GPT-2)
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    tied: bool = True
    approximate: str = "none"

    def __post_init__(self):
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {field} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")


class GPT(Module):
    """nanoGPT's GPT: embeddings, `n_layer` Blocks, a final LayerNorm and the output head.

    Parameters
    ----------
    config : GPTConfig
    seed : int
        Seed of the initialization and (offset per layer) of the dropout masks.

    Notes
    -----
    Initialization as GPT-2 / nanoGPT: every weight matrix and embedding ~ N(0, 0.02^2), biases
    zero, LayerNorm weights one, and the residual projections (attn.c_proj and mlp.c_proj, whose
    outputs are added to the residual stream 2 L times) ~ N(0, (0.02 / sqrt(2 L))^2).
    """

    def __init__(self, config: GPTConfig, *, seed: int = 0):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: expected a GPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.transformer = ModuleDict(dict(
            wte=Embedding(c.vocab_size, c.n_embd),
            wpe=Embedding(c.block_size, c.n_embd),
            drop=Dropout(c.dropout, seed=seed),
            h=Sequential(*(Block(c.n_embd, c.n_head, c.dropout, c.bias, c.approximate,
                                 seed=seed + 3 * i + 1) for i in range(c.n_layer))),
            ln_f=LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tied:
            self.lm_head.weight = self.transformer.wte.weight
            self.lm_head.weight.uses_per_backward = 2  # updated in backward after both uses
        for inner in (self.transformer.drop, self.transformer.h, *self.transformer.h,
                      self.transformer.ln_f, self.lm_head):
            inner.input_requires_grad = True  # the embeddings below need the residual's gradient
        self._initialize(np.random.default_rng(seed))
        self._batch_shape = None

    def _initialize(self, rng: np.random.Generator) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.data[...] = rng.normal(0.0, residual_std, p.shape)
            elif p.data.ndim >= 2:
                p.data[...] = rng.normal(0.0, 0.02, p.shape)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.data[...] = 1.0 if name.endswith("weight") else 0.0
            else:
                p.data[...] = 0.0

    def extra_repr(self) -> str:
        return repr(self.config)

    # -- input checks ---------------------------------------------------------------------------
    def check_tokens(self, idx, max_length: int | None = None) -> np.ndarray:
        """idx as an int64 (B, T) array, after checking its type, shape, length and every id."""
        if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
            got = idx.dtype if isinstance(idx, np.ndarray) else type(idx).__name__
            raise TypeError(f"GPT: token ids must be an integer array (B, T), got {got}")
        if idx.ndim != 2 or idx.shape[1] < 1:
            raise ValueError(f"GPT: token ids must have shape (B, T) with T >= 1, got {idx.shape}")
        limit = self.config.block_size if max_length is None else max_length
        if idx.shape[1] > limit:
            raise ValueError(f"GPT: a sequence of length {idx.shape[1]} is longer than block_size "
                             f"{limit}")
        bad = (idx < 0) | (idx >= self.config.vocab_size)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise ValueError(f"GPT: token id {idx[b, t]} at position ({b}, {t}) is outside "
                             f"[0, {self.config.vocab_size})")
        return np.ascontiguousarray(idx, dtype=np.int64)

    # -- forward and backward -------------------------------------------------------------------
    def _embed(self, idx: np.ndarray, first_position: int) -> np.ndarray:
        """x = wte[idx] + wpe[first_position .. first_position + T - 1], (B, T, C)."""
        positions = np.arange(first_position, first_position + idx.shape[1])
        return self.transformer.wte.forward(idx) + self.transformer.wpe.forward(positions)

    def forward(self, idx: np.ndarray) -> np.ndarray:
        """logits (B, T, V) for token ids idx (B, T), T <= block_size.

        The Blocks run as transformer.h would run them, except that each block's output sum
        h + mlp(...) is formed in the pass of the LayerNorm that reads it (the next block's ln_1,
        then ln_f): Block.normalize_input and Block.forward_residuals."""
        idx = self.check_tokens(idx)
        blocks = list(self.transformer.h)
        x, normed = blocks[0].normalize_input(self.transformer.drop.forward(self._embed(idx, 0)))
        for i, block in enumerate(blocks):
            h, branch = block.forward_residuals(x, normed)
            if i + 1 < len(blocks):
                x, normed = blocks[i + 1].normalize_input(h, branch)
            else:
                normed = self.transformer.ln_f.forward_residual(h, branch)[1]
        return self.lm_head.forward(normed)

    def backward(self, dlogits: np.ndarray) -> None:
        """Adds dL/dparameter into every parameter's gradient from dlogits (B, T, V); returns None
        (token ids have no gradient)."""
        dx = self.transformer.ln_f.backward(self.lm_head.backward(dlogits))
        dx = self.transformer.drop.backward(self.transformer.h.backward(dx))
        # forward: x = wte[idx] + wpe[positions]
        self.transformer.wpe.backward(dx.sum(axis=0))
        self.transformer.wte.backward(dx)
        return None

    # -- generation -----------------------------------------------------------------------------
    def _last_logits(self, idx: np.ndarray, cache: KVCache) -> np.ndarray:
        """Logits (B, V) of the last position after idx (B, T) extends the cached positions."""
        x = self._embed(idx, cache.length)
        for layer, block in enumerate(self.transformer.h):
            x = block.forward(x, cache, layer)
        cache.length += idx.shape[1]
        return self.lm_head.forward(self.transformer.ln_f.forward(x[:, -1:]))[:, 0]

    def generate(self, idx: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 on_token=None) -> np.ndarray:
        """Append `max_new_tokens` sampled tokens to idx (B, T0); returns (B, T0 + max_new_tokens).

        Each step conditions on the last block_size tokens, as nanoGPT's generate. Keys and values
        of the positions seen are kept per layer (KVCache), so a step computes only its new
        token: the prefix is never recomputed while the sequence fits in block_size. Beyond it the
        window slides, every position changes its position embedding, and each step recomputes
        the window (what conditioning on the cropped window means).

        temperature : logits are divided by it; 0 picks the most likely token (greedy)
        top_k : sample among the k most likely tokens only
        seed : seed of the sampling generator (None: fresh entropy)
        on_token : called with each new column of token ids (B,) as it is sampled (streaming)
        """
        idx = self.check_tokens(idx, max_length=np.iinfo(np.int64).max)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be a non-negative int, "
                             f"got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"GPT.generate: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"GPT.generate: top_k must be in [1, {self.config.vocab_size}], "
                             f"got {top_k!r}")
        rng = np.random.default_rng(seed)
        was_training = self.training
        self.eval()
        c, block_size = self.config, self.config.block_size
        tokens = np.empty((idx.shape[0], idx.shape[1] + max_new_tokens), dtype=np.int64)
        tokens[:, :idx.shape[1]] = idx
        length, cache = idx.shape[1], None
        try:
            for _ in range(max_new_tokens):
                if cache is None or cache.length == block_size:  # start, or the window slides
                    cache = KVCache(c.n_layer, idx.shape[0], c.n_head, block_size,
                                    c.n_embd // c.n_head, self.compute_dtype)
                    logits = self._last_logits(tokens[:, max(0, length - block_size):length], cache)
                else:
                    logits = self._last_logits(tokens[:, length - 1:length], cache)
                tokens[:, length] = sample(logits, temperature, top_k, rng)
                if on_token is not None:
                    on_token(tokens[:, length].copy())
                length += 1
        finally:
            self.train(was_training)
        return tokens

    # -- optimizer groups and state ---------------------------------------------------------------
    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW parameter groups, nanoGPT's convention: weight decay on the matrices (Linear
        weights, embeddings), none on biases and LayerNorm weights. A tied weight appears once."""
        params = self.parameters()
        return [{"params": [p for p in params if p.data.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.data.ndim < 2], "weight_decay": 0.0}]

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Module.load_state_dict, plus the head: a tied model takes a state dict with both head
        keys holding one array (nanoGPT's, or an npcpu GPT's) or with the head stored once (only
        transformer.wte.weight); an untied model needs its own lm_head.weight."""
        wte, head = "transformer.wte.weight", "lm_head.weight"
        if self.config.tied and wte in state and head in state:
            if not np.array_equal(np.asarray(state[head]), np.asarray(state[wte])):
                raise ValueError("GPT.load_state_dict: this model ties lm_head.weight to "
                                 "transformer.wte.weight, but the state dict holds two different "
                                 "arrays (an untied model's): build it with GPTConfig(tied=False)")
        elif not self.config.tied and wte in state and head not in state:
            raise ValueError("GPT.load_state_dict: missing key 'lm_head.weight': the state dict is "
                             "a tied model's (its head stored once as transformer.wte.weight); "
                             "build the model with GPTConfig(tied=True)")
        super().load_state_dict(state, strict)


def sample(logits: np.ndarray, temperature: float, top_k: int | None,
           rng: np.random.Generator) -> np.ndarray:
    """One token id per row of logits (B, V): argmax when temperature is 0, else drawn from
    softmax(logits / temperature) restricted to the top_k largest logits."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k, None]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(logits.shape[0]) * cumulative[:, -1]
    return np.array([np.searchsorted(row, draw, side="right")
                     for row, draw in zip(cumulative, draws)])
