"""Parameter: a tensor a layer learns, its gradient accumulator, and the hand-off to an optimizer
that updates it inside the backward pass (`InBackwardUpdater`, the one thing nn/ knows of optim/).

The gradient accumulator has three states: none (`grad` is None), holding a sum (backward passes
add into it), and marked zero by `zero_grad()`. Marking writes nothing: the next dW GEMM overwrites
the accumulator (beta = 0, `grad_for_gemm`) instead of adding to zeros, which for mlp52m saves a
216 MB fill and a 216 MB read per step. Readers of `grad` see zeros while it is marked (a read-only
zero array; reading never writes); code that adds into or scales the accumulator in place asks for
it with `grad_buffer()` (zeros written then, if marked) or `grad_for_gemm()`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from npcpu.dtypes import HALF_DTYPES
from npcpu.precision import to_compute


_FLOAT64, _FLOAT32 = np.dtype(np.float64), np.dtype(np.float32)  # made once: read on every step


class RangeUpdate(Protocol):
    def __call__(self, grad: np.ndarray, first: int = 0) -> None:
        """Update the parameter's elements first .. first + grad.size - 1 (C order) from `grad`,
        their gradient (flat, in the parameter's compute dtype)."""


class InBackwardUpdater(Protocol):
    """An optimizer that updates parameters during the backward pass, as their gradients complete.

    A layer whose backward finishes a parameter's gradient (`Parameter.takes_update`) calls
    `begin_update(param)` once, then the returned function once with the whole gradient or once per
    disjoint range of elements until every element is updated (a Linear layer hands dL/dW over a
    block of weight rows at a time). Each range must start at a multiple of `element_alignment`;
    the result does not depend on how the elements are split. npcpu.optim.Optimizer implements it.
    """

    element_alignment: int

    def begin_update(self, param: Parameter) -> RangeUpdate:
        """Count one step of `param` and return the function that applies it."""


class Parameter:
    """A learnable array.

    Attributes
    ----------
    data : ndarray
        The stored values: float32, float64 (gradient checks), bfloat16 or float16.
    grad : ndarray or None
        The gradient accumulator, in the compute dtype (float32; float64 when `data` is float64).
        None until the first backward pass touches it; backward passes only ever add into it, and
        `zero_grad()` is the one reset (see the module docstring: reading never writes).
    name : str
        The dotted name under which the owning model lists it ("0.weight"); set by the model.
    frozen : bool
        A frozen parameter gets no gradient and no update.
    updater : InBackwardUpdater or None
        The optimizer that updates this parameter inside the backward pass
        (`Optimizer.fuse_into_backward`); None when updates happen in `optimizer.step()`.
    uses_per_backward : int
        How many layers use this parameter in one forward pass: 1, or 2 for a weight tied between
        a token embedding and an output head. Its gradient is the sum over the uses, and with an
        `updater` it is updated once, by the backward of its last use (`takes_update`).
    """

    def __init__(self, data: np.ndarray, name: str = ""):
        data = np.asarray(data)
        if data.dtype.kind != "f" and data.dtype not in HALF_DTYPES:
            raise TypeError(f"Parameter {name!r}: data must be floating point, got {data.dtype}")
        if not data.dtype.isnative:  # big-endian data from a file: the kernels take native order
            data = data.astype(data.dtype.newbyteorder("="))
        self.data = np.ascontiguousarray(data)
        self._grad: np.ndarray | None = None
        self._grad_is_zero = False  # zero_grad() was called and nothing has written _grad since
        self.name = name
        self.frozen = False
        self.updater: InBackwardUpdater | None = None
        self.uses_per_backward = 1
        self._uses_done = 0  # uses whose backward has run in the current backward pass

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def compute_dtype(self) -> np.dtype:
        return _FLOAT64 if self.data.dtype == _FLOAT64 else _FLOAT32

    def values(self) -> np.ndarray:
        """The values in the compute dtype: `data` itself when float32/float64, else a widened copy."""
        return to_compute(self.data, self.compute_dtype)

    # -- the gradient accumulator -----------------------------------------------------------------
    @property
    def grad(self) -> np.ndarray | None:
        """The accumulated gradient, for reading: None, the accumulator, or, while it is marked
        zero, a read-only array of zeros (the accumulator itself is not touched)."""
        if self._grad_is_zero:
            zeros = np.zeros(self.data.shape, dtype=self._grad.dtype)
            zeros.flags.writeable = False
            return zeros
        return self._grad

    @grad.setter
    def grad(self, value: np.ndarray | None) -> None:
        self._grad, self._grad_is_zero = value, False

    def grad_buffer(self) -> np.ndarray:
        """The accumulator, to add into or modify in place: zeros when new or marked zero."""
        if self._grad is None:
            self._grad = np.zeros(self.data.shape, dtype=self.compute_dtype)
        elif self._grad_is_zero:
            self._grad.fill(0)
        self._grad_is_zero = False
        return self._grad

    def grad_for_gemm(self) -> tuple[np.ndarray, float]:
        """(accumulator, beta) for a GEMM that computes grad = beta * grad + (this gradient):
        beta = 0.0 when the accumulator holds zeros (new, or zero_grad() since the last write),
        and the GEMM must then write every element; else 1.0, adding to what is there."""
        if self._grad is None:
            self._grad = np.empty(self.data.shape, dtype=self.compute_dtype)
            return self._grad, 0.0
        if self._grad_is_zero:
            self._grad_is_zero = False
            return self._grad, 0.0
        return self._grad, 1.0

    def zero_grad(self) -> None:
        """Mark the accumulator zero (nothing is written: see the module docstring), and start the
        count of uses for `takes_update` afresh (a backward pass cut short leaves it behind)."""
        if self._grad is not None:
            self._grad_is_zero = True
        self._uses_done = 0

    # -- updates inside backward ------------------------------------------------------------------
    def takes_update(self) -> bool:
        """Called once by the backward of each layer that uses this parameter: True when it has an
        `updater`, is not frozen, and this use is its last in the backward pass (its gradient is
        then complete), so that the caller must hand the gradient to the updater instead of
        accumulating it. False otherwise: the caller accumulates into the gradient as usual."""
        if self.updater is None or self.frozen:
            return False
        self._uses_done += 1
        if self._uses_done < self.uses_per_backward:
            return False
        self._uses_done = 0
        return True

    def update_in_backward(self) -> None:
        """For a layer whose backward has accumulated this parameter's gradient in full: when that
        use `takes_update`, apply the update from the accumulated gradient and drop the gradient.
        Does nothing without an updater, for a frozen parameter, or before its last use."""
        if not self.takes_update() or self._grad is None:
            return
        self.updater.begin_update(self)(self.grad.reshape(-1))
        self.grad = None

    def __repr__(self) -> str:
        frozen = ", frozen" if self.frozen else ""
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype}{frozen})"
