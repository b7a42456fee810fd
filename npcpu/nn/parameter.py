"""Parameter: a tensor a layer learns, its float32 gradient accumulator, and whether it is frozen."""

from __future__ import annotations

import numpy as np

from npcpu.precision import HALF_DTYPES, to_compute, widen_to_scratch


class Parameter:
    """A learnable array.

    Attributes
    ----------
    data : ndarray
        The stored values: float32, float64 (gradient checks), bfloat16 or float16.
    grad : ndarray or None
        The gradient accumulator, in the compute dtype (float32; float64 when `data` is float64).
        None until the first backward pass touches it; backward passes only ever add into it,
        and `zero_grad()` is the one reset.
    name : str
        The dotted name under which the owning model lists it ("0.weight"); set by the model.
    frozen : bool
        A frozen parameter gets no gradient and no update.
    """

    def __init__(self, data: np.ndarray, name: str = ""):
        data = np.asarray(data)
        if data.dtype.kind != "f" and data.dtype not in HALF_DTYPES:
            raise TypeError(f"Parameter {name!r}: data must be floating point, got {data.dtype}")
        self.data = np.ascontiguousarray(data)
        self.grad: np.ndarray | None = None
        self.name = name
        self.frozen = False

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

    def gemm_values(self) -> np.ndarray:
        """The values in the compute dtype, for immediate use as a GEMM operand.

        `data` itself when float32/float64. For 16-bit storage, the widened values live in a
        buffer shared by every parameter of the same shape (npcpu.precision.widen_to_scratch): valid
        only until the next `gemm_values()` of a same-shaped parameter, and never to be kept.
        """
        if self.data.dtype in HALF_DTYPES:
            return widen_to_scratch(self.data)
        return self.data

    def grad_buffer(self) -> np.ndarray:
        """The gradient accumulator, allocated as zeros on first use. Backward adds into it."""
        if self.grad is None:
            self.grad = np.zeros(self.data.shape, dtype=self.compute_dtype)
        return self.grad

    def zero_grad(self) -> None:
        if self.grad is not None:
            self.grad.fill(0)

    def __repr__(self) -> str:
        frozen = ", frozen" if self.frozen else ""
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype}{frozen})"
