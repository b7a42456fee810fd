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


def _power_sums(grads: list[np.ndarray], p: float) -> list[float]:
    """Each gradient's sum of |entry| ** p, in float64."""
    return [power_sum(g.reshape(-1), p) for g in grads]


def _total_norm(grads: list[np.ndarray], norm_type: float) -> float:
    if norm_type == math.inf:
        return float(np.max([max_abs(g.reshape(-1)) for g in grads], initial=0.0))  # keeps a NaN
    total = sum(_power_sums(grads, norm_type))
    return math.sqrt(total) if norm_type == 2.0 else total ** (1.0 / norm_type)


def _clip(grads: list[np.ndarray], max_norm: float, total_norm: float, norm_type: float,
          error_if_nonfinite: bool) -> list[float] | None:
    """Scale `grads` in place by ``coef = min(max_norm / (total_norm + 1e-6), 1)``; the scaled
    gradients' sums of squares, taken in the same pass (None when coef is 1: nothing scaled)."""
    if error_if_nonfinite and not math.isfinite(total_norm):
        raise RuntimeError(f"clip_grad_norm: the total norm of order {norm_type} of the gradients is "
                           f"{total_norm}; set error_if_nonfinite=False to clip anyway")
    coef = min(max_norm / (total_norm + 1e-6), 1.0)  # min keeps a NaN coef, as torch's clamp
    if coef == 1.0:
        return None
    # an Inf gradient times coef 0 gives the NaN documented in clip_grad_norm
    return [power_sum(g.reshape(-1), 2.0, g.dtype.type(coef)) for g in grads]


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
    _clip(grads, max_norm, total_norm, norm_type, error_if_nonfinite)
    return total_norm


def clip_grad_norm_and_squares(params: list, max_norm: float | None,
                               error_if_nonfinite: bool = False) -> tuple[float, dict[int, float]]:
    """`clip_grad_norm` of order 2 over the Parameters `params` (`max_norm` None: no clipping),
    and each trainable one's sum of squared gradient entries after the clipping, by id(p): taken
    in the passes that sum the norm and clip, so that the norm of some of them later
    (`norm_from_squares`: the freezer's layer norms) reads no gradient again. Those norms are
    bit for bit `get_total_norm` of the same gradients."""
    params = [p for p in params if not getattr(p, "frozen", False) and p.grad is not None]
    grads = trainable_gradients(params)
    squares = _power_sums(grads, 2.0)
    total_norm = math.sqrt(sum(squares))
    if max_norm is not None:
        max_norm = check_real("clip_grad_norm", "max_norm", max_norm, low=0.0, allow_inf=True)
        squares = _clip(grads, max_norm, total_norm, 2.0, error_if_nonfinite) or squares
    return total_norm, dict(zip(map(id, params), squares))


def norm_from_squares(squares: dict[int, float], params) -> float:
    """The 2-norm of the gradients of the trainable ones of `params` from their sums of squares
    (by id(p), as `clip_grad_norm_and_squares` gives them): get_total_norm's sum, in its order."""
    return math.sqrt(sum(squares[id(p)] for p in params
                         if not getattr(p, "frozen", False) and p.grad is not None))


def clip_grad_value(params, clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place (NaN stays NaN), as torch's
    clip_grad_value_."""
    clip_value = check_real("clip_grad_value", "clip_value", clip_value, low=0.0, allow_inf=True)
    for grad in trainable_gradients(params):
        np.clip(grad, -clip_value, clip_value, out=grad)
