"""SyntheticText: token sequences from a seeded sparse Markov chain whose entropy is known exactly.

A language model trained on it can be compared with the best loss any model can reach: the
conditional entropy of each target given everything before it, which for this source is computed
in closed form from the chain (`entropy_floor`).

The source. V tokens; a state is the last k tokens (k = `order`), S = V**k states. Each state may
be followed by `branching` distinct tokens, chosen at random, with probabilities proportional to
independent Exp(1) draws (a flat Dirichlet). pi is the chain's stationary distribution over
states (lazy power iteration: pi <- (pi + pi P) / 2 from uniform, which converges for any chain).

Sequences. Sequence i of a stream has L = block_size + 1 tokens: its first k tokens are a state
drawn from pi, the rest follow the chain (npcpu.text.sampling.markov_sequences, counter-based).
Starting from pi makes every position's state distributed as pi, so with x = seq[:T], y = seq[1:]:

    target t >= k (0-based in seq):  H(seq[t] | seq[:t]) = H_rate = sum_s pi_s H(P_s)
    target 1 <= t < k:               H(seq[t] | seq[:t]) = H(seq[:t+1]) - H(seq[:t]),
                                     entropies of marginals of pi
    floor(T) = mean of these over the T targets t = 1 .. T, in nats per token

Training batch `step` holds sequences step * B ... step * B + B - 1 of the training stream (so,
as in TextDataset, batch(s * k + i, B) for i < k are the rows of batch(s, k * B)); the evaluation
set is the first `eval_sequences` of a separate stream: held-out sequences of the same chain.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from npcpu.checks import check_int
from npcpu.text.dataset import language_model_metrics
from npcpu.text.sampling import (CHAIN_SUCCESSORS, CHAIN_WEIGHTS, EVAL_SEQUENCES,
                                 TRAIN_SEQUENCES, fill_uniform, markov_sequences)

_MAX_STATES = 1 << 16
_STATIONARY_TOLERANCE = 1e-13
_STATIONARY_MAX_ITERATIONS = 200_000


def _entropy(p: np.ndarray, axis=None) -> np.ndarray:
    """-sum p log p (nats) along `axis`, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def _stationary(successors, probabilities, vocab_size: int) -> np.ndarray:
    """pi (S,) with pi P = pi for the chain state s -> (s * V + successors[s, j]) mod S."""
    num_states, branching = successors.shape
    rows = np.repeat(np.arange(num_states), branching)
    cols = (rows * vocab_size + successors.reshape(-1)) % num_states
    transition = scipy.sparse.csr_matrix((probabilities.reshape(-1), (rows, cols)),
                                         shape=(num_states, num_states))
    pi = np.full(num_states, 1.0 / num_states)
    for _ in range(_STATIONARY_MAX_ITERATIONS):
        new = 0.5 * (pi + transition.T @ pi)
        new /= new.sum()
        if np.abs(new - pi).sum() < _STATIONARY_TOLERANCE:
            return new
        pi = new
    raise RuntimeError("SyntheticText: the stationary distribution did not converge")


