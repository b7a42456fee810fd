"""Parameter: a tensor a layer learns, its float32 gradient accumulator, and whether it is frozen."""

from __future__ import annotations

import numpy as np

from npcpu.precision import HALF_DTYPES, to_compute


class Parameter:
    """A learnable array.

    Attributes
    ----------
    data : ndarray
        The stored values: float32, float64 (gradient checks), bfloat16 or float16.
    grad : ndarray or None
        The gradient accumulator, in the compute dtype (float32; float64 when `data` is float64).
        None until the first backward pass touches it; backward passes only ever add into it,
        and `zero_grad()` is the one reset. `zero_grad()` writes nothing: it marks the
        accumulator as zero, the next dW GEMM then overwrites it (beta = 0, see
        `grad_for_gemm`) instead of adding to zeros, and any other reader or accumulator
        finds it filled with zeros (on first access). For mlp52m that saves a 216 MB fill and
        a 216 MB read per step.
    name : str
        The dotted name under which the owning model lists it ("0.weight"); set by the model.
    frozen : bool
        A frozen parameter gets no gradient and no update.
    updater : Optimizer or None
        The optimizer that updates this parameter inside the backward pass
        (`Optimizer.fuse_into_backward`); None when updates happen in `optimizer.step()`.
    uses : int
        How many layers read this Parameter in one forward pass: 1, or 2 for a weight tied between
        two layers (a GPT's token embedding and output head), set by the model that ties it. Inside
        backward the update waits for the last use's gradient (`complete_use`).
    """

    def __init__(self, data: np.ndarray, name: str = ""):
        data = np.asarray(data)
        if data.dtype.kind != "f" and data.dtype not in HALF_DTYPES:
            raise TypeError(f"Parameter {name!r}: data must be floating point, got {data.dtype}")
        self.data = np.ascontiguousarray(data)
        self._grad: np.ndarray | None = None
        self._grad_is_zero = False  # zero_grad() was called and nothing has written _grad since
        self.name = name
        self.frozen = False
        self.updater = None
        self.uses = 1
        self._uses_completed = 0  # uses whose gradient this backward pass has added so far

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def compute_dtype(self) -> np.dtype:
        return np.dtype(np.float64) if self.data.dtype == np.float64 else np.dtype(np.float32)

    def values(self) -> np.ndarray:
        """The values in the compute dtype: `data` itself when float32/float64, else a widened copy."""
        return to_compute(self.data, self.compute_dtype)

    @property
    def grad(self) -> np.ndarray | None:
        if self._grad_is_zero:
            self._grad.fill(0)
            self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value: np.ndarray | None) -> None:
        self._grad, self._grad_is_zero = value, False

    def grad_buffer(self) -> np.ndarray:
        """The gradient accumulator, holding zeros on first use or after zero_grad(). Backward
        adds into it."""
        if self._grad is None:
            self._grad = np.zeros(self.data.shape, dtype=self.compute_dtype)
        return self.grad

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

    def complete_use(self) -> bool:
        """Record that one of the `uses` has added its gradient in this backward pass; True when
        it was the last, so that the gradient is complete and the update may run (and the count
        starts again for the next backward pass)."""
        self._uses_completed += 1
        if self._uses_completed < self.uses:
            return False
        self._uses_completed = 0
        return True

    def update_in_backward(self) -> None:
        """With an `updater`: once the last use's gradient is in (`complete_use`), apply this
        step's update from the accumulated gradient, and drop the gradient. Layers call it at the
        end of their backward pass; it does nothing without an updater or for a frozen parameter,
        and for a tied one it only counts the uses before the last."""
        if self.updater is None or self.frozen or not self.complete_use() or self._grad is None:
            return
        self.updater.begin_update(self)(self.grad.reshape(-1))
        self.grad = None

    def zero_grad(self) -> None:
        """Make the accumulator zero (lazily: see `grad`)."""
        if self._grad is not None:
            self._grad_is_zero = True

    def __repr__(self) -> str:
        frozen = ", frozen" if self.frozen else ""
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype}{frozen})"
