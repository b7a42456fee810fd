"""Dropout: inverted dropout whose mask is regenerated in backward from (seed, call), never stored."""

from __future__ import annotations

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.kernels.activations import dropout_apply
from npcpu.nn.module import Module


class Dropout(Module):
    """Zero each element with probability p in training and scale the rest by 1 / (1 - p).

    Parameters
    ----------
    p : float
        Probability of an element to be zeroed, in [0, 1] (default 0.5). p == 1 gives zeros.
    seed : int
        Seed of the masks (default 0).

    Attributes
    ----------
    calls : int
        How many training forward passes have run. The mask of a forward pass is a pure function of
        (seed, calls at that pass, element index) through the counter-based npcpu.kernels.rng, so each
        pass gets a fresh mask, the masks do not depend on the thread count, and saving `calls` in a
        checkpoint (and restoring it) continues the same sequence of masks: `extra_state()` gives
        {"calls": calls} for that, `load_extra_state` restores it.
    row_offset : int
        Rows (samples) of the global batch before this process's first row: 0 in one process. A
        data-parallel runner (npcpu.dist) sets it before each forward pass so that element i of
        the global batch gets the same mask whichever process holds it.

    Notes
    -----
    forward:  y = x * m / (1 - p),   m_i = [u(seed, calls, i0 + i) >= p], u uniform on [0, 1),
              i0 = row_offset * (elements per row)
    backward: dL/dx = dy * m / (1 - p)
    The mask is not kept: backward regenerates it from (seed, stream) in the same kernel, so the
    layer keeps only the stream number and the shape. Eval mode, or p == 0: y = x (the input
    itself), and `calls` does not advance.
    """

    def __init__(self, p: float = 0.5, *, seed: int = 0):
        super().__init__()
        self.p = check_real("Dropout", "p", p, low=0.0, high=1.0)
        self.seed = check_int("Dropout", "seed", seed)
        self.calls = 0
        self.row_offset = 0
        self._stream = None  # the `calls` value of the forward pass that backward differentiates
        self._shape = None
        self._first = 0      # the global index of the first element of that forward pass

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def extra_state(self) -> dict:
        return {"calls": self.calls}

    def load_extra_state(self, state: dict) -> None:
        unexpected = sorted(set(state) - {"calls"})
        if unexpected:
            raise ValueError(f"{self!r}: unexpected extra state {unexpected}, expected only 'calls'")
        self.calls = check_int(repr(self), "extra state 'calls'", state.get("calls", self.calls), 0)

    def _apply(self, values: np.ndarray, stream: int, first: int) -> np.ndarray:
        out = np.empty_like(values)
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        dropout_apply(values.reshape(-1), out.reshape(-1), self.p, values.dtype.type(scale),
                      self.seed, stream, first)
        return out

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        if not self.training or self.p == 0.0:
            self._stream = None
            self._shape = x.shape if self.training else None
            return x
        stream = self.calls
        self.calls += 1
        self._stream, self._shape = stream, x.shape
        self._first = self.row_offset * (x.size // x.shape[0]) if x.ndim and x.shape[0] else 0
        return self._apply(x, stream, self._first)

    def reapply(self, x: np.ndarray) -> np.ndarray:
        """The last training forward's mask (and scale) applied to `x` again, without advancing
        `calls`: for a caller that needs the dropped values again in its backward pass instead of
        keeping them (attention's dropped probabilities). Call it before `backward`."""
        if self._shape is None:
            raise self.missing_forward()
        return x if self._stream is None else self._apply(x, self._stream, self._first)

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        """dL/dx = dy * mask / (1 - p) when `input_requires_grad`, else None."""
        if self._shape is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._shape)
        dx = None
        if self.input_requires_grad:
            dx = dy if self._stream is None else self._apply(dy, self._stream, self._first)
        self._stream = self._shape = None
        return dx
