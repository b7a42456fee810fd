"""Linear and FusedLinearReLU: y = x W^T + b (then max(., 0)), with hand-derived backward passes.

Legend: N rows (all leading dimensions of the input flattened), K = in_features, M = out_features.
    x (N, K) input, W (M, K) weight (torch layout), b (M,) bias, y (N, M) output, dy = dL/dy (N, M).

The GEMMs go to BLAS in the compute dtype (float32; float64 under "fp64") through npcpu.blas, or,
under "bf16" on a CPU with AVX512_BF16, to the native bfloat16 GEMMs (npcpu.blas_native.bf16, on the
bfloat16 W and x, dz rounded to bfloat16; npcpu.backend.set_bf16_gemm chooses):
dL/dW is accumulated in place by a GEMM with beta = 1, so gradient accumulation costs no temporary
the size of W; the first GEMM after zero_grad() overwrites with beta = 0, so zeroing costs no pass.
A 16-bit weight is widened for its GEMMs a block of rows at a time, and an optimizer fused into
backward gets dL/dW a block of rows at a time (npcpu.nn.weight_blocks). Work done and skipped is
counted in npcpu.nn.work.
"""

from __future__ import annotations

import math

import numpy as np

from npcpu.checks import check_int
from npcpu.kernels import linear as kernels
from npcpu.kernels.launch import for_size
from npcpu.nn import weight_blocks, work
from npcpu.nn.module import Module
from npcpu.nn.parameter import Parameter
from npcpu.precision import to_storage


class Linear(Module):
    """y = x W^T + b, for input (..., in_features).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
        Learn an additive bias (default True).
    seed : int or None
        Seed of the initialization: W and b ~ U(-1/sqrt(in_features), 1/sqrt(in_features)), which is
        torch's kaiming_uniform_(a=sqrt(5)) and its bias rule.

    Notes
    -----
    forward:  y = x W^T + b                                  x (N, K), W (M, K), b (M,), y (N, M)
    backward: dL/dx = dy W              (N, K), only when `input_requires_grad`
              dL/dW += dy^T x           (M, K), skipped when the weight is frozen
              dL/db += sum_n dy[n, :]   (M,),   skipped when the bias is frozen

    With an optimizer updating inside backward (`Parameter.updater`), W and b are updated before
    backward returns, W a block of rows at a time right after dx has used those rows.

    The input kept for dL/dW is the caller's array itself under "fp32" and "fp64" (no copy): do not
    modify it in place between forward and backward. Under "bf16"/"fp16" a copy in the storage
    dtype is kept. The state dict is {"weight", "bias"}, as torch.nn.Linear's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 seed: int | None = None):
        super().__init__()
        self.in_features = check_int(type(self).__name__, "in_features", in_features, 1)
        self.out_features = check_int(type(self).__name__, "out_features", out_features, 1)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(np.float32)) if bias else None
        self._saved = None  # in training (x (N, K) in the storage dtype, x's shape, y's shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    # -- what differs between Linear and FusedLinearReLU: the pass after and before the GEMMs ------
    def _gemm_bias(self) -> np.ndarray | None:
        """The bias the forward GEMM adds (npcpu.blas.matmul_weight_transposed): b, or None."""
        return None if self.bias is None else self.bias.values()

    def _finish_output(self, y: np.ndarray) -> None:
        """y (N, M) holds x W^T + b: nothing left to do."""

    def _output_grad(self, dy: np.ndarray) -> np.ndarray:
        """dL/d(x W^T + b) from dy (N, M), with dL/db accumulated on the way."""
        if self.bias is not None and not self.bias.frozen:
            for_size(kernels.bias_grad, kernels.add_row_sums, dy.size)(dy, self.bias.grad_buffer())
        return dy

    # -- forward and backward -------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x, features=self.in_features)
        x_rows = x if x.ndim == 2 else x.reshape(-1, self.in_features)
        x_stored = to_storage(x_rows, self._dtypes[1]) if self.training else None
        y = weight_blocks.forward(x_rows, self.weight, x_stored, self._gemm_bias())
        work.record("gemm")
        self._finish_output(y)
        if x.ndim != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        self._saved = (x_stored, x.shape, y.shape) if self.training else None
        return y

    def skip_backward(self) -> None:
        """A frozen prefix: no dW and no dx GEMM."""
        work.record("gemm_skipped", 2)
        self._saved = None

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        if self._saved is None:
            raise self.missing_forward()
        x_stored, input_shape, out_shape = self._saved
        dy = self.check_grad_output(dy, out_shape)
        if dy.ndim != 2:
            dy = dy.reshape(-1, self.out_features)
        dz = self._output_grad(dy)  # dL/d(x W^T + b), (N, M)
        dx = weight_blocks.backward(dz, x_stored, self.weight, self.input_requires_grad)
        done = (not self.weight.frozen) + self.input_requires_grad  # of the dW and dx GEMMs
        work.record_gemms(done, 2 - done)
        if dx is not None and len(input_shape) != 2:
            dx = dx.reshape(input_shape)
        if self.bias is not None:  # W took its update (if any) by blocks in weight_blocks.backward
            self.bias.update_in_backward()
        self._saved = None
        return dx


class FusedLinearReLU(Linear):
    """y = max(x W^T + b, 0): a Linear and a ReLU with one pass between the GEMMs in each direction.

    Parameters are those of `Linear`. The state dict {"weight", "bias"} loads unchanged into a
    `torch.nn.Linear(in_features, out_features)` followed by `torch.nn.ReLU()` (in a torch
    Sequential, under the Linear's index: "0.weight", "0.bias"), and back.

    Notes
    -----
    forward:  z = x W^T + b,  y = max(z, 0)                one GEMM, then one parallel pass that adds
                                                          b, applies the ReLU in place and writes a
                                                          bit-packed mask m = (z > 0), 1 bit/element
    backward: dz = dy * m                                  one parallel pass that also reduces
              dL/db += sum_n dz[n, :]                      the bias gradient
              dL/dW += dz^T x                              GEMM with beta = 1 into W.grad
              dL/dx  = dz W                                only when `input_requires_grad`

    What is kept for backward: the input (as in `Linear`) and the mask (N, ceil(M/8)) uint8, never
    the pre-activation.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 seed: int | None = None):
        super().__init__(in_features, out_features, bias, seed=seed)
        self._mask = None

    def skip_backward(self) -> None:
        super().skip_backward()
        self._mask = None

    def _gemm_bias(self) -> None:
        return None  # added in the ReLU's pass

    def _finish_output(self, y: np.ndarray) -> None:
        if self.bias is not None:
            bias = self.bias.values()
        else:
            bias = np.zeros(self.out_features, dtype=y.dtype)
        mask = np.empty(kernels.mask_shape(*y.shape), dtype=np.uint8)
        kernels.add_bias_relu(y, bias, mask)
        self._mask = mask if self.training else None

    def _output_grad(self, dy: np.ndarray) -> np.ndarray:
        if self.bias is not None and not self.bias.frozen:
            bias_grad = self.bias.grad_buffer()
        else:  # the kernel always reduces; a frozen or absent bias gets a scratch accumulator
            bias_grad = np.zeros(self.out_features, dtype=dy.dtype)
        dz = np.empty_like(dy)
        kernels.relu_mask_grad_and_bias_grad(dy, self._mask, dz, bias_grad)
        self._mask = None
        return dz
