"""A Parameter shared by two layers (weight tying): its gradient is the sum over both uses, and an
optimizer updating inside backward updates it once, at its last use (Parameter.uses_per_backward)."""

import numpy as np
import pytest

from npcpu.nn import weight_blocks
from npcpu.nn.embedding import Embedding
from npcpu.nn.linear import Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam
from statecheck import assert_same_state

VOCAB, WIDTH = 11, 8


def embedding_and_tied_head(seed: int = 0) -> Sequential:
    """tokens -> Embedding(V, D) -> Linear(D, V), the head's weight (V, D) being the embedding's."""
    embedding, head = Embedding(VOCAB, WIDTH, seed=seed), Linear(WIDTH, VOCAB, seed=seed + 1)
    head.weight = embedding.weight
    return Sequential(embedding, head)


def two_linears_one_weight(seed: int = 0) -> Sequential:
    """x -> Linear(D, D) -> Linear(D, D) with one weight: the backward's last use is a Linear's."""
    first, second = Linear(WIDTH, WIDTH, seed=seed), Linear(WIDTH, WIDTH, seed=seed + 1)
    second.weight = first.weight
    return Sequential(first, second)


def batches(model_name: str, steps: int):
    rng = np.random.default_rng(3)
    if model_name == "embedding":
        return [(rng.integers(0, VOCAB, 9), rng.integers(0, VOCAB, 9)) for _ in range(steps)]
    return [(rng.standard_normal((9, WIDTH)).astype(np.float32), rng.integers(0, WIDTH, 9))
            for _ in range(steps)]


def train(model, *, in_backward: bool, steps: int = 4, tell_uses: bool = True):
    tied = model[0].weight
    tied.uses_per_backward = 2 if tell_uses else 1
    optimizer = Adam(model.parameters(), lr=1e-2)  # the tied weight once, as torch lists it
    if in_backward:
        optimizer.fuse_into_backward()
    loss_fn = CrossEntropyLoss()
    for x, y in batches("embedding" if isinstance(model[0], Embedding) else "linear", steps):
        model.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        if not in_backward:
            optimizer.step()
    return tied.data.copy(), optimizer.state_dict()


@pytest.mark.parametrize("make", [embedding_and_tied_head, two_linears_one_weight])
def test_a_tied_weight_gets_the_sum_of_both_gradients(make):
    model = make()
    tied = model[0].weight
    names = [p.name for p in model.parameters()]
    assert names.count("0.weight") == 1 and "1.weight" not in names  # listed once, as torch does
    assert "1.weight" in model.state_dict()                          # and saved under both names
    x, y = batches("embedding" if make is embedding_and_tied_head else "linear", 1)[0]
    loss_fn = CrossEntropyLoss()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    both = tied.grad.copy()
    for used in (0, 1):  # the same loss with the other use's weight a frozen copy
        other = 1 - used
        copy = make()
        copy[other].weight = type(tied)(tied.data.copy())
        copy[other].weight.frozen = True
        copy[used].weight.data[...] = tied.data
        copy.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("weight")},
                             strict=False)
        loss_fn(copy(x), y)
        copy.backward(loss_fn.backward())
        both -= copy[used].weight.grad
    np.testing.assert_allclose(both, 0.0, atol=1e-6)


@pytest.mark.parametrize("make", [embedding_and_tied_head, two_linears_one_weight])
def test_updating_a_tied_weight_inside_backward_equals_backward_then_step(small_blocks, make):
    after_step, state_step = train(make(), in_backward=False)
    after_fused, state_fused = train(make(), in_backward=True)
    if make is embedding_and_tied_head:  # the last use adds a scatter to the same accumulated sum
        assert_same_state(after_fused, after_step)
        assert_same_state(state_fused, state_step)
    else:  # the last use is a Linear: its dW by blocks of rows, added to the first use's dW
        np.testing.assert_allclose(after_fused, after_step, rtol=1e-5, atol=1e-6)
    untold, _ = train(make(), in_backward=True, tell_uses=False)  # updated once per use: wrong
    assert np.abs(untold - after_step).max() > 1e-4


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that the tied Linear's dW takes several blocks."""
    monkeypatch.setattr(weight_blocks, "BLOCK_ELEMENTS", 32)
