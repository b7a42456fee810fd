"""GPT: float64 gradients, whole-model parity with a torch nanoGPT, state dicts, bad input, generation."""

import numpy as np
import pytest

from npcpu.models import GPT, GPTConfig
from npcpu.nn import CrossEntropyLoss
from npcpu.optim import AdamW
from bench import nanogpt_torch
from tests.gradcheck import numerical_gradient

TINY = dict(vocab_size=37, block_size=11, n_layer=2, n_head=3, n_embd=12)


def tokens(rng, config, batch, steps):
    return rng.integers(0, config.vocab_size, (batch, steps))


# -- float64 central differences through the whole model -----------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_gradients_match_central_differences(tied):
    config = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=5, tied=tied)
    model = GPT(config, seed=3).set_precision("fp64")
    rng = np.random.default_rng(4)
    for p in model.parameters():  # larger than GPT-2's 0.02, so every path carries signal
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    idx, targets = tokens(rng, config, 2, 5), tokens(rng, config, 2, 5)
    targets[0, 1] = -100
    loss_fn = CrossEntropyLoss()

    def loss():
        return loss_fn(model.forward(idx), targets)

    loss()
    model.zero_grad()
    model.backward(loss_fn.backward())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, numerical_gradient(loss, p.data), rtol=1e-5, atol=1e-8,
                                   err_msg=name)


# -- parity with a torch model of nanoGPT's architecture (float32) -------------------------------

def torch_twin(torch, model):
    """nanoGPT's architecture in torch, holding the npcpu model's weights through the state dict."""
    c = model.config
    reference = nanogpt_torch.build(torch)["GPT"](c.vocab_size, c.block_size, c.n_layer, c.n_head,
                                                  c.n_embd, bias=c.bias, tied=c.tied)
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return reference


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_nanogpt(torch, tied, bias):
    config = GPTConfig(**TINY, bias=bias, tied=tied)
    model = GPT(config, seed=1)
    reference = torch_twin(torch, model)
    assert list(model.state_dict()) == list(reference.state_dict())
    rng = np.random.default_rng(2)
    idx, targets = tokens(rng, config, 2, 9), tokens(rng, config, 2, 9)
    F = torch.nn.functional

    def torch_loss():
        logits = reference(torch.from_numpy(idx))
        return logits, F.cross_entropy(logits.reshape(-1, config.vocab_size),
                                       torch.from_numpy(targets).reshape(-1))

    loss_fn = CrossEntropyLoss()
    logits = model.forward(idx)
    reference_logits, reference_loss = torch_loss()
    np.testing.assert_allclose(logits, reference_logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    loss = loss_fn(logits, targets)
    np.testing.assert_allclose(loss, reference_loss.item(), rtol=1e-6)
    model.zero_grad()
    model.backward(loss_fn.backward())
    reference_loss.backward()
    reference_params = dict(reference.named_parameters())
    assert [name for name, _ in model.named_parameters()] == list(reference_params)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, reference_params[name].grad.numpy(), rtol=1e-4,
                                   atol=1e-7, err_msg=name)

    # then 10 AdamW steps with nanoGPT's parameter groups
    optimizer = AdamW(model.optimizer_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    reference_optimizer = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95))
    ours, theirs = [], []
    for _ in range(10):
        optimizer.step()
        reference_optimizer.step()
        model.zero_grad()
        reference_optimizer.zero_grad()
        ours.append(loss_fn(model.forward(idx), targets))
        model.backward(loss_fn.backward())
        _, reference_loss = torch_loss()
        reference_loss.backward()
        theirs.append(reference_loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0] - 0.1  # it trains


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_sums_each_block_output_where_it_is_normalized(precision):
    """GPT.forward (each block's output summed in the next LayerNorm's pass) gives the bits of
    the layers run one after the other: transformer.h's forward, then ln_f and the head; and
    the same gradients after backward."""
    fused, plain = (GPT(GPTConfig(**TINY, dropout=0.0), seed=3).set_precision(precision)
                    for _ in range(2))
    idx = np.random.default_rng(4).integers(0, TINY["vocab_size"], (3, 7))
    logits = fused.forward(idx)
    t = plain.transformer
    x = t.drop.forward(t.wte.forward(idx) + t.wpe.forward(np.arange(idx.shape[1])))
    expected = plain.lm_head.forward(t.ln_f.forward(t.h.forward(x)))
    np.testing.assert_array_equal(logits, expected)
    dlogits = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)
    fused.backward(dlogits)
    plain.backward(dlogits)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


