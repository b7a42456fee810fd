"""Flatten: merge the dimensions start_dim..end_dim into one, as torch.nn.Flatten."""

from __future__ import annotations

import numpy as np

from npcpu.nn.module import Module


class Flatten(Module):
    """Reshape (d0, ..., d_start, ..., d_end, ...) to (d0, ..., d_start * ... * d_end, ...).

    Parameters
    ----------
    start_dim, end_dim : int
        First and last dimension to merge (negative counts from the end), torch's defaults 1 and -1.

    Notes
    -----
    forward: a view of x with the new shape; backward: dL/dx = dy reshaped to x's shape.
    Keeps only the input shape.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim
        self._input_shape = None

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def _merged_shape(self, shape: tuple) -> tuple:
        ndim = max(len(shape), 1)  # torch treats a 0-d tensor as 1-d here
        start = self.start_dim + ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + ndim if self.end_dim < 0 else self.end_dim
        if not (0 <= start < ndim and 0 <= end < ndim):
            raise ValueError(f"{self!r}: dimensions out of range for an input of shape {shape} "
                             f"(expected start_dim and end_dim in [{-ndim}, {ndim - 1}])")
        if start > end:
            raise ValueError(f"{self!r}: start_dim must not come after end_dim, got input shape {shape}")
        shape = shape or (1,)
        return (*shape[:start], int(np.prod(shape[start:end + 1])), *shape[end + 1:])

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x, min_ndim=0)
        self._input_shape = x.shape if self.training else None
        return x.reshape(self._merged_shape(x.shape))

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        """dL/dx = dy reshaped to x's shape when `input_requires_grad`, else None."""
        if self._input_shape is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._merged_shape(self._input_shape))
        dx = dy.reshape(self._input_shape) if self.input_requires_grad else None
        self._input_shape = None
        return dx
