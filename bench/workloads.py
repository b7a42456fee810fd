"""The canonical training workloads (docs/DESIGN.md) as npcpu and torch models with the same initial weights.

    mlp52m        MLP 784-4096-4096-4096-4096-100 (54.7M parameters), batch 128, Adam; one fixed
                  batch of SyntheticClassification(784 features, 100 classes)
    logreg-mnist  softmax regression 784 -> 10, batch 128, SGD lr 0.1, one epoch over 60,000
                  MNIST-shaped samples (float32 uniform in [0, 1], labels uniform in 0..9)

npcpu layer i of a model is built with `seed=i`. Its torch twin gets exactly those weights through
the state dict (npcpu layer i is torch module 2i in the MLP, whose ReLU is 2i + 1), by way of files:
`save_torch_inputs` writes the npcpu model's state dict (and mlp52m's data batch) as .npy files, and
the torch builders read them one array at a time. So a torch process never imports npcpu (Numba
and LLVM add about 135 MB of resident memory) nor holds a second copy of the weights, either of
which would inflate the peak memory measured for torch. For the same reason npcpu is imported
inside the npcpu builders, not at the top of this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MLP52M_WIDTHS = [784, 4096, 4096, 4096, 4096, 100]
BATCH = 128
MLP52M_LR = 1e-3
LOGREG_FEATURES = 784
LOGREG_CLASSES = 10
LOGREG_SAMPLES = 60_000
LOGREG_LR = 0.1
DATA_SEED = 0


def mlp52m_parameter_count() -> int:
    return sum(a * b + b for a, b in zip(MLP52M_WIDTHS[:-1], MLP52M_WIDTHS[1:]))


def mlp52m_gemm_shapes() -> list[tuple[int, int]]:
    """(in_features K, out_features M) of each Linear of mlp52m, first to last."""
    return list(zip(MLP52M_WIDTHS[:-1], MLP52M_WIDTHS[1:]))


def npcpu_mlp52m():
    """FusedLinearReLU x4 + Linear; the input needs no gradient (no dx GEMM in layer 0)."""
    from npcpu.nn.linear import FusedLinearReLU, Linear
    from npcpu.nn.module import Sequential
    shapes = mlp52m_gemm_shapes()
    hidden = [FusedLinearReLU(k, m, seed=i) for i, (k, m) in enumerate(shapes[:-1])]
    model = Sequential(*hidden, Linear(*shapes[-1], seed=len(hidden)))
    model.input_requires_grad = False
    return model


def npcpu_mlp52m_step(precision: str, update_in_backward: bool = False):
    """One mlp52m training step as a user writes it: forward, cross-entropy, backward, Adam step
    (moments in `precision`'s storage), zero_grad; with `update_in_backward`, Adam is fused into
    backward (Optimizer.fuse_into_backward) and the step is forward and backward only."""
    from npcpu.nn.losses import CrossEntropyLoss
    from npcpu.optim.adam import Adam
    model = npcpu_mlp52m()
    if precision != "fp32":
        model.set_precision(precision)
    optimizer = Adam(model.parameters(), lr=MLP52M_LR, state_dtype=precision)
    if update_in_backward:
        optimizer.fuse_into_backward()
    loss_fn = CrossEntropyLoss()
    x, y = mlp52m_batch()

    def step():
        loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        if not update_in_backward:
            optimizer.step()
            optimizer.zero_grad()
    return step


def npcpu_logreg():
    from npcpu.nn.linear import Linear
    return Linear(LOGREG_FEATURES, LOGREG_CLASSES, seed=0)


def mlp52m_batch() -> tuple[np.ndarray, np.ndarray]:
    """One batch (x (128, 784) float32, y (128,) int64) of the synthetic 100-class task."""
    from npcpu.data.synthetic import SyntheticClassification
    data = SyntheticClassification(100_000, MLP52M_WIDTHS[0], MLP52M_WIDTHS[-1], seed=DATA_SEED)
    return data.batch(np.arange(BATCH))


def logreg_data(samples: int = LOGREG_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped data: x (samples, 784) float32 uniform in [0, 1), y (samples,) int64 in 0..9."""
    rng = np.random.default_rng(DATA_SEED)
    x = rng.random((samples, LOGREG_FEATURES), dtype=np.float32)
    y = rng.integers(0, LOGREG_CLASSES, samples, dtype=np.int64)
    return x, y


def save_torch_inputs(directory: Path, workloads=("mlp52m", "logreg-mnist")) -> None:
    """Write what the torch builders read: <directory>/<workload>/<state-dict key>.npy, and the
    mlp52m batch as mlp52m/x.npy and mlp52m/y.npy."""
    builders = {"mlp52m": npcpu_mlp52m, "logreg-mnist": npcpu_logreg}
    for workload in workloads:
        folder = Path(directory) / workload
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in builders[workload]().state_dict().items():
            np.save(folder / f"{key}.npy", value)
        if workload == "mlp52m":
            x, y = mlp52m_batch()
            np.save(folder / "x.npy", x)
            np.save(folder / "y.npy", y)


def torch_mlp52m(torch, directory: Path):
    """The MLP as torch Linear + ReLU modules, with npcpu's initial weights from `directory`."""
    modules = []
    shapes = mlp52m_gemm_shapes()
    for k, m in shapes[:-1]:
        modules += [torch.nn.Linear(k, m), torch.nn.ReLU()]
    model = torch.nn.Sequential(*modules, torch.nn.Linear(*shapes[-1]))
    for i in range(len(shapes)):
        _load_linear(torch, model[2 * i], Path(directory) / "mlp52m", prefix=f"{i}.")
    return model


def torch_logreg(torch, directory: Path):
    model = torch.nn.Linear(LOGREG_FEATURES, LOGREG_CLASSES)
    _load_linear(torch, model, Path(directory) / "logreg-mnist", prefix="")
    return model


def load_mlp52m_batch(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(directory) / "mlp52m"
    return np.load(folder / "x.npy"), np.load(folder / "y.npy")


def _load_linear(torch, target, folder: Path, prefix: str) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(target, name).copy_(torch.from_numpy(np.load(folder / f"{prefix}{name}.npy")))
