"""mlp52m forward + backward, npcpu vs torch; and FusedLinearReLU vs the same layer as plain NumPy ops.

    python bench/bench_mlp.py [--repeats 10] [--threads N]

mlp52m (docs/DESIGN.md): 784-4096-4096-4096-4096-100, FusedLinearReLU x4 + Linear, batch 128. One step is
forward, then backward of a fixed random dL/dlogits; no loss, no optimizer. torch gets the same
weights (state_dict) and thread count, its input needs no gradient (npcpu: input_requires_grad False),
and its gradients are set to None before each step, as `optimizer.zero_grad()` does by default.
npcpu accumulates into its gradients in place (a BLAS GEMM with beta = 1); the row "npcpu +
zero_grad" adds the reset that a training step would also pay.

The layer comparison (4096 -> 4096, batch 128) times forward + backward (dW accumulated, db, dx) of
FusedLinearReLU against the same math written as plain NumPy expressions.

OpenBLAS picks its GEMM kernels by CPU model unless OPENBLAS_CORETYPE names them (an environment may pin
it, e.g. to Haswell, AVX2 only); the BLAS line printed first shows the choice and the JSON records the
OPENBLAS_* variables. On an AVX-512 CPU, OPENBLAS_CORETYPE=SkylakeX (set before NumPy is imported)
selects the AVX-512 kernels.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from common import markdown_table, summarize, time_interleaved, write_json
from workloads import BATCH, npcpu_mlp52m
from workloads import MLP52M_WIDTHS as WIDTHS

from npcpu import backend
from npcpu.nn.linear import FusedLinearReLU
from npcpu.nn.module import Sequential


def torch_mlp52m(torch, model: Sequential):
    """The same MLP in torch; npcpu layer i is torch module 2i (its ReLU is 2i + 1)."""
    modules = []
    for a, b in zip(WIDTHS[:-2], WIDTHS[1:-1]):
        modules += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    reference = torch.nn.Sequential(*modules, torch.nn.Linear(WIDTHS[-2], WIDTHS[-1]))
    state = {}
    for key, value in model.state_dict().items():
        index, name = key.split(".")
        state[f"{2 * int(index)}.{name}"] = torch.from_numpy(value.copy())
    reference.load_state_dict(state)
    return reference


def bench_mlp52m(repeats: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTHS[0])).astype(np.float32)
    dlogits = rng.standard_normal((BATCH, WIDTHS[-1])).astype(np.float32)
    model = npcpu_mlp52m()

    def npcpu_step():
        model.forward(x)
        model.backward(dlogits)

    def npcpu_step_with_zero_grad():
        model.zero_grad()
        npcpu_step()

    candidates = {"npcpu": npcpu_step, "npcpu + zero_grad": npcpu_step_with_zero_grad}
    # torch's OpenMP threads wait passively (unless the environment says otherwise): spin-waiting
    # idle torch threads would take the cores from npcpu's turn in this round-robin, and back
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        reference = torch_mlp52m(torch, model)
        x_t, dlogits_t = torch.from_numpy(x), torch.from_numpy(dlogits)

        def torch_step():
            reference.zero_grad(set_to_none=True)
            reference(x_t).backward(dlogits_t)

        candidates["torch"] = torch_step
    times = time_interleaved(candidates, repeats=repeats)
    return {name: summarize(t) for name, t in times.items()}


def bench_fused_layer(repeats: int) -> dict:
    rng = np.random.default_rng(1)
    features = 4096
    layer = FusedLinearReLU(features, features, seed=0)
    layer.input_requires_grad = True  # dL/dx too, as plain_numpy computes it
    x = rng.standard_normal((BATCH, features)).astype(np.float32)
    dy = rng.standard_normal((BATCH, features)).astype(np.float32)
    weight, bias = layer.weight.data, layer.bias.data
    weight_grad = np.zeros_like(weight)
    bias_grad = np.zeros_like(bias)

    def fused():
        layer.forward(x)
        layer.backward(dy)

    def plain_numpy():
        z = x @ weight.T + bias
        y = np.maximum(z, 0)  # noqa: F841  (the layer output)
        mask = z > 0
        dz = dy * mask
        bias_grad[...] += dz.sum(axis=0)
        weight_grad[...] += dz.T @ x
        return dz @ weight

    times = time_interleaved({"FusedLinearReLU": fused, "plain NumPy": plain_numpy}, repeats=repeats)
    return {name: summarize(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all)")
    args = parser.parse_args()
    threads = backend.set_threads(args.threads)

    mlp = bench_mlp52m(args.repeats, threads)
    layer = bench_fused_layer(args.repeats)

    rows = []
    if "torch" in mlp:
        base = mlp["torch"]["median_ms"]
        for name, s in mlp.items():
            rows.append([f"mlp52m fwd+bwd: {name}", s["median_ms"], s["min_ms"], s["max_ms"],
                         f"{base / s['median_ms']:.2f}x vs torch"])
    else:
        rows += [[f"mlp52m fwd+bwd: {name}", s["median_ms"], s["min_ms"], s["max_ms"], "torch absent"]
                 for name, s in mlp.items()]
    base = layer["plain NumPy"]["median_ms"]
    for name, s in layer.items():
        rows.append([f"4096x4096 b128 fwd+bwd: {name}", s["median_ms"], s["min_ms"], s["max_ms"],
                     f"{base / s['median_ms']:.2f}x vs plain NumPy"])
    print(f"threads: {threads}, BLAS: {backend.blas_info()}, repeats: {args.repeats}")
    print(markdown_table(["case", "median ms", "min ms", "max ms", "speed-up"], rows))
    path = write_json("bench_mlp", {"threads": threads, "batch": BATCH, "widths": WIDTHS,
                                    "mlp52m": mlp, "fused_linear_relu_4096": layer})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