def test_tied_head_is_one_parameter_with_both_gradients():
    model = GPT(GPTConfig(**TINY), seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    groups = model.optimizer_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert all(p.data.ndim >= 2 for p in groups[0]["params"])
    assert all(p.data.ndim == 1 for p in groups[1]["params"])


def test_initialization_follows_gpt2():
    config = GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=64)
    params = dict(GPT(config, seed=0).named_parameters())
    assert abs(params["transformer.wte.weight"].data.std() - 0.02) < 1e-3
    assert abs(params["transformer.h.0.mlp.c_fc.weight"].data.std() - 0.02) < 1e-3
    assert abs(params["transformer.h.0.attn.c_proj.weight"].data.std() - 0.005) < 3e-4
    assert abs(params["transformer.h.3.mlp.c_proj.weight"].data.std() - 0.005) < 3e-4
    assert np.all(params["transformer.h.0.ln_1.weight"].data == 1)
    assert np.all(params["transformer.h.0.attn.c_attn.bias"].data == 0)


# -- the loss over a padded vocabulary -----------------------------------------------------------

def test_padded_vocabulary_columns_get_no_gradient_and_in_place_matches():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 4, 13)).astype(np.float32)
    targets = rng.integers(0, 10, (3, 4))
    targets[1, 2] = -100
    plain = CrossEntropyLoss()
    expected = plain(logits[..., :10].copy(), targets)
    expected_grad = plain.backward().copy()
    padded = CrossEntropyLoss(classes=10, in_place=True)
    consumed = logits.copy()
    assert padded(consumed, targets) == pytest.approx(expected, rel=1e-6)
    grad = padded.backward()
    assert grad is consumed  # written over the logits: no second (N, V) array
    np.testing.assert_allclose(grad[..., :10], expected_grad, rtol=1e-6, atol=1e-8)
    assert np.all(grad[..., 10:] == 0)
    with pytest.raises(ValueError, match="out of range"):
        padded(logits.copy(), np.full((3, 4), 11))
    padded(logits.copy(), targets)
    padded.backward()
    with pytest.raises(RuntimeError, match="before forward"):  # handed over, not kept into the
        padded.backward()                                      # next step's forward


