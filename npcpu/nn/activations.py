"""Elementwise activations: ReLU, GELU (exact and tanh forms), Tanh. Each is one parallel kernel per pass.

Legend: x input, y output, dy = dL/dy, all of one shape (any); kernels see flat views.
Each backward returns dL/dx only when the layer's `input_requires_grad` (npcpu.nn.module), else
None. What each keeps for backward, and nothing more: ReLU a bit-packed mask (1 bit per element), GELU
its input (in the storage dtype), Tanh its output (in the storage dtype). In eval mode nothing.
Under "fp32"/"fp64" GELU keeps the caller's input and Tanh its returned output by reference (no
copy): neither may be modified in place before backward.
"""

from __future__ import annotations

import numpy as np

from npcpu.kernels import activations as kernels
from npcpu.nn.module import Module
from npcpu.precision import to_compute, to_storage


class ReLU(Module):
    """y = max(x, 0).

    Notes
    -----
    forward:  y = max(x, 0), keeps m = (x > 0) bit-packed, (ceil(x.size / 8),) uint8
    backward: dL/dx = dy where m, else 0
    """

    def __init__(self):
        super().__init__()
        self._mask = None
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        y = np.empty_like(x)
        mask = np.empty((x.size + 7) // 8, dtype=np.uint8)
        kernels.relu_forward(x.reshape(-1), y.reshape(-1), mask)
        self._mask, self._shape = (mask, x.shape) if self.training else (None, None)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        if self._mask is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._shape)
        dx = None
        if self.input_requires_grad:
            dx = np.empty_like(dy)
            kernels.relu_backward(dy.reshape(-1), self._mask, dx.reshape(-1))
        self._mask = self._shape = None
        return dx


class GELU(Module):
    """y = x Phi(x), Phi the standard normal CDF; or its tanh approximation (torch's two forms).

    Parameters
    ----------
    approximate : {"none", "tanh"}
        "none": y = 0.5 x (1 + erf(x / sqrt 2)).
        "tanh": y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Notes
    -----
    backward ("none"): dL/dx = dy (Phi(x) + x phi(x)), phi(x) = exp(-x^2/2) / sqrt(2 pi)
    backward ("tanh"): dL/dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)),
                       t = tanh(sqrt(2/pi) (x + 0.044715 x^3))
    Keeps x in the storage dtype.
    """

    _KERNELS = {
        "none": (kernels.gelu_forward, kernels.gelu_backward),
        "tanh": (kernels.gelu_tanh_forward, kernels.gelu_tanh_backward),
    }

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in self._KERNELS:
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self._saved_input = None

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        y = np.empty_like(x)
        self._KERNELS[self.approximate][0](x.reshape(-1), y.reshape(-1))
        self._saved_input = to_storage(x, self.storage_dtype) if self.training else None
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        if self._saved_input is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._saved_input.shape)
        dx = None
        if self.input_requires_grad:
            x = np.ascontiguousarray(to_compute(self._saved_input, self.compute_dtype))
            dx = np.empty_like(dy)
            self._KERNELS[self.approximate][1](x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        self._saved_input = None
        return dx


class Tanh(Module):
    """y = tanh(x).

    Notes
    -----
    backward: dL/dx = dy (1 - y^2), from the kept output y (in the storage dtype).
    """

    def __init__(self):
        super().__init__()
        self._saved_output = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        y = np.empty_like(x)
        kernels.tanh_forward(x.reshape(-1), y.reshape(-1))
        self._saved_output = to_storage(y, self.storage_dtype) if self.training else None
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        if self._saved_output is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._saved_output.shape)
        dx = None
        if self.input_requires_grad:
            y = np.ascontiguousarray(to_compute(self._saved_output, self.compute_dtype))
            dx = np.empty_like(dy)
            kernels.tanh_backward(y.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        self._saved_output = None
        return dx
