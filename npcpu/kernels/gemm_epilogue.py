"""The write of C at the end of the native GEMM (npcpu.kernels.gemm_bf16): what a linear layer would
otherwise do in passes of its own over C, done on each element as it leaves the task's block.

Legend: C (P, Q) float32, s = the block's sum (plus C's old value when accumulating), p, q an
element of C (C may be a transposed view, as y^T, and then so is `aux`).

    bias      v = s + bias[q]         (bias[p] when `bias_per_row`: y^T = W x^T); empty: v = s
    epilogue  NO_ACTIVATION           C = v
              GELU_FORWARD            C = v (the pre-activation z, kept by the layer for backward),
                                      aux = gelu(v) (float32)
              GELU_BACKWARD           C = v * gelu'(aux), aux holding z (float32, or bfloat16 bits
                                      as uint16): dL/dz of a GELU whose output's gradient is v
              GELU_TANH_FORWARD, GELU_TANH_BACKWARD   the same with GELU's tanh form

Each result is computed with the same float32 operations, in the same order, as the separate
passes it replaces (npcpu.kernels.linear.add_bias, npcpu.kernels.activations' GELU kernels on the
GEMM's rounded result): bit for bit the same.
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from npcpu.kernels import activations, linear
from npcpu.kernels.activations import gelu32, gelu_slope32, gelu_tanh, gelu_tanh_slope
from npcpu.kernels.convert import bf16_bits_to_f32
from npcpu.kernels.dpbf16 import COLUMNS, ROWS
from npcpu.kernels.launch import for_size
from npcpu.precision import to_compute

NO_ACTIVATION = 0
GELU_FORWARD = 1
GELU_BACKWARD = 2
GELU_TANH_FORWARD = 3
GELU_TANH_BACKWARD = 4

ACTIVATIONS = {None: (NO_ACTIVATION, NO_ACTIVATION), "gelu": (GELU_FORWARD, GELU_BACKWARD),
               "gelu_tanh": (GELU_TANH_FORWARD, GELU_TANH_BACKWARD)}
"""The epilogues of an activation name, (forward, backward): forward after y = x W^T + b,
backward after dx = dz W, where dx is the gradient of the activation's output."""

_SEPARATE = {"gelu": (activations.gelu_forward, activations.gelu_backward),
             "gelu_tanh": (activations.gelu_tanh_forward, activations.gelu_tanh_backward)}


def check_activation(gemm: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{gemm}: activation must be one of {sorted(map(str, ACTIVATIONS))}, "
                         f"got {activation!r}")


def finish_separately(c: np.ndarray, bias: np.ndarray | None, activation: str | None,
                      aux: np.ndarray | None, backward: bool) -> None:
    """The epilogue as passes of their own over a C-contiguous C (N, M), for a GEMM that cannot
    fuse it (BLAS, or a product computed by blocks), in C's dtype (float32 or float64): the same
    results as the fused write. forward: C += bias, then aux = act(C); backward: C *= act'(aux),
    aux in any storage dtype."""
    if bias is not None:
        for_size(linear.add_bias, linear.add_bias_serial, c.size)(c, bias)
    if activation is None:
        return
    forward_kernel, backward_kernel = _SEPARATE[activation]
    if backward:
        z = np.ascontiguousarray(to_compute(aux, c.dtype))
        backward_kernel(z.reshape(-1), c.reshape(-1), c.reshape(-1))
    else:
        forward_kernel(c.reshape(-1), aux.reshape(-1))


def _float32_of(value):
    """A float32 value of an element of aux: itself, or the value of bfloat16 bits (uint16)."""


@overload(_float32_of)
def _float32_of_specialized(value):
    if value == types.uint16:
        return lambda value: bf16_bits_to_f32(value)
    if value == types.float32:
        return lambda value: value
    return None


@njit(inline="always", cache=True)
def _finish(value, epilogue, aux, p, q):
    """What C[p, q] holds for the biased sum `value`, writing aux[p, q] in forward."""
    if epilogue == GELU_FORWARD:
        aux[p, q] = gelu32(value)
    elif epilogue == GELU_TANH_FORWARD:
        aux[p, q] = gelu_tanh(value)
    elif epilogue == GELU_BACKWARD:
        value = value * gelu_slope32(_float32_of(aux[p, q]))
    elif epilogue == GELU_TANH_BACKWARD:
        value = value * gelu_tanh_slope(_float32_of(aux[p, q]))
    return value