# -- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_named():
    config = GPTConfig(**TINY)
    model = GPT(config)
    with pytest.raises(TypeError, match="integer array"):
        model.forward(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="token id 37 at position \\(0, 2\\)"):
        model.forward(np.array([[1, 2, 37]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(np.array([[-1]]))
    with pytest.raises(ValueError, match="length 12 is longer than block_size 11"):
        model.forward(np.zeros((1, 12), dtype=np.int64))
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be divisible by n_head \\(3\\)"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=3, n_embd=10)


def test_bad_state_dicts_are_named():
    model = GPT(GPTConfig(**TINY))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.ln_2.bias"}
    with pytest.raises(ValueError, match="missing keys \\['transformer.h.1.ln_2.bias'\\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys \\['transformer.h.2.ln_1.weight'\\]"):
        model.load_state_dict({**state, "transformer.h.2.ln_1.weight": np.ones(12)})
    with pytest.raises(ValueError, match="'transformer.wpe.weight': expected shape \\(11, 12\\)"):
        model.load_state_dict({**state, "transformer.wpe.weight": np.ones((12, 12))})
    untied = GPT(GPTConfig(**TINY, tied=False), seed=5)
    with pytest.raises(ValueError, match="two different arrays .an untied model's."):
        model.load_state_dict(untied.state_dict())
    once = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="a tied model's"):
        untied.load_state_dict(once)
    model.load_state_dict(once)  # the head stored once loads tied
    untied.load_state_dict(state)  # equal arrays: an untied model may start from a tied one
    assert untied.lm_head.weight is not untied.transformer.wte.weight


# -- generation ----------------------------------------------------------------------------------

def greedy_by_full_recomputation(model, idx, steps):
    for _ in range(steps):
        window = idx[:, -model.config.block_size:]
        next_token = model.forward(window)[:, -1].argmax(axis=-1)
        idx = np.concatenate([idx, next_token[:, None]], axis=1)
    return idx


def test_greedy_generation_with_the_cache_equals_full_recomputation(torch):
    config = GPTConfig(**TINY)
    model = GPT(config, seed=7)
    for p in model.parameters():  # sharper distributions than at initialization: fewer near-ties
        p.data *= 10
    model.eval()
    idx = tokens(np.random.default_rng(8), config, 2, 4)
    generated = model.generate(idx, 12, temperature=0)  # 16 > block_size 11: the window slides
    np.testing.assert_array_equal(generated, greedy_by_full_recomputation(model, idx, 12))
    reference = torch_twin(torch, model)
    np.testing.assert_array_equal(generated,
                                  reference.generate(torch.from_numpy(idx), 12, top_k=1).numpy())


def test_sampling_is_seeded_and_respects_top_k():
    config = GPTConfig(**TINY)
    model = GPT(config, seed=9)
    idx = np.zeros((3, 1), dtype=np.int64)
    first = model.generate(idx, 6, temperature=1.5, top_k=5, seed=1)
    np.testing.assert_array_equal(first, model.generate(idx, 6, temperature=1.5, top_k=5, seed=1))
    assert first.shape == (3, 7) and model.training  # the mode is restored
    greedy = model.generate(idx, 6, top_k=1, seed=2)
    np.testing.assert_array_equal(greedy, model.generate(idx, 6, temperature=0))


# -- bf16 against fp32 on a short training run ---------------------------------------------------

def test_bf16_training_tracks_fp32():
    config = GPTConfig(**TINY)
    rng = np.random.default_rng(10)
    idx = tokens(rng, config, 4, 10)
    targets = np.roll(idx, -1, axis=1)
    curves = {}
    for precision in ("fp32", "bf16"):
        model = GPT(config, seed=11).set_precision(precision)
        optimizer = AdamW(model.optimizer_groups(0.1), lr=1e-2)
        loss_fn, losses = CrossEntropyLoss(in_place=True), []
        for _ in range(30):
            model.zero_grad()
            losses.append(loss_fn(model.forward(idx), targets))
            model.backward(loss_fn.backward())
            optimizer.step()
        curves[precision] = np.array(losses)
    assert curves["fp32"][-1] < 0.5 * curves["fp32"][0]
    # bf16 keeps 8 bits of mantissa: the curves part by a few percent, not more
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.05)


def test_generation_feeds_each_position_once_while_the_window_fits(monkeypatch):
    model = GPT(GPTConfig(**TINY), seed=12)
    fed = []
    last_logits = GPT._last_logits

    def recording(self, idx, cache):
        fed.append(idx.shape[1])
        return last_logits(self, idx, cache)
    monkeypatch.setattr(GPT, "_last_logits", recording)
    model.generate(np.zeros((1, 4), dtype=np.int64), 9, seed=0)  # 4 + 9 = 13 > block_size 11
    # the prompt once, then one new position per step until the cache holds 11 positions; then
    # the window slides and the step recomputes the last 11 (of 12)
    assert fed == [4, 1, 1, 1, 1, 1, 1, 1, 11]
