"""The peak memory of a training run, estimated before it starts, and the refusal of one that
cannot fit.

A run holds, per process (per rank under MPI):

    parameters      the model's stored weights (bf16/fp16: 2 bytes each)
    gradients       one float32 accumulator per trainable parameter; with updates inside
                    backward only the largest parameter's gradient exists at a time
    optimizer       each parameter's state as the optimizer declares it (moments, fp32 master
                    copies), plus Lookahead's slow weights
    activations     what the layers save for backward over one micro-batch, the logits and their
                    gradient, and the largest of the saved arrays twice more for the gradients
                    flowing back through the layers at that moment

The activations are measured, not modelled per layer: a probe forward in training mode through a
copy of the model that shares the weights (no weight is copied), on the first `PROBE_ROWS` rows of
the first micro-batch; every array the layers then hold that they did not hold before is counted
once (views of one buffer are one buffer), and the sum is scaled to the micro-batch (the layers'
saved arrays are per row). The model itself, its dropout streams and the work counters are left
as they were, so the run stays bit-identical to one without the estimate.

`check_fits` compares the estimate, times the ranks on this machine, with the memory the kernel
reports as available (/proc/meminfo MemAvailable; the free physical pages elsewhere) and refuses
a run that does not fit, with what would: a smaller batch, bf16, updates inside backward.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from npcpu.data.loader import DataLoader
from npcpu.nn import work
from npcpu.nn.parameter import Parameter

PROBE_ROWS = 4
GIB = 1 << 30


class InsufficientMemoryError(MemoryError):
    """A run whose estimated peak memory exceeds the memory available on this machine."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process of each part of a run's peak memory (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    micro_batch: int      # rows per micro-batch of this process
    ranks: int = 1        # processes of the run on this machine
    precision: str = "fp32"
    update_in_backward: bool = False
    largest_gradient: int = 0
    probe_error: str | None = None  # why the activations could not be measured (counted as 0)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def machine_total(self) -> int:
        return self.total * self.ranks

    def describe(self) -> str:
        per = " per rank" if self.ranks > 1 else ""
        activations = f"activations {gib(self.activations)} for micro-batches of " \
            f"{self.micro_batch}" if self.probe_error is None else \
            f"activations not estimated: the probe forward failed ({self.probe_error})"
        return (f"memory estimate: {gib(self.total)}{per} at peak (parameters "
                f"{gib(self.parameters)}, gradients {gib(self.gradients)}, optimizer states "
                f"{gib(self.optimizer)}, {activations})"
                + (f"; {gib(self.machine_total)} for the {self.ranks} ranks on this machine"
                   if self.ranks > 1 else ""))

    def with_batch(self, rows: int) -> MemoryEstimate:
        return replace(self, activations=self.activations * rows // max(self.micro_batch, 1),
                       micro_batch=rows)

    def in_bf16(self) -> MemoryEstimate:
        """The estimate with 16-bit parameters and saved activations (from fp32)."""
        if self.precision != "fp32":
            return self
        return replace(self, parameters=self.parameters // 2, activations=self.activations // 2,
                       precision="bf16")

    def updating_in_backward(self) -> MemoryEstimate:
        return replace(self, gradients=self.largest_gradient, update_in_backward=True)


