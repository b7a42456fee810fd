"""A tied weight (token embedding = output head): one update per step, in backward too, in
bf16 with stochastic rounding, under Lookahead, and in checkpoints (stored once, loaded tied)."""

import numpy as np
import pytest

from npcpu import checkpoint
from npcpu.models import GPT, GPTConfig
from npcpu.nn import CrossEntropyLoss, weight_blocks
from npcpu.optim import SGD, AdamW, Lookahead

CONFIG = GPTConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=8)

OPTIMIZERS = {
    "adamw": lambda params: AdamW(params, lr=1e-2, weight_decay=0.1),
    "adamw-bf16-states": lambda params: AdamW(params, lr=1e-2, state_dtype="bf16", seed=3),
    "sgd-momentum": lambda params: SGD(params, lr=0.1, momentum=0.9),
}


def batch(seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CONFIG.vocab_size, (2, 7))
    return idx, np.roll(idx, -1, axis=1)


def train(model, optimizer, steps, in_backward):
    idx, targets = batch()
    loss_fn, losses = CrossEntropyLoss(in_place=True), []
    if in_backward:
        optimizer.fuse_into_backward()
    for _ in range(steps):
        model.zero_grad()
        losses.append(loss_fn(model.forward(idx), targets))
        model.backward(loss_fn.backward())
        if not in_backward:
            optimizer.step()
    return losses


# fp64 and fp32 agree to rounding (the weight-row blocks' GEMMs may sum in another order than
# the whole GEMM); in bf16 both paths run the same blocks and the same stochastic rounding bits,
# so bit for bit. Updating the tied weight twice, or before its second gradient, is far outside.
# (bf16 optimizer states round stochastically: a rounding-level difference in a gradient can flip
# a rounding, so that optimizer is compared where both paths are bit for bit, in bf16.)
@pytest.mark.parametrize("name, precision, rtol", [
    ("adamw", "fp64", 1e-12), ("sgd-momentum", "fp64", 1e-12), ("adamw", "fp32", 2e-5),
    ("sgd-momentum", "fp32", 2e-5), ("adamw", "bf16", 0.0), ("adamw-bf16-states", "bf16", 0.0),
    ("sgd-momentum", "bf16", 0.0)])
def test_update_in_backward_equals_step_for_a_tied_head(monkeypatch, name, precision, rtol):
    monkeypatch.setattr(weight_blocks, "BLOCK_ELEMENTS", 64)  # the head in several row blocks
    results = []
    for in_backward in (False, True):
        model = GPT(CONFIG, seed=1).set_precision(precision)
        optimizer = OPTIMIZERS[name](model.parameters())
        losses = train(model, optimizer, 4, in_backward)
        results.append((losses, {k: v.copy() for k, v in model.state_dict().items()}))
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.lm_head.weight.grad is None or not in_backward
    (losses_step, state_step), (losses_fused, state_fused) = results
    np.testing.assert_allclose(losses_fused, losses_step, rtol=rtol)
    for key in state_step:
        np.testing.assert_allclose(np.float64(state_fused[key]), np.float64(state_step[key]),
                                   rtol=rtol, atol=rtol, err_msg=key)


def test_lookahead_syncs_a_tied_weight_once():
    k, alpha = 3, 0.5
    model, fast_only = GPT(CONFIG, seed=2), GPT(CONFIG, seed=2)
    start = model.transformer.wte.weight.data.copy()
    lookahead = Lookahead(SGD(model.parameters(), lr=0.5), k=k, alpha=alpha)
    assert len(lookahead.slow_weights) == len(model.parameters())
    train(model, lookahead, k, in_backward=False)
    train(fast_only, SGD(fast_only.parameters(), lr=0.5), k, in_backward=False)
    fast = fast_only.transformer.wte.weight.data
    assert not np.allclose(fast, start)
    np.testing.assert_allclose(model.transformer.wte.weight.data, start + alpha * (fast - start),
                               rtol=1e-6, atol=1e-7)


def test_checkpoint_stores_the_tied_weight_once_and_loads_it_tied(tmp_path):
    model = GPT(CONFIG, seed=3)
    train(model, AdamW(model.parameters(), lr=1e-2), 2, in_backward=False)
    path = checkpoint.save_checkpoint(tmp_path, {"model": model.state_dict(remove_duplicate=True)},
                                      step=2)
    state, _ = checkpoint.load_checkpoint(path)
    assert "transformer.wte.weight" in state["model"] and "lm_head.weight" not in state["model"]
    restored = GPT(CONFIG, seed=4)
    restored.load_state_dict(state["model"])
    assert restored.lm_head.weight is restored.transformer.wte.weight
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[key], value, err_msg=key)
