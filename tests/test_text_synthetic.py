"""SyntheticText: the sampler against a NumPy twin, determinism, the stated entropies measured."""

import numpy as np
import pytest

from npcpu.text.sampling import (EVAL_SEQUENCES, TRAIN_SEQUENCES, fill_uniform,
                                 markov_sequences)
from npcpu.text.synthetic import SyntheticText
from test_synthetic import uniform_twin


def markov_twin(seed, stream, first, count, source):
    """Sequences of markov_sequences written out token by token with the uniform twin."""
    V, k, L = source.vocab_size, source.order, source.block_size + 1
    out = np.empty((count, L), dtype=np.int64)
    for i in range(count):
        counters = (first + i) * L + np.arange(L, dtype=np.uint64)
        u = uniform_twin(seed, stream, counters)
        state = min(np.searchsorted(source.start_cdf, u[0], side="right"), V ** k - 1)
        out[i, :k] = [(state // V ** (k - 1 - t)) % V for t in range(k)]
        for t in range(k, L):
            j = min(np.searchsorted(source.successor_cdf[state], u[t], side="right"),
                    source.branching - 1)
            out[i, t] = source.successors[state, j]
            state = (state * V + out[i, t]) % V ** k
    return out


@pytest.mark.parametrize("vocab_size, order, branching, block_size", [
    (5, 1, 2, 1), (7, 2, 3, 10), (3, 3, 3, 6), (11, 2, 1, 4)])
def test_markov_sequences_match_twin(num_threads, vocab_size, order, branching, block_size):
    source = SyntheticText(vocab_size, block_size, order=order, branching=branching, seed=3)
    for stream, first, count in ((TRAIN_SEQUENCES, 0, 13), (EVAL_SEQUENCES, 1000, 5)):
        np.testing.assert_array_equal(source.sequences(stream, first, count),
                                      markov_twin(3, stream, first, count, source))


def test_fill_uniform_matches_twin(num_threads):
    out = np.empty(1001)
    fill_uniform(9, 2, 77, out)
    np.testing.assert_array_equal(out, uniform_twin(9, 2, 77 + np.arange(1001, dtype=np.uint64)))


def test_chain_is_sparse_and_pi_is_stationary():
    source = SyntheticText(16, 8, order=2, branching=3, seed=1)
    assert source.successors.shape == (256, 3) and source.probabilities.shape == (256, 3)
    assert all(len(set(row)) == 3 for row in source.successors.tolist())
    np.testing.assert_allclose(source.probabilities.sum(axis=1), 1.0)
    pi = source.stationary
    moved = np.zeros_like(pi)
    for j in range(3):
        np.add.at(moved, (np.arange(256) * 16 + source.successors[:, j]) % 256,
                  pi * source.probabilities[:, j])
    np.testing.assert_allclose(moved, pi, atol=1e-12)
    assert pi.sum() == pytest.approx(1.0)


def test_batches_are_a_pure_function_of_seed_and_step():
    source = SyntheticText(32, 24, seed=5)
    x, y = source.batch(4, 6)
    assert x.shape == y.shape == (6, 24) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    again = SyntheticText(32, 24, seed=5).batch(4, 6)
    np.testing.assert_array_equal(again[0], x)
    np.testing.assert_array_equal(again[1], y)
    assert not np.array_equal(source.batch(5, 6)[0], x)
    assert not np.array_equal(SyntheticText(32, 24, seed=6).batch(4, 6)[0], x)


def test_eval_sequences_are_fixed_held_out_and_whole():
    source = SyntheticText(32, 16, seed=0, eval_sequences=10)
    first = [np.concatenate(p) for p in zip(*source.eval_batches(4))]
    second = [np.concatenate(p) for p in zip(*source.eval_batches(3))]
    assert first[0].shape == (10, 16) and source.eval_tokens == 160
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], source.batch(0, 10)[0])


@pytest.mark.parametrize("order", [1, 2])
def test_empirical_conditional_entropy_matches_the_stated_rate(order):
    """Over many sampled sequences: the mean of -log p(token | state) under the chain is an
    unbiased estimate of the entropy rate (checked within 4 standard errors), and the plug-in
    entropy of the observed transition counts agrees too (its downward bias is below
    (cells - states) / (2 N) nats, allowed for)."""
    source = SyntheticText(12, 63, order=order, branching=4, seed=2)
    V, k, S = source.vocab_size, order, source.vocab_size ** order
    seqs = source.sequences(TRAIN_SEQUENCES, 0, 4000)
    states = np.zeros((seqs.shape[0], seqs.shape[1] - k), dtype=np.int64)
    for t in range(k):
        states = states * V + seqs[:, t:t + states.shape[1]]
    states, nxt = states.reshape(-1), seqs[:, k:].reshape(-1)
    where = source.successors[states] == nxt[:, None]
    assert where.any(axis=1).all()  # only allowed successors appear
    nll = -np.log(source.probabilities[states, np.argmax(where, axis=1)])
    standard_error = nll.std() / np.sqrt(nll.size)
    assert abs(nll.mean() - source.entropy_rate) < 4 * standard_error

    counts = np.bincount(states * V + nxt, minlength=S * V).reshape(S, V).astype(float)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plug_in = -np.nansum(counts * np.where(p > 0, np.log(p), 0.0)) / counts.sum()
    bias = (np.count_nonzero(counts) - np.count_nonzero(counts.sum(axis=1))) / (2 * counts.sum())
    assert abs(plug_in + bias - source.entropy_rate) < 4 * standard_error + bias


