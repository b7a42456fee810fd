"""Kernels for the synthetic classification set: features from the counter-based rng, labels from a
small random teacher network (npcpu.data.synthetic builds the data set around them).

Dimension legend: n samples, D input_dim, H teacher hidden width, C classes.

For a global sample index g (the data set's index plus its offset):

    x[g, j] = float32(normal(seed, FEATURES, g * D + j))          j = 0 .. D-1
    h       = tanh(w1 @ x[g])                                      w1 (H, D)
    logits  = w2 @ h + b2                                          w2 (C, H), b2 (C,)
    y[g]    = argmax(logits)                                       (the first maximum on ties)
    if uniform(seed, NOISE_DECIDE, g) < label_noise:
        y[g] = min(floor(uniform(seed, NOISE_CLASS, g) * C), C - 1)

The teacher runs in float64 on the float32 features, so a label is a function of exactly the
features a model sees. Every number is a pure function of (seed, stream, counter): a sample is the
same in any batch, any order, any thread count and any process.
"""

import numpy as np
from numba import njit, prange, uint64

from npcpu.kernels.rng import normal, uniform

# rng streams
FEATURES = 0
TEACHER = 1
NOISE_DECIDE = 2
NOISE_CLASS = 3
CALIBRATION = 4


@njit(parallel=True, cache=True)
def fill_normal(seed, stream, out):
    """out[i] = normal(seed, stream, i) for a 1-D `out` (float64, or float32: rounded)."""
    for i in prange(out.size):
        out[i] = normal(seed, stream, i)


@njit(cache=True)
def _teacher_logits_row(x_row, w1, w2, b2, hidden_buf, logits_row):
    """logits_row (C,) = w2 @ tanh(w1 @ x_row) + b2, summed in float64 in index order."""
    for k in range(w1.shape[0]):
        acc = 0.0
        for j in range(x_row.size):
            acc += w1[k, j] * np.float64(x_row[j])
        hidden_buf[k] = np.tanh(acc)
    for c in range(w2.shape[0]):
        acc = b2[c]
        for k in range(w2.shape[1]):
            acc += w2[c, k] * hidden_buf[k]
        logits_row[c] = acc


@njit(parallel=True, cache=True)
def teacher_logits(x, w1, w2, b2, logits_out):
    """logits_out (n, C) float64 = the teacher's logits for the rows of x (n, D)."""
    for s in prange(x.shape[0]):
        hidden_buf = np.empty(w1.shape[0])
        _teacher_logits_row(x[s], w1, w2, b2, hidden_buf, logits_out[s])


@njit(parallel=True, cache=True)
def synthetic_batch(seed, global_indices, w1, w2, b2, label_noise, x_out, y_out):
    """Fill x_out (n, D) float32 and y_out (n,) int64 with the samples `global_indices` (n,) int64.

    w1 (H, D), w2 (C, H) and b2 (C,) are float64; 0 <= label_noise <= 1.
    """
    n, input_dim = x_out.shape
    num_classes = w2.shape[0]
    for s in prange(n):
        g = uint64(global_indices[s])
        base = g * uint64(input_dim)
        for j in range(input_dim):
            x_out[s, j] = np.float32(normal(seed, FEATURES, base + uint64(j)))
        hidden_buf = np.empty(w1.shape[0])
        logits = np.empty(num_classes)
        _teacher_logits_row(x_out[s], w1, w2, b2, hidden_buf, logits)
        y_out[s] = np.argmax(logits)
        if label_noise > 0.0 and uniform(seed, NOISE_DECIDE, g) < label_noise:
            y_out[s] = min(int(uniform(seed, NOISE_CLASS, g) * num_classes), num_classes - 1)