class SyntheticText:
    """On-demand token sequences of a seeded order-k Markov chain (see the module docstring).

    Parameters
    ----------
    vocab_size : int
        V >= 2.
    block_size : int
        T: sequences have T + 1 tokens, giving (x, y) of T positions.
    order : int
        k >= 1, tokens of context that decide the next token's distribution (V**k <= 65536).
    branching : int
        Tokens that may follow each state, in [1, V].
    seed : int
        Chooses the chain and the sequences.
    eval_sequences : int
        Sequences in the evaluation set.
    """

    def __init__(self, vocab_size: int = 16, block_size: int = 64, *, order: int = 2,
                 branching: int = 4, seed: int = 0, eval_sequences: int = 256):
        owner = "SyntheticText"
        self.vocab_size = check_int(owner, "vocab_size", vocab_size, 2)
        self.block_size = check_int(owner, "block_size", block_size, 1)
        self.order = check_int(owner, "order", order, 1)
        self.branching = check_int(owner, "branching", branching, 1, self.vocab_size + 1)
        self.seed = check_int(owner, "seed", seed, 0, 2**63)
        self.eval_sequences = check_int(owner, "eval_sequences", eval_sequences, 1)
        if self.vocab_size ** self.order > _MAX_STATES:
            raise ValueError(f"{owner}: vocab_size ** order = {self.vocab_size ** self.order} "
                             f"states, more than {_MAX_STATES}")
        num_states = self.vocab_size ** self.order

        keys = np.empty(num_states * self.vocab_size)
        fill_uniform(self.seed, CHAIN_SUCCESSORS, 0, keys)
        order_of_keys = np.argsort(keys.reshape(num_states, self.vocab_size), axis=1)
        self.successors = np.ascontiguousarray(order_of_keys[:, :self.branching]).astype(np.int64)
        weights = np.empty(num_states * self.branching)
        fill_uniform(self.seed, CHAIN_WEIGHTS, 0, weights)
        weights = -np.log1p(-weights.reshape(num_states, self.branching))  # Exp(1)
        self.probabilities = weights / weights.sum(axis=1, keepdims=True)
        self.successor_cdf = np.cumsum(self.probabilities, axis=1)
        self.successor_cdf[:, -1] = 1.0
        self.stationary = _stationary(self.successors, self.probabilities, self.vocab_size)
        self.start_cdf = np.cumsum(self.stationary)
        self.start_cdf[-1] = 1.0
        self.entropy_rate = float(self.stationary @ _entropy(self.probabilities, axis=1))
        self.eval_tokens = self.eval_sequences * self.block_size

    def sequences(self, stream: int, first: int, count: int) -> np.ndarray:
        """(count, T + 1) int64: sequences first ... first + count - 1 of `stream`."""
        out = np.empty((count, self.block_size + 1), dtype=np.int64)
        markov_sequences(self.seed, stream, first, self.start_cdf, self.successors,
                         self.successor_cdf, self.vocab_size, self.order, out)
        return out

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) (B, T) int64 of training sequences, a pure function of (seed, step, B)."""
        step = check_int("SyntheticText", "step", step, 0)
        batch_size = check_int("SyntheticText", "batch_size", batch_size, 1)
        seqs = self.sequences(TRAIN_SEQUENCES, step * batch_size, batch_size)
        return np.ascontiguousarray(seqs[:, :-1]), np.ascontiguousarray(seqs[:, 1:])

    def eval_batches(self, batch_size: int):
        """Yield (x, y) of up to B of the fixed evaluation sequences, each once."""
        batch_size = check_int("SyntheticText", "batch_size", batch_size, 1)
        for first in range(0, self.eval_sequences, batch_size):
            seqs = self.sequences(EVAL_SEQUENCES, first,
                                  min(batch_size, self.eval_sequences - first))
            yield np.ascontiguousarray(seqs[:, :-1]), np.ascontiguousarray(seqs[:, 1:])

    def prefix_entropies(self) -> np.ndarray:
        """(k,) H(seq[:m]) for m = 1 .. k in nats: entropies of the marginals of pi."""
        pi = self.stationary
        return np.array([_entropy(pi.reshape(self.vocab_size ** m, -1).sum(axis=1))
                         for m in range(1, self.order + 1)])

    def position_entropies(self, block_size: int | None = None) -> np.ndarray:
        """(T,) H(y[t] | x[:t+1]) in nats: the least expected loss at each position t."""
        block_size = self.block_size if block_size is None else check_int(
            "SyntheticText", "block_size", block_size, 1)
        joint = self.prefix_entropies()
        head = np.diff(joint)  # targets seq[1] ... seq[k-1]
        out = np.full(block_size, self.entropy_rate)
        out[:min(head.shape[0], block_size)] = head[:block_size]
        return out

    def entropy_floor(self, block_size: int | None = None) -> float:
        """Least expected loss per token (nats) of any model on windows of block_size positions:
        the mean of position_entropies."""
        return float(self.position_entropies(block_size).mean())

    def metrics(self, summed_loss: float, tokens: int) -> dict:
        """Loss and perplexity, the entropy floor and the excess loss above it."""
        metrics = language_model_metrics(summed_loss, tokens)
        metrics["entropy_floor"] = self.entropy_floor()
        metrics["excess_loss"] = metrics["loss"] - metrics["entropy_floor"]
        return metrics

    def unigram_entropy(self) -> float:
        """Entropy in nats of one token drawn from the stationary distribution."""
        return float(self.prefix_entropies()[0])
