"""One optimizer step over the mlp52m parameter shapes (about 54M float32 parameters).

    python bench/bench_optim.py [--repeats 7] [--threads 2]

Candidates (all on the same parameter and gradient arrays, timed round-robin, so drift on a shared
machine hits all alike): npcpu Adam (fp32 states), torch Adam fused=True, torch Adam default
(foreach), npcpu Adam with bf16 states (stochastic rounding, and rounded to nearest: what the
random bits cost), npcpu LAMB with fp32 and with bf16 states.
torch sees the npcpu arrays through torch.from_numpy (no copies); both libraries get the same
thread count. torch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless the environment
sets it): with OpenMP's default spin-waiting, idle torch threads take the cores from the candidate
timed next, and in this round-robin torch fused Adam itself measured about 3x slower. Ratios are
torch fused time / candidate time (> 1: faster than torch fused).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from common import markdown_table, summarize, time_interleaved, write_json

from npcpu import backend
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.lamb import LAMB

WIDTHS = [784, 4096, 4096, 4096, 4096, 100]


def mlp52m_shapes() -> list[tuple[int, ...]]:
    """Linear weights (out, in) and biases (out,) of 784-4096-4096-4096-4096-100."""
    shapes = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = backend.set_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts its thread pool
    import torch
    torch.set_num_threads(threads)

    rng = np.random.default_rng(0)
    params = [Parameter((0.02 * rng.standard_normal(s)).astype(np.float32)) for s in mlp52m_shapes()]
    for p in params:
        p.grad = (1e-3 * rng.standard_normal(p.shape)).astype(np.float32)
    tensors = [torch.from_numpy(p.data).requires_grad_() for p in params]
    for t, p in zip(tensors, params):
        t.grad = torch.from_numpy(p.grad)
    count = sum(p.size for p in params)

    optimizers = {
        "npcpu Adam fp32": Adam(params, lr=1e-5),
        "torch Adam fused": torch.optim.Adam(tensors, lr=1e-5, fused=True),
        "torch Adam foreach": torch.optim.Adam(tensors, lr=1e-5),
        "npcpu Adam bf16 states": Adam(params, lr=1e-5, state_dtype="bf16"),
        # what the stochastic rounding's random bits cost: the same update, rounded to nearest
        "npcpu Adam bf16 states, round to nearest": Adam(params, lr=1e-5, state_dtype="bf16",
                                                         stochastic_rounding=False),
        "npcpu LAMB fp32": LAMB(params, lr=1e-5),
        "npcpu LAMB bf16 states": LAMB(params, lr=1e-5, state_dtype="bf16"),
    }
    times = time_interleaved({name: opt.step for name, opt in optimizers.items()},
                             repeats=args.repeats, warmup=2)
    results = {name: summarize(t) for name, t in times.items()}
    fused = results["torch Adam fused"]["median_ms"]
    npcpu_fp32 = results["npcpu Adam fp32"]["median_ms"]
    rows = []
    for name, r in results.items():
        r["vs_torch_fused"] = fused / r["median_ms"]
        r["vs_npcpu_fp32"] = npcpu_fp32 / r["median_ms"]
        r["gb_per_s_fp32_adam_traffic"] = 28 * count / r["median_ms"] / 1e6
        rows.append([name, r["median_ms"], r["min_ms"], r["vs_torch_fused"], r["vs_npcpu_fp32"]])
    print(f"one step over mlp52m shapes: {count:,} parameters, {threads} threads, "
          f"median of {args.repeats} interleaved repetitions")
    print(markdown_table(["optimizer", "median ms", "min ms", "torch fused / this",
                          "npcpu fp32 / this"], rows))
    path = write_json("bench_optim", {"parameters": count, "threads": threads, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
