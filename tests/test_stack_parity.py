"""A small token model, Embedding -> LayerNorm -> Linear -> GELU -> Linear, against the same torch model.

Same weights through the state dict, same tokens and targets, cross-entropy with label smoothing and
ignored positions: the loss, the logits and every parameter gradient must agree to float32 tolerance.
"""

import numpy as np

from npcpu.nn.activations import GELU
from npcpu.nn.embedding import Embedding
from npcpu.nn.linear import Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.nn.norm import LayerNorm

VOCAB, DIM, HIDDEN, CLASSES = 23, 16, 37, 11
BATCH, TIME = 3, 7


def test_token_stack_matches_torch(torch):
    rng = np.random.default_rng(41)
    model = Sequential(Embedding(VOCAB, DIM, padding_idx=0, seed=1), LayerNorm(DIM),
                       Linear(DIM, HIDDEN, seed=2), GELU(), Linear(HIDDEN, CLASSES, seed=3))
    reference = torch.nn.Sequential(torch.nn.Embedding(VOCAB, DIM, padding_idx=0),
                                    torch.nn.LayerNorm(DIM), torch.nn.Linear(DIM, HIDDEN),
                                    torch.nn.GELU(), torch.nn.Linear(HIDDEN, CLASSES))
    model[1].weight.data[:] = rng.standard_normal(DIM)  # LayerNorm off its ones/zeros start
    model[1].bias.data[:] = rng.standard_normal(DIM)
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    assert list(model.state_dict()) == list(reference.state_dict())

    tokens = rng.integers(0, VOCAB, (BATCH, TIME))
    tokens[0, :2] = 0  # padding tokens
    targets = rng.integers(0, CLASSES, (BATCH, TIME))
    targets[0, :2] = -100

    loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    logits = model(tokens)
    loss = loss_fn(logits, targets)
    model.zero_grad()
    assert model.backward(loss_fn.backward()) is None  # integer tokens have no gradient

    logits_t = reference(torch.from_numpy(tokens))
    # torch wants the classes at dim 1: compare through (B*T, C)
    loss_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, CLASSES),
                                               torch.from_numpy(targets).reshape(-1),
                                               label_smoothing=0.1)
    loss_t.backward()

    np.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, torch_grads[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"gradient of {name}")
    np.testing.assert_array_equal(model[0].weight.grad[0], 0.0)  # the padding row