def gib(n: int) -> str:
    """`n` bytes in KiB, MiB or GiB, whichever reads best."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


# -- the parts --------------------------------------------------------------------------------------
def parameter_bytes(model) -> int:
    return sum(p.data.nbytes for p in model.parameters())


def gradient_bytes(model, update_in_backward: bool) -> tuple[int, int]:
    """(bytes of the gradients held at once, bytes of the largest one)."""
    sizes = [p.data.size * (8 if p.data.dtype == np.float64 else 4)
             for p in model.parameters() if not p.frozen]
    largest = max(sizes, default=0)
    return (largest if update_in_backward else sum(sizes)), largest


def optimizer_bytes(optimizer) -> int:
    """The states `optimizer` holds or will create at its first step, Lookahead's slow weights
    included."""
    total = sum(w.nbytes for w in getattr(optimizer, "slow_weights", {}).values())
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            spec = inner._state_spec(p, group)
            total += sum(p.data.size * np.dtype(dtype).itemsize for dtype in spec.values())
    return total


def _held_buffers(modules) -> dict[int, int]:
    """{id of the base buffer: bytes} of the arrays the modules hold as attributes (parameters
    excluded), views of one buffer counted once."""
    found = {}

    def visit(value, depth=0):
        if isinstance(value, np.ndarray):
            base = value
            while isinstance(base.base, np.ndarray):
                base = base.base
            found[id(base)] = base.nbytes
        elif isinstance(value, (list, tuple)) and depth < 2:
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict) and depth < 2:
            for item in value.values():
                visit(item, depth + 1)

    for module in modules:
        for name, value in vars(module).items():
            if not isinstance(value, Parameter):
                visit(value)
    return found


def activation_bytes(model, x: np.ndarray) -> int:
    """Bytes of activations for a micro-batch `x` (see the module docstring: a probe forward
    through a weight-sharing copy of `model` on its first rows, scaled to all of them)."""
    rows = x.shape[0] if x.ndim else 1
    if rows == 0:
        return 0
    probe = np.array(x[:PROBE_ROWS] if x.ndim else x)  # its own buffer, which layers may save
    # the copy shares the weights, their gradients and an optimizer fused into backward (the
    # accumulator itself: reading `grad` while it is marked zero would allocate zeros)
    shared = {id(a): a for p in model.parameters() for a in (p.data, p._grad) if a is not None}
    kept = {id(p.updater): p.updater for p in model.parameters() if p.updater is not None}
    twin = copy.deepcopy(model, memo={**shared, **kept})
    twin.train()
    counts = Counter(work.counts)
    # a wrapper a caller put on one of the model's methods is copied as it is, still calling
    # the original model: whatever the probe then advanced there (dropout streams) is put back
    extra = [(module, module.extra_state()) for module in model.modules()]
    try:
        before = _held_buffers(twin.modules())
        out = twin.forward(probe)
        after = _held_buffers(twin.modules())
    finally:
        work.reset()
        work.counts.update(counts)
        for module, state in extra:
            module.load_extra_state(state)
    new = [size for key, size in after.items() if key not in before and key not in shared]
    held = sum(new) + 2 * max(new, default=0) + 2 * np.asarray(out).nbytes
    return math.ceil(held * rows / probe.shape[0]) if x.ndim else held


def first_micro_batch(loader) -> np.ndarray | None:
    """The inputs of the loader's first micro-batch (None for an empty loader); a DataLoader's
    made on this thread, without starting its prefetch thread."""
    if isinstance(loader, DataLoader):
        return np.asarray(loader.batch(0, 0)[0])  # a DataLoader is never empty
    batches = loader.iter_from(0, 0)
    try:
        x, _ = next(batches)
    except StopIteration:
        return None
    finally:
        batches.close()
    return np.asarray(x)


def ranks_on_this_machine(trainer) -> int:
    """The processes of this run on this machine: MPI's local size where the launcher says it
    (Open MPI, MPICH / Intel MPI), else every rank (the usual single-machine launch)."""
    world = getattr(trainer, "world", None)
    if world is None:
        return 1
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world.size


def estimate_memory(trainer, loader) -> MemoryEstimate:
    """The peak memory estimate of `trainer.fit` over `loader` (per process)."""
    model = trainer.model
    x = first_micro_batch(loader)
    if x is not None and getattr(trainer, "world", None) is not None and trainer.world.size > 1:
        x = x[:math.ceil(len(x) / trainer.world.size)]  # this rank's share of each batch
    gradients, largest = gradient_bytes(model, trainer.update_in_backward)
    activations, probe_error = 0, None
    try:
        activations = 0 if x is None else activation_bytes(model, x)
    except (ValueError, TypeError) as error:  # bad data: the run's first step raises it in full
        probe_error = str(error)
    return MemoryEstimate(
        parameters=parameter_bytes(model), gradients=gradients,
        optimizer=optimizer_bytes(trainer.optimizer), activations=activations,
        probe_error=probe_error,
        micro_batch=0 if x is None else (len(x) if x.ndim else 1),
        ranks=ranks_on_this_machine(trainer), precision=trainer.precision,
        update_in_backward=trainer.update_in_backward, largest_gradient=largest)


# -- the check --------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping: MemAvailable from
    /proc/meminfo, else the free physical pages (os.sysconf); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(estimate: MemoryEstimate, available: int | None) -> None:
    """Raise InsufficientMemoryError, with the estimate and what would fit, when the run's ranks
    on this machine need more than `available` bytes (None: unknown, not checked)."""
    if available is None or estimate.machine_total <= available:
        return
    ways = []
    fixed = estimate.with_batch(0).machine_total
    per_row = (estimate.machine_total - fixed) / max(estimate.micro_batch, 1)
    if per_row > 0 and available > fixed:
        rows = int((available - fixed) // per_row)
        if rows >= 1:
            ways.append(f"micro-batches of at most {rows} rows (batch_size, or accumulation_steps "
                        "for the same effective batch)")
    if estimate.precision == "fp32" and estimate.in_bf16().machine_total <= available:
        ways.append(f"precision bf16 (about {gib(estimate.in_bf16().machine_total)})")
    if not estimate.update_in_backward and estimate.updating_in_backward().machine_total <= available:
        ways.append(f"update_in_backward (about {gib(estimate.updating_in_backward().machine_total)}; "
                    "no accumulation, loss scaling, clipping or freezing)")
    advice = ("; what would fit: " + "; or ".join(ways)) if ways else \
        "; no smaller batch, bf16 or update_in_backward alone would fit: use a smaller model"
    raise InsufficientMemoryError(
        f"the run does not fit in memory: {estimate.describe()}, but {gib(available)} is "
        f"available{advice} (train.memory_check false runs it anyway)")