def test_first_state_is_stationary_and_the_floor_is_the_mean_of_positions():
    source = SyntheticText(6, 5, order=2, branching=3, seed=4)
    seqs = source.sequences(TRAIN_SEQUENCES, 0, 60_000)
    first_states = np.bincount(seqs[:, 0] * 6 + seqs[:, 1], minlength=36) / len(seqs)
    assert np.abs(first_states - source.stationary).max() < 4 * np.sqrt(0.25 / len(seqs))
    later_states = np.bincount(seqs[:, 3] * 6 + seqs[:, 4], minlength=36) / len(seqs)
    assert np.abs(later_states - source.stationary).max() < 4 * np.sqrt(0.25 / len(seqs))

    pair = source.stationary.reshape(6, 6)
    h = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    head = h(pair) - h(pair.sum(axis=1))  # H(seq[1] | seq[0])
    expected = np.array([head] + [source.entropy_rate] * 4)
    np.testing.assert_allclose(source.position_entropies(), expected)
    assert source.entropy_floor() == pytest.approx(expected.mean())
    assert source.entropy_floor(1) == pytest.approx(head)
    assert source.unigram_entropy() == pytest.approx(h(pair.sum(axis=1)))
    assert source.entropy_rate < source.entropy_floor() < source.unigram_entropy()

    first_order = SyntheticText(6, 5, order=1, seed=4)
    assert first_order.entropy_floor(1) == first_order.entropy_floor(50) == \
        pytest.approx(first_order.entropy_rate)


def test_metrics_report_the_excess_over_the_floor():
    source = SyntheticText(8, 10, order=1, seed=0)
    m = source.metrics(summed_loss=(source.entropy_rate + 0.25) * 100, tokens=100)
    assert m["excess_loss"] == pytest.approx(0.25)
    assert m["perplexity"] == pytest.approx(np.exp(source.entropy_rate + 0.25))


def test_argument_errors():
    with pytest.raises(ValueError, match="states, more than 65536"):
        SyntheticText(300, 8, order=2)
    with pytest.raises(ValueError, match=r"branching must be in \[1, 5\)"):
        SyntheticText(4, 8, branching=5)
    with pytest.raises(ValueError, match="vocab_size must be >= 2"):
        SyntheticText(1, 8)


def test_a_count_model_reaches_the_entropy_floor():
    """Order-2 transition counts from 300 training batches, scored on the evaluation set (the
    first target, which has one token of context, by unigram counts): within 0.03 nats above the
    floor, and not below it by more than the evaluation's sampling error."""
    source = SyntheticText(32, 64, order=2, branching=4, seed=0)
    counts = np.zeros((32 * 32, 32))
    for step in range(300):
        x, y = source.batch(step, 32)
        np.add.at(counts, ((x[:, :-1] * 32 + x[:, 1:]).reshape(-1), y[:, 1:].reshape(-1)), 1.0)
    log_p = np.log((counts + 0.01) / (counts + 0.01).sum(axis=1, keepdims=True))
    log_unigram = np.log((counts.sum(axis=0) + 1.0) / (counts.sum() + 32))
    summed, losses = 0.0, []
    for x, y in source.eval_batches(64):
        losses.append(-log_unigram[y[:, 0]])
        losses.append(-log_p[x[:, :-1] * 32 + x[:, 1:], y[:, 1:]].reshape(-1))
    losses = np.concatenate(losses)
    assert losses.size == source.eval_tokens
    excess = source.metrics(losses.sum(), losses.size)["excess_loss"]
    assert -4 * losses.std() / np.sqrt(losses.size) < excess < 0.03


def test_micro_batches_are_the_rows_of_one_large_batch():
    source = SyntheticText(16, 12, seed=1)
    large_x, _ = source.batch(2, 6)
    for i in range(3):
        np.testing.assert_array_equal(source.batch(2 * 3 + i, 2)[0], large_x[2 * i:2 * i + 2])
