"""The transformer block of GPT-2 / nanoGPT: MLP and Block (pre-LayerNorm), forward and backward.

Legend: B batch, T positions, C = n_embd channels; every activation here is (B, T, C) except the
MLP's hidden (B, T, 4C).
"""

from __future__ import annotations

import numpy as np

from npcpu.nn.activations import GELU
from npcpu.nn.attention import CausalSelfAttention, KVCache
from npcpu.nn.dropout import Dropout
from npcpu.nn.linear import Linear
from npcpu.nn.module import Module
from npcpu.nn.norm import LayerNorm


class MLP(Module):
    """out = dropout(c_proj(gelu(c_fc(x)))), c_fc C -> 4C, c_proj 4C -> C.

    Parameters
    ----------
    n_embd : int
    dropout : float
    bias : bool
        Biases in both Linear layers.
    approximate : {"none", "tanh"}
        The GELU form: exact (nanoGPT's nn.GELU()) or GPT-2's tanh approximation.
    seed : int
        Seed of the dropout masks.

    Notes
    -----
    backward runs the four layers in reverse, each through its own backward:
    dL/dx = c_fc.backward(gelu.backward(c_proj.backward(dropout.backward(dout)))).
    """

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True,
                 approximate: str = "none", *, seed: int = 0):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd, bias)
        self.gelu = GELU(approximate)
        self.c_proj = Linear(4 * n_embd, n_embd, bias)
        self.dropout = Dropout(dropout, seed=seed)
        for inner in (self.gelu, self.c_proj, self.dropout):
            inner.input_requires_grad = True  # inside the layer; c_fc follows the layer's own

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.c_fc.input_requires_grad = self.input_requires_grad
        return self.dropout.forward(self.c_proj.forward(self.gelu.forward(self.c_fc.forward(x))))

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        dhidden = self.gelu.backward(self.c_proj.backward(self.dropout.backward(dout)))
        return self.c_fc.backward(dhidden)


class Block(Module):
    """A pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)).

    Parameters
    ----------
    n_embd, n_head : int
    dropout : float
    bias : bool
        Biases in the Linear layers and the LayerNorms (nanoGPT's `bias`).
    approximate : {"none", "tanh"}
        The MLP's GELU form.
    seed : int
        Seed of the dropout masks (attention uses seed and seed + 1, the MLP seed + 2).

    Notes
    -----
    forward:   h   = x + attn(ln_1(x))
               out = h + mlp(ln_2(h))
    backward:  `out = h + mlp(ln_2(h))`:  dh = dout + ln_2.backward(mlp.backward(dout))
               `h = x + attn(ln_1(x))`:   dx = dh + ln_1.backward(attn.backward(dh))
    A residual adds its two paths' gradients: the identity's and the branch's. The first
    residual's sum and ln_2 are one pass (LayerNorm.forward_residual), and each LayerNorm's
    backward adds the identity path's gradient as it writes its own (its `residual` argument).
    GPT's forward also sums the second residual in the pass of the LayerNorm that reads it (the
    next block's ln_1, or ln_f) through normalize_input and forward_residuals; backward is the
    same either way, since ln_1's backward gives dL/d(its input) whichever pass summed it.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 approximate: str = "none", *, seed: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, seed=seed)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, approximate, seed=seed + 2)
        for inner in (self.attn, self.ln_2, self.mlp):
            inner.input_requires_grad = True  # inside the block; ln_1 follows the block's own

    def forward(self, x: np.ndarray, cache: KVCache | None = None, layer: int = 0) -> np.ndarray:
        """out (B, T, C); `cache` and `layer` go to the attention (generation, eval mode)."""
        x, normed = self.normalize_input(x)
        h, branch = self.forward_residuals(x, normed, cache, layer)
        return h + branch

    def normalize_input(self, x: np.ndarray,
                        addend: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, ln_1(x)), the block's input and its first step; with `addend`, x + addend and its
        ln_1 in one pass (LayerNorm.forward_residual): the previous block's two residual terms,
        summed where they are normalized (GPT's forward)."""
        x = self.check_input(x, min_ndim=3)
        self.ln_1.input_requires_grad = self.input_requires_grad
        if addend is None:
            return x, self.ln_1.forward(x)
        return self.ln_1.forward_residual(x, addend)

    def forward_residuals(self, x: np.ndarray, normed: np.ndarray, cache: KVCache | None = None,
                          layer: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(h, mlp(ln_2(h))) from x and normed = ln_1(x): the two terms of the block's output,
        left for the caller to add where it normalizes the sum (the next block's ln_1, or ln_f)."""
        h, normed = self.ln_2.forward_residual(x, self.attn.forward(normed, cache, layer))
        return h, self.mlp.forward(normed)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        dh = self.ln_2.backward(self.mlp.backward(dout), residual=dout)
        return self.ln_1.backward(self.attn.backward(dh), residual=dh)  # None: no input gradient
