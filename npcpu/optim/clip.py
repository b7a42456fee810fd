"""Gradient clipping by total norm and by value, with torch.nn.utils' semantics.

`params` is an iterable of Parameters or an optimizer (its param groups); frozen parameters and
parameters without a gradient are ignored, as torch ignores tensors whose grad is None. Gradients
are modified in place. Norms accumulate in float64 (npcpu.kernels.grads), so the returned norm of
float32 gradients is more accurate than torch's float32 one; they agree to float32 precision.
"""

from __future__ import annotations

import math

import numpy as np

from npcpu.checks import check_real
from npcpu.kernels.grads import max_abs, power_sum
from npcpu.optim.scaling import trainable_gradients


def _check_norm_type(owner: str, norm_type) -> float:
    return check_real(owner, "norm_type", norm_type, low=0.0, low_open=True, allow_inf=True)


def get_total_norm(params, norm_type: float = 2.0) -> float:
    """The p-norm of all gradients taken as one vector (p = `norm_type`, > 0 or inf).

    ``||g||_p = (sum_i |g_i| ** p) ** (1/p)`` over every entry of every gradient;
    ``||g||_inf = max_i |g_i|``. 0.0 when there are no gradients; NaN if any entry is NaN.
    """
    return _total_norm(trainable_gradients(params), _check_norm_type("get_total_norm", norm_type))


def _total_norm(grads: list[np.ndarray], norm_type: float) -> float:
    flat = [g.reshape(-1) for g in grads]
    if norm_type == math.inf:
        return float(np.max([max_abs(g) for g in flat], initial=0.0))  # np.max keeps a NaN
    total = sum(power_sum(g, norm_type) for g in flat)
    return math.sqrt(total) if norm_type == 2.0 else total ** (1.0 / norm_type)


def clip_grad_norm(params, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients together so that their total norm is at most about `max_norm`.

    As torch's clip_grad_norm_: ``coef = min(max_norm / (total_norm + 1e-6), 1)`` multiplies every
    gradient in place (so the clipped norm is just below `max_norm`). A non-finite total norm makes
    coef NaN or 0 and the gradients NaN/0, as in torch, unless `error_if_nonfinite`, which raises
    RuntimeError instead (torch's error type) and leaves the gradients untouched.

    Returns
    -------
    float
        The total norm before clipping (see `get_total_norm`).
    """
    max_norm = check_real("clip_grad_norm", "max_norm", max_norm, low=0.0, allow_inf=True)
    norm_type = _check_norm_type("clip_grad_norm", norm_type)
    grads = trainable_gradients(params)
    total_norm = _total_norm(grads, norm_type)
    if error_if_nonfinite and not math.isfinite(total_norm):
        raise RuntimeError(f"clip_grad_norm: the total norm of order {norm_type} of the gradients is "
                           f"{total_norm}; set error_if_nonfinite=False to clip anyway")
    coef = min(max_norm / (total_norm + 1e-6), 1.0)  # min keeps a NaN coef, as torch's clamp
    if coef != 1.0:
        with np.errstate(invalid="ignore"):  # Inf * 0 gives the NaN documented above
            for grad in grads:
                grad *= grad.dtype.type(coef)
    return total_norm


def clip_grad_value(params, clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place (NaN stays NaN), as torch's
    clip_grad_value_."""
    clip_value = check_real("clip_grad_value", "clip_value", clip_value, low=0.0, allow_inf=True)
    for grad in trainable_gradients(params):
        np.clip(grad, -clip_value, clip_value, out=grad)
