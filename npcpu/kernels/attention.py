"""The fused masked softmax of causal self-attention, forward and backward, between its GEMMs.

Dimension legend: G = batch * heads (each (b, h) pair is one independent attention), T queries,
S keys (S = T in training; S = offset + T with a key/value cache, the first `offset` keys being
earlier positions). Query t sits at absolute position offset + t and may attend to keys
0 .. offset + t: the causal mask. Arrays are float32 or float64 (Numba specializes per dtype).

    scores (G, T, S)   q k^T from the GEMMs, turned in place into probs = softmax(scale * scores)
    probs  (G, T, S)   softmax over the allowed keys of each row, exactly 0 at masked keys
    dprobs (G, T, S)   dL/dprobs from the GEMMs; turned in place into dL/dscores (times scale)
    scale              1 / sqrt(head_size): applied here, not in the GEMMs, whose batched form has
                       no alpha

Rows are independent, so both kernels run one row per iteration of a parallel loop; each row is
read once for its maximum, once for exp and sum, once to normalize, and never past its last
allowed key (the masked part is written with zeros without being read).
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels.fastexp import exp32, row_sum


@njit(parallel=True, cache=True)
def causal_softmax_forward(scores, offset, scale):
    """probs = softmax of scale * scores over keys 0 .. offset + t of each row t, in place; 0 at
    masked keys.

    For row (g, t) with n = min(S, offset + t + 1) allowed keys, x = scale * scores[g, t]:

        m          = max_{s < n} x[s]                                   (stable: exp(. - m) <= 1)
        probs[s]   = exp(x[s] - m) / sum_{s' < n} exp(x[s'] - m)                for s < n
        probs[s]   = 0                                                         for s >= n

    The sum accumulates in float64; exp is npcpu.kernels.fastexp's (within 2 ulp in float32). No
    fastmath: a NaN in the scores must reach the loss.
    """
    groups, queries, keys = scores.shape
    for row in prange(groups * queries):
        g, t = row // queries, row % queries
        softmax_row(scores[g, t], min(keys, offset + t + 1), scale)


@njit(cache=True)
def softmax_row(x, allowed, scale):
    """One row of causal_softmax_forward, in place: x[:allowed] = softmax(scale * x[:allowed]),
    x[allowed:] = 0 (written, not read). Also called by npcpu.kernels.attention_tiles.

    The exponentials are fastexp's exp32 element by element (np.exp for float64): a row holds at
    most T values, too few for a separate pass through a scratch array of 2^k to pay."""
    keys = x.shape[0]
    for s in range(allowed):
        x[s] *= scale
    row_max = x[0]
    for s in range(1, allowed):
        if x[s] > row_max:
            row_max = x[s]
    if x.itemsize == 4:
        for s in range(allowed):
            x[s] = exp32(x[s] - row_max)
    else:
        for s in range(allowed):
            x[s] = np.exp(x[s] - row_max)
    inv_total = 1.0 / row_sum(x, allowed)
    for s in range(allowed):
        x[s] *= inv_total
    for s in range(allowed, keys):
        x[s] = 0.0


@njit(parallel=True, cache=True)
def causal_softmax_backward(dprobs, probs, offset, scale):
    """dscores = scale * probs * (dprobs - sum_s dprobs * probs) for each row, in place over dprobs.

    In the forward pass this was `probs[s] = exp(x[s] - m) / sum exp(...)`, x = scale * scores,
    whose Jacobian is dprobs[s] / dx[s'] = probs[s] (delta(s, s') - probs[s']); its product with
    the upstream row, times dx/dscores = scale, is the line above (the max m cancels). Masked keys
    had no influence on the output, so their dscores is 0 (written, not computed: an Inf in dprobs
    there does not leak through 0 * Inf).
    """
    groups, queries, keys = dprobs.shape
    for row in prange(groups * queries):
        g, t = row // queries, row % queries
        softmax_row_backward(dprobs[g, t], probs[g, t], min(keys, offset + t + 1), scale)


@njit(cache=True, fastmath={"reassoc"})
def row_dot(a, b, n):
    """sum(a[:n] * b[:n]) in float64, in any order (so that it vectorizes; NaN and Inf still
    propagate, as in fastexp.row_sum)."""
    total = 0.0
    for i in range(n):
        total += a[i] * b[i]
    return total


@njit(cache=True)
def softmax_row_backward(dp, p, allowed, scale):
    """One row of causal_softmax_backward, in place over dp (also called by
    npcpu.kernels.attention_tiles)."""
    dot = row_dot(dp, p, allowed)
    for s in range(allowed):
        dp[s] = scale * p[s] * (dp[s] - dot)
    for s in range(allowed, dp.shape[0]):
        dp[s] = 0.0
