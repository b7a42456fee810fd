"""A whole MLP (FusedLinearReLU x3 + Linear, 37-64-48-32-10, batch 17) against the same torch model:
logits, dL/dx and every parameter gradient, with the loss sum(logits * g) for a random g."""

import numpy as np
import pytest

from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.module import Sequential
from torchcheck import assert_forward_backward_match_torch

WIDTHS = [37, 64, 48, 32, 10]
BATCH = 17


def npcpu_mlp(seed=0):
    layers = [FusedLinearReLU(a, b, seed=seed + i) for i, (a, b) in enumerate(zip(WIDTHS[:-2], WIDTHS[1:-1]))]
    return Sequential(*layers, Linear(WIDTHS[-2], WIDTHS[-1], seed=seed + 10))


def torch_mlp(torch):
    """FusedLinearReLU i maps to torch modules (2i: Linear, 2i+1: ReLU); keys "{2i}.weight"."""
    modules = []
    for a, b in zip(WIDTHS[:-2], WIDTHS[1:-1]):
        modules += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*modules, torch.nn.Linear(WIDTHS[-2], WIDTHS[-1]))


def torch_key(npcpu_key):
    index, name = npcpu_key.split(".")
    return f"{2 * int(index)}.{name}"


@pytest.mark.parametrize("direction", ["npcpu_to_torch", "torch_to_npcpu"])
def test_mlp_logits_and_gradients_match_torch(torch, direction):
    rng = np.random.default_rng(0)
    model, reference = npcpu_mlp(), torch_mlp(torch)
    if direction == "npcpu_to_torch":
        reference.load_state_dict({torch_key(k): torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    else:
        model.load_state_dict({k: reference.state_dict()[torch_key(k)] for k in model.state_dict()})

    x = rng.standard_normal((BATCH, WIDTHS[0])).astype(np.float32)
    g = rng.standard_normal((BATCH, WIDTHS[-1])).astype(np.float32)
    assert_forward_backward_match_torch(torch, model, reference, x, g)
    torch_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, torch_params[torch_key(name)].grad.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_mlp_without_input_gradient_skips_the_first_dx():
    rng = np.random.default_rng(1)
    model = npcpu_mlp()
    model.input_requires_grad = False
    model.forward(rng.standard_normal((BATCH, WIDTHS[0])).astype(np.float32))
    assert model.backward(rng.standard_normal((BATCH, WIDTHS[-1])).astype(np.float32)) is None
    assert all(p.grad is not None for p in model.parameters())
