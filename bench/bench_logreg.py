"""logreg-mnist: one epoch of softmax regression 784 -> 10, batch 128, SGD lr 0.1, 60,000 samples.

    python bench/bench_logreg.py [--repeats 7] [--threads 1 2]

Three candidates, timed interleaved (common.time_interleaved) at each thread count:
    npcpu reference   the plain loop over a DataLoader (prefetch 0): model.forward, CrossEntropyLoss,
                      model.backward, SGD.step, zero_grad
    npcpu compiled    npcpu.train.compiled.CompiledClassifierStep.train_epoch (one Numba call
                      per thread)
    torch eager       nn.Linear, F.cross_entropy, optim.SGD (foreach default), batches indexed from
                      a tensor with torch.randperm, zero_grad(set_to_none=True)
and one floor, not a training candidate:
    read rows only    sum the epoch's 60,000 rows in a shuffled order (one thread, prefetching
                      the next row): what reading the data alone costs on this machine
The data are MNIST-shaped random numbers (uniform [0, 1) pixels as float32, labels 0..9): the work
is that of MNIST, and no download is needed. Goals (issue 5): compiled <= 17 ms per epoch and >= 5x
faster than torch eager in the same run.

Besides wall-clock medians the table shows the process CPU time per epoch (all threads): on a
shared machine the wall time of a one-thread candidate is its CPU time plus the time it waited
for a core, so CPU time is what it would take on an idle core.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import markdown_table, summarize, time_interleaved, write_json
from numba import njit

from npcpu import backend
from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.kernels.compiled_gemm import prefetch_rows
from npcpu.nn.linear import Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.sgd import SGD
from npcpu.train.compiled import CompiledClassifierStep

SAMPLES, FEATURES, CLASSES, BATCH, LR = 60_000, 784, 10, 128, 0.1


def npcpu_setup(dataset):
    model = Sequential(Linear(FEATURES, CLASSES, seed=0))
    model.input_requires_grad = False
    return model, CrossEntropyLoss(), SGD(model.parameters(), lr=LR)


def reference_epoch(dataset):
    model, loss_fn, optimizer = npcpu_setup(dataset)
    loader = DataLoader(dataset, BATCH, seed=0, prefetch=0)

    def run():
        for x, y in loader:
            logits = model.forward(x)
            loss_fn(logits, y)
            model.backward(loss_fn.backward())
            optimizer.step()
            optimizer.zero_grad()
    return run


def compiled_epoch(dataset):
    step = CompiledClassifierStep(*npcpu_setup(dataset))
    loader = DataLoader(dataset, BATCH, seed=0, prefetch=0)
    return lambda: step.train_epoch(loader, 0)


def torch_epoch(torch, dataset):
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    model = torch.nn.Linear(FEATURES, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def run():
        order = torch.randperm(SAMPLES)
        for start in range(0, SAMPLES, BATCH):
            index = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


@njit(fastmath=True)
def _sum_rows(x, order):
    total = np.float32(0)
    for i in range(order.size):
        if i + 1 < order.size:
            prefetch_rows(x, order, i + 1, i + 2)
        row = x[order[i]]
        for k in range(row.size):
            total += row[k]
    return total


def read_rows_only(dataset):
    order = np.random.default_rng(0).permutation(len(dataset.x))
    return lambda: _sum_rows(dataset.x, order)


def with_cpu_time(fn, cpu_seconds: list):
    def timed():
        start = time.process_time()
        fn()
        cpu_seconds.append(time.process_time() - start)
    return timed


def bench(threads: int, repeats: int, dataset, torch) -> dict:
    backend.set_threads(threads)
    candidates = {"npcpu reference": reference_epoch(dataset), "npcpu compiled": compiled_epoch(dataset),
                  "read rows only": read_rows_only(dataset)}
    if torch is not None:
        torch.set_num_threads(threads)
        candidates["torch eager"] = torch_epoch(torch, dataset)
    cpu = {name: [] for name in candidates}
    timed = {name: with_cpu_time(fn, cpu[name]) for name, fn in candidates.items()}
    wall = time_interleaved(timed, repeats=repeats, warmup=2)
    result = {}
    for name in candidates:
        result[name] = summarize(wall[name])
        result[name]["cpu_median_ms"] = summarize(cpu[name][-repeats:])["median_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    # torch's OpenMP threads wait passively (unless the environment says otherwise): spin-waiting
    # idle torch threads would take a core from the candidate timed after torch in the round-robin
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.random((SAMPLES, FEATURES), dtype=np.float32),
                           rng.integers(0, CLASSES, SAMPLES))
    print(f"BLAS {backend.blas_info()['vendor']} | load average {os.getloadavg()[0]:.2f} | "
          f"logreg-mnist: {SAMPLES} x {FEATURES} -> {CLASSES}, batch {BATCH}, SGD lr {LR}")
    rows, results = [], {}
    for threads in args.threads:
        result = bench(threads, args.repeats, dataset, torch)
        results[f"threads={threads}"] = result
        torch_ms = result["torch eager"]["median_ms"] if torch is not None else None
        for name, r in result.items():
            ratio = torch_ms / r["median_ms"] if torch_ms else float("nan")
            rows.append([threads, name, r["median_ms"], r["min_ms"], r["cpu_median_ms"], ratio])
    print(markdown_table(["threads", "candidate", "median ms", "min ms", "cpu ms", "torch / this"],
                         rows))
    path = write_json("logreg", {"repeats": args.repeats, "results": results,
                                 "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
