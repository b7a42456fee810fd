"""The outputs that must agree across CPUs and platforms (x86-64 and aarch64, OpenBLAS and Accelerate).

`outputs()` runs small, seeded cases through npcpu's kernels and BLAS calls and returns every result
by name: an MLP's and a tiny GPT's logits, loss and gradients, one step of each optimizer, the bf16
conversion and the synthetic data sources. tests/test_cross_platform.py compares them with
tests/data/platform_reference.npz, written on x86-64 by

    python tests/platform_reference.py --write

Floating-point results may differ in the last bits between CPUs (another BLAS kernel sums in another
order, FMA or not): they are compared within float32 tolerance. Integer results (token streams,
random bits) must be equal.
"""

import argparse
import pathlib
import platform

import numpy as np

REFERENCE = pathlib.Path(__file__).parent / "data" / "platform_reference.npz"


def _mlp_case(optimizer_name: str) -> dict:
    from npcpu.nn import CrossEntropyLoss, FusedLinearReLU, Linear, Sequential
    from npcpu.optim import LAMB, SGD, Adam, AdamW

    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 29)).astype(np.float32)
    y = rng.integers(0, 7, 37)
    model = Sequential(FusedLinearReLU(29, 43, seed=1), FusedLinearReLU(43, 19, seed=2), Linear(19, 7, seed=3))
    make = {"sgd": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            "adam": lambda p: Adam(p, lr=1e-2),
            "adamw": lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
            "lamb": lambda p: LAMB(p, lr=1e-2)}[optimizer_name]
    optimizer = make(model.parameters())
    loss_fn = CrossEntropyLoss()
    out = {}
    for step in range(2):
        logits = model.forward(x)
        out[f"loss{step}"] = np.float64(loss_fn(logits, y))
        model.backward(loss_fn.backward())
        if step == 0:
            out["logits"] = logits.copy()
            out.update({f"grad.{k}": p.grad.copy() for k, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    out.update({f"param.{k}": v.copy() for k, v in model.state_dict().items()})
    return out


def _gpt_case() -> dict:
    from npcpu.models import GPT, GPTConfig
    from npcpu.nn import CrossEntropyLoss
    from npcpu.optim import SGD

    config = GPTConfig(vocab_size=11, block_size=9, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, seed=0)
    # SGD, not Adam: the key projection's bias has a gradient of exactly zero in exact arithmetic
    # (softmax ignores a constant added to every score), so its float32 value is rounding noise
    # whose sign Adam's m / sqrt(v) turns into a full +-lr step.
    optimizer = SGD(model.parameters(), lr=0.1)
    loss_fn = CrossEntropyLoss()
    idx = np.random.default_rng(1).integers(0, 11, size=(3, 10))
    logits = model.forward(idx[:, :-1])
    loss = loss_fn(logits.reshape(-1, 11), idx[:, 1:].reshape(-1))
    model.backward(loss_fn.backward().reshape(logits.shape))
    out = {"logits": logits.copy(), "loss": np.float64(loss)}
    out.update({f"grad.{k}": p.grad.copy() for k, p in model.named_parameters()})
    optimizer.step()
    out.update({f"param.{k}": v.copy() for k, v in model.state_dict().items()})
    return out


def _bf16_case() -> dict:
    from ml_dtypes import bfloat16

    from npcpu.precision import to_storage

    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32) * 3
    return {"nearest": to_storage(x, bfloat16).view(np.uint16),
            "stochastic": to_storage(x, bfloat16, seed=5).view(np.uint16)}


def _data_case() -> dict:
    from npcpu.data import SyntheticClassification
    from npcpu.text import SyntheticText

    features, labels = SyntheticClassification(50, input_dim=12, num_classes=5, seed=3).batch(np.arange(50))
    tokens, targets = SyntheticText(vocab_size=9, block_size=16, seed=4).batch(step=7, batch_size=3)
    return {"features": features, "labels": labels, "tokens": tokens, "targets": targets}


def outputs() -> dict[str, np.ndarray]:
    """Every case's results, keyed "case/name"."""
    cases = {f"mlp_{name}": (lambda name=name: _mlp_case(name)) for name in ("sgd", "adam", "adamw", "lamb")}
    cases.update(gpt=_gpt_case, bf16=_bf16_case, data=_data_case)
    return {f"{case}/{name}": np.asarray(value)
            for case, run in cases.items() for name, value in run().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {REFERENCE} (on x86-64)")
    args = parser.parse_args()
    results = outputs()
    if args.write:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise SystemExit("the reference is written on x86-64")
        REFERENCE.parent.mkdir(exist_ok=True)
        np.savez_compressed(REFERENCE, **results)
        print(f"wrote {len(results)} arrays to {REFERENCE}")
    else:
        print(f"{len(results)} arrays; --write saves them as the reference")


if __name__ == "__main__":
    main()
