"""Softmax cross-entropy: loss and gradient per row in one fused pass.

Dimension legend: N rows (every leading dimension flattened: batch * time), C classes.
logits are float32 or float64; targets an integer class index per row.

No fastmath here: a NaN or Inf in the logits must reach the loss, where the loss scaler sees it.
The exponentials go through npcpu.kernels.fastexp (vectorized; within 2 ulp in float32).
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels.fastexp import exp_shifted, row_sum


@njit(parallel=True, cache=True)
def cross_entropy_forward_backward(losses, dlogits, logits, targets, ignore_index, label_smoothing,
                                   grad_scale, classes):
    """Per-row loss and its gradient for logits (N, P) and targets (N,), over the first `classes`
    columns (C = classes <= P): columns C .. P - 1 are vocabulary padding, left out of the softmax,
    and get a zero gradient. `dlogits` may be `logits` itself (the gradient written in place: every
    logit of a row is read before the row is overwritten).

    Writes losses (N,) (float64) and dlogits (N, C). With eps = label_smoothing, the target
    distribution of a row is q = (1 - eps) * onehot(t) + eps / C (torch's label smoothing), and

        lse       = max + log(sum_c exp(logits[c] - max))       (stable log-sum-exp)
        loss      = sum_c q[c] * (lse - logits[c])
                  = lse - (1 - eps) * logits[t] - eps / C * sum_c logits[c]
        dlogits[c] = (softmax[c] - q[c]) * grad_scale,   softmax[c] = exp(logits[c] - max) / sum_exp

    `grad_scale` is 1 / (the mean's divisor) for reduction "mean", 1 for "sum". A row whose target
    is `ignore_index` gets loss 0 and a zero gradient.
    """
    rows, padded = logits.shape
    in_place = dlogits.ctypes.data == logits.ctypes.data
    smooth_per_class = label_smoothing / classes
    for n in prange(rows):
        x = logits[n]
        target = targets[n]
        for c in range(classes, padded):
            dlogits[n, c] = 0.0
        if target == ignore_index:
            losses[n] = 0.0
            for c in range(classes):
                dlogits[n, c] = 0.0
            continue
        target_logit = x[target]
        # the row maximum, in the logits' dtype (so that exp runs in it too); a NaN never wins a
        # comparison, and it still poisons the sum below
        row_max = x[0]
        for c in range(1, classes):
            if x[c] > row_max:
                row_max = x[c]
        sum_logits = 0.0
        if label_smoothing > 0.0:
            for c in range(classes):
                sum_logits += x[c]
        # exp(logits - max), kept in dlogits so that the gradient loop below needs no second exp
        out = dlogits[n]
        if in_place:  # one array passed twice: LLVM's overlap check would refuse to vectorize
            exp_shifted(out, out, classes, row_max, np.empty(classes, np.int32))
        else:
            exp_shifted(out, x, classes, row_max, np.empty(classes, np.int32))
        sum_exp = row_sum(dlogits[n], classes)
        lse = row_max + np.log(sum_exp)
        loss = lse - (1.0 - label_smoothing) * target_logit
        if label_smoothing > 0.0:  # guarded: 0 * (-inf) from a -inf logit would be NaN
            loss -= smooth_per_class * sum_logits
        losses[n] = loss
        inv_sum_exp = 1.0 / sum_exp
        for c in range(classes):
            dlogits[n, c] = (dlogits[n, c] * inv_sum_exp - smooth_per_class) * grad_scale
        dlogits[n, target] -= (1.0 - label_smoothing) * grad_scale
