"""LAMB: Adam's direction, scaled per tensor by a trust ratio (You et al., arXiv 1904.00962, Alg. 2)."""

from __future__ import annotations

import math

import numpy as np

from npcpu.kernels import optim as kernels
from npcpu.checks import check_flag, check_real
from npcpu.kernels.optim_io import BLOCK
from npcpu.optim.optimizer import Optimizer, check_betas, flat


def check_weight_norm_clamp(owner: str, clamp) -> None:
    if clamp is None:
        return
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"{owner}: weight_norm_clamp must be None or a pair (lower, upper), "
                         f"got {clamp!r}")
    lower = check_real(owner, "weight_norm_clamp[0]", clamp[0], low=0.0)
    upper = check_real(owner, "weight_norm_clamp[1]", clamp[1], low=0.0, low_open=True)
    if lower > upper:
        raise ValueError(f"{owner}: weight_norm_clamp must have lower <= upper, got {clamp!r}")


class LAMB(Optimizer):
    """Layer-wise Adaptive Moments for Batch training (arXiv 1904.00962, Algorithm 2).

    For each parameter tensor w with gradient g, at step t:

        m <- beta1 m + (1 - beta1) g;        v <- beta2 v + (1 - beta2) g^2
        r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)       (no bias correction if
                                                                         bias_correction=False)
        u = r + weight_decay * w
        trust = phi(||w||) / ||u||,  = 1 when ||w|| = 0 or ||u|| = 0, or when adaptation=False
        w <- w - lr * trust * u

    with phi(z) = min(max(z, lower), upper) for weight_norm_clamp=(lower, upper), else phi(z) = z.
    Norms are Euclidean norms of the whole tensor (the paper's "layer" is one parameter tensor).

    To exclude biases and normalization weights from decay and from adaptation, put them in their
    own group: ``LAMB([{"params": weights}, {"params": others, "weight_decay": 0.0,
    "adaptation": False}])``.

    Choices where implementations differ
    ------------------------------------
    (From what the author knows of these libraries; the paper is the reference.)
    - Bias correction: the paper's Algorithm 2 divides by (1 - beta^t); timm and optax do too;
      apex FusedLAMB makes it an option; TF-Addons and the original BERT LAMB omit it. Default on
      (the paper), switchable with `bias_correction`.
    - eps: inside the denominator after the square root, 1e-6 by default (paper, timm, apex, optax,
      TF-Addons all use 1e-6).
    - Zero norms: trust ratio 1 when either ||w|| or ||u|| is 0 (timm, optax, TF-Addons, apex); so
      a zero-initialized bias still moves.
    - phi: the paper leaves it as a scaling function with bounds gamma_l, gamma_u; most libraries
      use the identity (optax, TF-Addons, apex), timm clamps the trust ratio itself to <= 1 in its
      "trust_clip" variant. npcpu offers the paper's clamp of the weight norm (`weight_norm_clamp`),
      off by default; the zero-norm test is made on the unclamped norms.
    - Exclusion from decay / adaptation: TF-Addons takes name regexes, timm skips adaptation when
      weight_decay is 0 unless `always_adapt`, apex adapts everything (NVLAMB) or only decayed
      tensors. npcpu uses torch-style parameter groups with explicit "weight_decay" and
      "adaptation" keys: nothing is decided by name or by an unrelated hyperparameter.
    - Gradient pre-normalization: apex and timm clip the global gradient norm (to 1.0) inside the
      optimizer; the paper does not. npcpu leaves clipping to npcpu.optim.clip, before step().
    - Weight decay is decoupled (added to the Adam direction r, not to the gradient), as in the
      paper and in all the implementations above.

    Cost: the trust ratio needs the norms of w and u before w can change, so each step is two
    passes: pass 1 reads w, g, m, v, writes m, v and reduces both norms (in fixed blocks, so the sums
    do not depend on the thread count); pass 2 reads w, m, v again and writes w. That is 7 array
    reads and 3 writes against Adam's 4 and 3: about 1.4x Adam's memory traffic.
    See npcpu.optim.optimizer.Optimizer for `state_dtype`, `master_weights`,
    `stochastic_rounding` and `seed`.
    """

    elementwise = False  # the trust ratio scales a whole tensor's update by its norm

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True,
                 weight_norm_clamp: tuple | None = None, adaptation: bool = True,
                 maximize: bool = False, *, state_dtype: str = "fp32",
                 master_weights: bool = False, stochastic_rounding: bool = True, seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, weight_norm_clamp=weight_norm_clamp,
                        adaptation=adaptation, maximize=maximize)
        super().__init__(params, defaults, state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)

    def _check_group(self, group: dict) -> None:
        check_real("LAMB", "lr", group["lr"], low=0.0)
        check_betas("LAMB", group["betas"])
        check_real("LAMB", "eps", group["eps"], low=0.0, low_open=True)
        check_real("LAMB", "weight_decay", group["weight_decay"], low=0.0)
        check_flag("LAMB", "bias_correction", group["bias_correction"])
        check_weight_norm_clamp("LAMB", group["weight_norm_clamp"])
        check_flag("LAMB", "adaptation", group["adaptation"])
        check_flag("LAMB", "maximize", group["maximize"])

    def _moment_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def trust_ratio(self, weight_norm: float, update_norm: float, group: dict) -> float:
        """phi(||w||) / ||u||, or 1 (zero norms, adaptation off)."""
        if not group["adaptation"] or weight_norm == 0 or update_norm == 0:
            return 1.0
        if group["weight_norm_clamp"] is not None:
            lower, upper = group["weight_norm_clamp"]
            weight_norm = min(max(weight_norm, lower), upper)
        return weight_norm / update_norm

    def _update(self, weights, grad, state, group, rounding) -> None:
        exp_avg, exp_avg_sq = flat(state["exp_avg"]), flat(state["exp_avg_sq"])
        hyper = self._hyper(grad.dtype.type, state["step"], group)
        partial_sums = np.empty((2, kernels.block_count(weights.size)), dtype=np.float64)
        weight_sq, update_sq = kernels.lamb_moments(weights, grad, exp_avg, exp_avg_sq, hyper,
                                                    rounding, partial_sums)
        self._apply(weights, exp_avg, exp_avg_sq, group, hyper, rounding, weight_sq, update_sq)

    def _hyper(self, real, step: int, group: dict) -> kernels.LambHyper:
        """The kernels' settings at `step`, floats of type `real` (the compute dtype)."""
        (beta1, beta2), weight_decay = group["betas"], group["weight_decay"]
        if group["bias_correction"]:
            bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        else:
            bias_correction1, bias_correction2 = 1.0, 1.0
        return kernels.LambHyper(
            one_minus_beta1=real(1 - beta1), beta2=real(beta2), one_minus_beta2=real(1 - beta2),
            eps=real(group["eps"]), weight_decay=real(weight_decay),
            inverse_bias_correction1=real(1 / bias_correction1),
            inverse_bias_correction2=real(1 / bias_correction2), maximize=group["maximize"])

    def _apply(self, weights, exp_avg, exp_avg_sq, group, hyper, rounding, weight_sq: float,
               update_sq: float) -> None:
        """Pass 2, with the trust ratio of the whole tensor's norms ||w||^2, ||u||^2."""
        trust = self.trust_ratio(math.sqrt(weight_sq), math.sqrt(update_sq), group)
        real = type(hyper.eps)  # the compute dtype
        kernels.lamb_apply(weights, exp_avg, exp_avg_sq, real(group["lr"] * trust), hyper, rounding)

    def _step_share(self) -> None:
        """step() on this process's share (Optimizer.share): pass 1 on each of its ranges; the
        norms of a tensor split between processes from the blocks' sums of all its owners (one
        exchange for all such tensors; ranges start at multiples of BLOCK, so these are the whole
        tensor's blocks and the norms the whole tensor's, bit for bit); then pass 2."""
        share, moved = self.share, []
        for p in self._params:
            span = share.range_of(p)
            if span is None or p.frozen or p.grad is None:
                continue
            first, stop = span
            grad = flat(self._checked_grad(p))[first:stop]
            index, group, state, weights = self._count_step(p)
            w, m, v = (flat(a)[first:stop] for a in (weights, state["exp_avg"], state["exp_avg_sq"]))
            hyper = self._hyper(grad.dtype.type, state["step"], group)
            rounding = self._rounding(state, index, first)
            partial_sums = np.empty((2, kernels.block_count(stop - first)), dtype=np.float64)
            norms = kernels.lamb_moments(w, grad, m, v, hyper, rounding, partial_sums)
            moved.append((p, span, weights, (w, m, v), group, hyper, rounding, norms, partial_sums))
        split = [p for p in self._params
                 if share.is_split(p) and not p.frozen and p.grad is not None]
        whole = {}
        if split:  # every process takes part, whether it has a piece of them or not
            partials = {id(m[0]): m[-1] for m in moved if share.is_split(m[0])}
            whole = dict(zip(map(id, split), share.fold_partial_sums(partials, BLOCK, split, 2)))
        for p, (first, stop), weights, arrays, group, hyper, rounding, norms, _ in moved:
            self._apply(*arrays, group, hyper, rounding, *whole.get(id(p), norms))
            self._updated(p, weights, first, stop)