@njit(inline="always", cache=True)
def _activate_row(c_row, aux_row, epilogue):
    """_finish over a contiguous run of a row of C (biased sums in place), one loop per epilogue
    so that each vectorizes."""
    if epilogue == GELU_FORWARD:
        for k in range(c_row.size):
            aux_row[k] = gelu32(c_row[k])
    elif epilogue == GELU_TANH_FORWARD:
        for k in range(c_row.size):
            aux_row[k] = gelu_tanh(c_row[k])
    elif epilogue == GELU_BACKWARD:
        for k in range(c_row.size):
            c_row[k] = c_row[k] * gelu_slope32(_float32_of(aux_row[k]))
    elif epilogue == GELU_TANH_BACKWARD:
        for k in range(c_row.size):
            c_row[k] = c_row[k] * gelu_tanh_slope(_float32_of(aux_row[k]))


@njit(cache=True, error_model="numpy")
def write_block(c, block, p_start, q_start, row_tiles, panels, accumulate, bias, bias_per_row,
                epilogue, aux):
    """C (+)= a task's block of tiles, finished as in the module docstring. Tile (t, j), of rows
    p_start + t ROWS and columns q_start + j COLUMNS, is at block[(t * panels + j) * ROWS *
    COLUMNS], ROWS x COLUMNS row-major; only the part inside C is written. Walks C along its
    memory (a transposed C, as y^T, column by column); a row-major C a row of the block at a
    time, each pass over it a loop of its own (vectorized). NumPy's error model: Python's would
    test GELU's division for zero, and the test keeps the loops from vectorizing (the parallel
    GELU kernels, as every prange loop, run under NumPy's too: the same results)."""
    if c.strides[0] >= c.strides[1]:
        _write_rows(c, block, p_start, q_start, row_tiles, panels, accumulate, bias, bias_per_row,
                    epilogue, aux)
    else:
        _write_columns(c, block, p_start, q_start, row_tiles, panels, accumulate, bias,
                       bias_per_row, epilogue, aux)


@njit(cache=True, error_model="numpy")
def _write_rows(c, block, p_start, q_start, row_tiles, panels, accumulate, bias, bias_per_row,
                epilogue, aux):
    q_stop = min(c.shape[1], q_start + panels * COLUMNS)
    for t in range(row_tiles):
        p0 = p_start + t * ROWS
        for i in range(min(ROWS, c.shape[0] - p0)):
            p = p0 + i
            for j in range(panels):
                q0 = q_start + j * COLUMNS
                c_part = c[p, q0:min(q_stop, q0 + COLUMNS)]
                start = (t * panels + j) * ROWS * COLUMNS + i * COLUMNS
                tile_row = block[start:start + c_part.size]
                if accumulate:
                    for k in range(c_part.size):
                        c_part[k] = c_part[k] + tile_row[k]
                else:
                    for k in range(c_part.size):
                        c_part[k] = tile_row[k]
            c_row = c[p, q_start:q_stop]
            if bias.size > 0 and bias_per_row:
                row_bias = bias[p]
                for k in range(c_row.size):
                    c_row[k] += row_bias
            elif bias.size > 0:
                bias_part = bias[q_start:q_stop]
                for k in range(c_row.size):
                    c_row[k] += bias_part[k]
            if epilogue != NO_ACTIVATION:
                _activate_row(c_row, aux[p, q_start:q_stop], epilogue)


@njit(cache=True, error_model="numpy")
def _write_columns(c, block, p_start, q_start, row_tiles, panels, accumulate, bias, bias_per_row,
                   epilogue, aux):
    biased = bias.size > 0
    zero = c.dtype.type(0)
    for t in range(row_tiles):
        p0 = p_start + t * ROWS
        rows = min(ROWS, c.shape[0] - p0)
        for j in range(panels):
            q0 = q_start + j * COLUMNS
            tile = block[(t * panels + j) * ROWS * COLUMNS:(t * panels + j + 1) * ROWS * COLUMNS]
            for k in range(min(COLUMNS, c.shape[1] - q0)):
                c_column = c[p0:p0 + rows, q0 + k]
                column_bias = bias[q0 + k] if biased and not bias_per_row else zero
                for i in range(rows):
                    value = tile[i * COLUMNS + k]
                    value = c_column[i] + value if accumulate else value
                    if biased:
                        value += bias[p0 + i] if bias_per_row else column_bias
                    c_column[i] = _finish(value, epilogue, aux, p0 + i, q0 + k)
