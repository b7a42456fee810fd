"""Kernels of the text data: counter-based uniforms, window starts, Markov sequences.

Every random number is npcpu.kernels.rng.uniform(seed, stream, counter): the same value for the
same counter in any order and any thread, so a batch is a pure function of (seed, step) and a
resumed run draws exactly what an uninterrupted one would. The streams of one seed are the
constants below.
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels.rng import uniform

TRAIN_WINDOWS = 0   # TextDataset: window i of training starts at floor(u_i * starts)
CHAIN_SUCCESSORS = 1  # SyntheticText: which tokens may follow each state
CHAIN_WEIGHTS = 2     # SyntheticText: their probabilities
TRAIN_SEQUENCES = 3   # SyntheticText: training sequence i uses counters i * L ... i * L + L - 1
EVAL_SEQUENCES = 4    # SyntheticText: the same for evaluation sequences


@njit(parallel=True, cache=True)
def fill_uniform(seed, stream, first, out):
    """out[i] = uniform(seed, stream, first + i): float64 in [0, 1), out 1-D."""
    for i in prange(out.shape[0]):
        out[i] = uniform(seed, stream, first + i)


@njit(cache=True)
def window_starts(seed, stream, first, count, out):
    """out[i] = floor(uniform(seed, stream, first + i) * count), an int in [0, count).

    A float64 uniform has 53 random bits, so for count well below 2**53 every start is about
    equally likely (relative bias below count / 2**53); min() guards the rounding of u * count up
    to count.
    """
    for i in range(out.shape[0]):
        out[i] = min(np.int64(uniform(seed, stream, first + i) * count), count - 1)


@njit(cache=True)
def _inverse_cdf(cdf, u):
    """The first j with u < cdf[j] (cdf increasing, its last entry 1), clamped to the last j."""
    j = np.searchsorted(cdf, u, side="right")
    return min(j, cdf.shape[0] - 1)


@njit(parallel=True, cache=True)
def markov_sequences(seed, stream, first, start_cdf, successors, successor_cdf, vocab_size,
                     order, out):
    """Sequence `first + i` of an order-`order` Markov chain in out[i], for each row i.

    start_cdf (S,): cumulative stationary probabilities of the S = V**order states, a state being
    the last `order` tokens read as a base-V number (oldest most significant). successors (S, K)
    and successor_cdf (S, K): the K tokens that may follow each state, and their cumulative
    probabilities. out (N, L) int64 with L > order.

    The first `order` tokens are one draw of a state from start_cdf (counter base + 0); token
    t >= order is a draw from the row of the state before it (counter base + t), base = index * L.
    """
    num_states = start_cdf.shape[0]
    length = out.shape[1]
    for i in prange(out.shape[0]):
        base = (first + i) * length
        state = _inverse_cdf(start_cdf, uniform(seed, stream, base))
        rest = state
        for t in range(order - 1, -1, -1):
            out[i, t] = rest % vocab_size
            rest //= vocab_size
        for t in range(order, length):
            j = _inverse_cdf(successor_cdf[state], uniform(seed, stream, base + t))
            token = successors[state, j]
            out[i, t] = token
            state = (state * vocab_size + token) % num_states
