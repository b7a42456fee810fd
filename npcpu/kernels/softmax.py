"""Softmax cross-entropy: loss and gradient per row in one fused pass (for a small batch of short
rows, in two passes around one exp over the whole batch).

Dimension legend: N rows (every leading dimension flattened: batch * time), C classes.
logits are float32 or float64; targets an integer class index per row.

No fastmath here: a NaN or Inf in the logits must reach the loss, where the loss scaler sees it.
The exponentials go through npcpu.kernels.fastexp (vectorized; within 2 ulp in float32).
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels.fastexp import exp_in_place, exp_shifted, row_sum

@njit(cache=True, inline="always")
def _row_statistics(x, target, classes, label_smoothing):
    """(max, x[target], sum of x) over the first `classes` logits of row x, read before anything
    overwrites them. The max is in the logits' dtype (so that exp runs in it too); a NaN never
    wins a comparison, and it still poisons the sum of exponentials. The sum of the logits is
    taken only with label smoothing (0 otherwise)."""
    row_max = x[0]
    for c in range(1, classes):
        if x[c] > row_max:
            row_max = x[c]
    sum_logits = 0.0
    if label_smoothing > 0.0:
        for c in range(classes):
            sum_logits += x[c]
    return row_max, x[target], sum_logits


@njit(cache=True, inline="always")
def _loss_and_gradient(out, target, classes, row_max, target_logit, sum_logits, label_smoothing,
                       grad_scale):
    """From out[:classes] = exp(logits - max) of one row: the row's loss (returned, float64), and
    its gradient written over out[:classes] (the formulas of `cross_entropy_forward_backward`)."""
    smooth_per_class = label_smoothing / classes
    sum_exp = row_sum(out, classes)
    lse = row_max + np.log(sum_exp)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing > 0.0:  # guarded: 0 * (-inf) from a -inf logit would be NaN
        loss -= smooth_per_class * sum_logits
    inv_sum_exp = 1.0 / sum_exp
    for c in range(classes):
        out[c] = (out[c] * inv_sum_exp - smooth_per_class) * grad_scale
    out[target] -= (1.0 - label_smoothing) * grad_scale
    return loss


@njit(cache=True, inline="always")
def cross_entropy_row(x, target, classes, label_smoothing, grad_scale, out, in_place, bits):
    """The loss of one row of logits x (P,) over its first `classes` columns against class `target`
    (returned, float64), and its gradient into out (P,): the formulas of
    `cross_entropy_forward_backward`. Columns classes .. P - 1 (vocabulary padding) get a zero
    gradient. `out` may be `x` itself (`in_place` True: every logit is read before it is
    overwritten). `bits` is int32 scratch of at least `classes` elements. Also the loss of the
    compiled training step (npcpu.kernels.compiled_step)."""
    for c in range(classes, x.size):
        out[c] = 0.0
    row_max, target_logit, sum_logits = _row_statistics(x, target, classes, label_smoothing)
    # exp(logits - max), kept in out so that the gradient loop needs no second exp
    if in_place:  # one array passed twice: LLVM's overlap check would refuse to vectorize
        exp_shifted(out, out, classes, row_max, bits)
    else:
        exp_shifted(out, x, classes, row_max, bits)
    return _loss_and_gradient(out, target, classes, row_max, target_logit, sum_logits,
                              label_smoothing, grad_scale)


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
    in_place = dlogits.ctypes.data == logits.ctypes.data
    for n in prange(logits.shape[0]):
        if targets[n] == ignore_index:
            losses[n] = 0.0
            dlogits[n, :] = 0.0
        else:
            losses[n] = cross_entropy_row(logits[n], targets[n], classes, label_smoothing,
                                          grad_scale, dlogits[n], in_place,
                                          np.empty(classes, np.int32))


@njit(cache=True)
def cross_entropy_forward_backward_serial(losses, dlogits, logits, targets, ignore_index,
                                          label_smoothing, grad_scale, classes):
    """cross_entropy_forward_backward on the calling thread, for a small batch of logits
    (npcpu.kernels.launch), with the same results bit for bit.

    A classifier's rows are short (10 classes): one row's exponentials are too few to fill a
    vector register, so here they are taken for the whole batch at once. Pass 1 reads each row's
    statistics and writes logits - max into dlogits; one flat loop then takes every exp
    (vectorized across rows); pass 2 finishes each row as cross_entropy_row does.
    """
    rows = logits.shape[0]
    statistics = np.empty((rows, 3), np.float64)  # max, target logit, sum of logits
    for n in range(rows):
        x, out = logits[n], dlogits[n]
        if targets[n] == ignore_index:
            out[:] = 0.0  # exp(0) = 1 below, zeroed again in pass 2
            continue
        row_max, target_logit, sum_logits = _row_statistics(x, targets[n], classes,
                                                            label_smoothing)
        statistics[n, 0], statistics[n, 1], statistics[n, 2] = row_max, target_logit, sum_logits
        for c in range(classes):  # x[c] is read before out[c] is written (they may be one)
            out[c] = x[c] - row_max
    exp_in_place(dlogits.reshape(-1))  # padding columns too: they are overwritten in pass 2
    for n in range(rows):
        out = dlogits[n]
        if targets[n] == ignore_index:
            losses[n] = 0.0
            out[:] = 0.0
            continue
        for c in range(classes, out.size):
            out[c] = 0.0
        row_max = logits.dtype.type(statistics[n, 0])
        losses[n] = _loss_and_gradient(out, targets[n], classes, row_max, statistics[n, 1],
                                       statistics[n, 2], label_smoothing, grad_scale)


@njit(cache=True)
def target_bounds(targets):
    """(min, max) of a non-empty integer array in one pass (the range check of every loss call)."""
    low = high = targets[0]
    for n in range(1, targets.size):
        low, high = min(low, targets[n]), max(high, targets[n])
    return low, high
