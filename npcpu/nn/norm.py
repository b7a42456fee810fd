"""LayerNorm: normalize over the last dimension(s), then scale and shift (torch.nn.LayerNorm)."""

from __future__ import annotations

import math

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.kernels.layernorm import layernorm_backward, layernorm_forward
from npcpu.nn.module import Module
from npcpu.nn.parameter import Parameter
from npcpu.precision import to_compute, to_storage


class LayerNorm(Module):
    """Layer normalization over the trailing `normalized_shape` dimensions (Ba et al., 2016).

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing shape normalized over (an int means the last dimension).
    eps : float
        Added to the variance before the square root.
    elementwise_affine : bool
        Learn `weight` (initialized to ones) and, if `bias`, `bias` (zeros), both of shape
        `normalized_shape`.
    bias : bool
        Learn a bias (only with `elementwise_affine`).

    Notes
    -----
    Input x is (..., *normalized_shape); with every leading dimension flattened into R rows and the
    normalized ones into C, for each row

        mean = sum(x) / C,  var = sum((x - mean)^2) / C,  rstd = 1 / sqrt(var + eps)
        xhat = (x - mean) * rstd
        y = xhat * weight + bias

    Backward, with dy the upstream gradient (R, C):

        dL/dbias   = sum over rows of dy
        dL/dweight = sum over rows of dy * xhat
        dL/dx      = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * weight

    (means over the C normalized elements of the row). The layer keeps xhat (in the storage dtype)
    and rstd for backward: xhat is of order one, so bf16 storage does not hurt it the way storing
    an input with a large mean would.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) \
            else tuple(normalized_shape)
        if not shape:
            raise ValueError("LayerNorm: normalized_shape must have at least one dimension, got ()")
        self.normalized_shape = tuple(check_int("LayerNorm", f"normalized_shape[{i}]", n, 1)
                                      for i, n in enumerate(shape))
        self.eps = check_real("LayerNorm", "eps", eps, low=0.0, low_open=True)
        self.elementwise_affine = bool(elementwise_affine)
        size = math.prod(self.normalized_shape)
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=np.float32))
            self.bias = Parameter(np.zeros(self.normalized_shape, dtype=np.float32)) if bias else None
        else:
            self.weight = None
            self.bias = None
        self._size = size
        self._xhat = None  # (R, C), storage dtype
        self._rstd = None  # (R,), compute dtype
        self._input_shape = None

    def _affine(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """weight and bias as (C,) arrays in `dtype` (ones and zeros where the layer has none)."""
        weight = self.weight.values().reshape(-1) if self.weight is not None \
            else np.ones(self._size, dtype=dtype)
        bias = self.bias.values().reshape(-1) if self.bias is not None \
            else np.zeros(self._size, dtype=dtype)
        return weight.astype(dtype, copy=False), bias.astype(dtype, copy=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._normalize(x, None)[1]

    def forward_residual(self, x: np.ndarray, addend: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(h, y) = (x + addend, LayerNorm(x + addend)) in one pass over the rows: a residual
        connection and the LayerNorm that reads its sum (a pre-LayerNorm transformer block's
        `h = x + attn(...)`, then `ln_2(h)`). Backward as for forward(h); pass the gradient that
        reaches h along the identity path as backward's `residual`."""
        return self._normalize(x, addend)

    def _normalize(self, x: np.ndarray, addend: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(the rows normalized, reshaped as x; the output), the first x itself without addend."""
        x = self.check_input(x, min_ndim=len(self.normalized_shape))
        if x.shape[x.ndim - len(self.normalized_shape):] != self.normalized_shape:
            raise ValueError(f"{self!r}: expected input of shape (..., "
                             f"{', '.join(map(str, self.normalized_shape))}), got {x.shape}")
        rows = x.reshape(-1, self._size)
        nothing = np.empty((0, 0), dtype=x.dtype)
        total = nothing
        if addend is not None:
            if not isinstance(addend, np.ndarray) or addend.shape != x.shape:
                got = addend.shape if isinstance(addend, np.ndarray) else type(addend).__name__
                raise ValueError(f"{self!r}: forward_residual expected an addend of the input's "
                                 f"shape {x.shape}, got {got}")
            addend = np.ascontiguousarray(to_compute(addend, x.dtype)).reshape(rows.shape)
            total = np.empty_like(rows)
        weight, bias = self._affine(x.dtype)
        out = np.empty_like(rows)
        rstd = np.empty(rows.shape[0], dtype=x.dtype)
        keep = self.training
        xhat = np.empty_like(rows) if keep else nothing
        layernorm_forward(out, xhat, rstd, rows, weight, bias, self.eps, keep,
                          nothing if addend is None else addend, total)
        self._xhat = to_storage(xhat, self.storage_dtype) if keep else None
        self._rstd = rstd if keep else None
        self._input_shape = x.shape
        return (x if addend is None else total.reshape(x.shape)), out.reshape(x.shape)

    def backward(self, dy: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray | None:
        """dL/dx from dy; with `residual` (the shape of x), dL/dx + residual, added in the same
        pass (the gradient of a residual stream that also reaches x along the identity path)."""
        if self._xhat is None:
            raise self.missing_forward()
        dy = self.check_grad_output(dy, self._input_shape).reshape(-1, self._size)
        xhat = to_compute(self._xhat, dy.dtype)
        weight, _ = self._affine(dy.dtype)
        need_dinp = self.input_requires_grad
        nothing = np.empty((0, 0), dtype=dy.dtype)
        dinp = np.empty_like(dy) if need_dinp else nothing
        if residual is not None:
            residual = self.check_grad_output(residual, self._input_shape).reshape(dy.shape)
        dweight = self._grad_or_scratch(self.weight, dy.dtype)
        dbias = self._grad_or_scratch(self.bias, dy.dtype)
        need_dparams = any(p is not None and not p.frozen for p in (self.weight, self.bias))
        layernorm_backward(dinp, dweight, dbias, dy, xhat, self._rstd, weight, need_dinp,
                           need_dparams, nothing if residual is None else residual)
        self._xhat = self._rstd = None  # one backward per forward: free the cache
        self.update_parameters_in_backward()
        return dinp.reshape(self._input_shape) if need_dinp else None

    def _grad_or_scratch(self, param: Parameter | None, dtype: np.dtype) -> np.ndarray:
        """param's gradient accumulator as (C,), or discarded zeros for a missing or frozen one."""
        if param is None or param.frozen:
            return np.zeros(self._size, dtype=dtype)
        return param.grad_buffer().reshape(-1)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
