"""The compiled step runner: SGD/Adam/AdamW steps of a small classifier in chunks of one Numba call.

It applies when the run is one CompiledClassifierStep supports (npcpu.train.compiled: a
Sequential of Linear/FusedLinearReLU (a Linear optionally followed by ReLU, GELU or Tanh) in fp32,
fp64 or bf16 (native bf16 GEMMs), CrossEntropyLoss, SGD, Adam or AdamW) and the
reference step would do nothing it does not (one micro-batch per step, no loss scaler, no
clipping, no freezer, no updates inside backward, an ArrayDataset in the compute dtype; under
bf16 its x is rounded to bfloat16 once, as layer 0's GEMMs read it).

A call of `steps(limit)` runs up to `limit` steps in one compiled call, from the trainer's data
position to at most the epoch's end. The Trainer's loop asks for at most the steps to its next
evaluation or checkpoint, so a chunk ends wherever the loop acts on the model between steps. A
chunk also ends where the scheduler changes a group setting other than "lr" (OneCycleLR's
momentum, which the call reads once at its start), and otherwise after about
COMPILED_CHUNK_SECONDS of steps (timed on the chunk before), at least
max(log_every, COMPILED_CHUNK_STEPS). Each compiled call costs a fixed start (its threads and
their arguments), so chunks must be long; and callbacks and log lines wait for a chunk's end,
so they must not be too long.

The call runs on CompiledClassifierStep.default_threads threads (two for the models it is for),
whose meetings twice a step need both cores at once. When other programs keep the cores busy, a
thread often waits for one that is not running, and one thread is then faster: a call whose
threads found too many of their meetings late goes on with one thread (npcpu.kernels.
compiled_step.train_worker), and the rest of the fit() then runs on one thread. The results are
the same bit for bit.

The call gets each step's learning rates from a dry run of the scheduler (stepped, then
restored); the loop then really steps the scheduler once per step yielded, as after reference
steps. Both runners leave the same state at every step boundary, so checkpoints resume in either.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from npcpu.data.arrays import ArrayDataset
from npcpu.train.compiled import CompiledClassifierStep
from npcpu.train.runners import StepResult, non_finite_message, window_gradients

COMPILED_CHUNK_STEPS = 100
COMPILED_CHUNK_SECONDS = 0.25


class CompiledRunner:
    """Step runner (npcpu.train.runners) over CompiledClassifierStep.train_steps.

    Building it raises TypeError / ValueError naming what in the trainer or its data the compiled
    path does not do; Trainer.make_runner turns that into the "compiled step: off (...)" note.
    """

    def __init__(self, trainer, loader, log_every: int):
        step, x, y = _compiled_step(trainer, loader)
        self.trainer, self.loader = trainer, loader
        self._step = step
        self._train_steps = functools.partial(step.train_steps, x, y,
                                              x_scale=loader.dataset.scale)
        self._threads = step.default_threads(loader.batch_size)
        self._min_chunk = max(log_every, COMPILED_CHUNK_STEPS)
        self._chunk_steps = self._min_chunk
        self._order = None  # (epoch, loader.order(epoch)) of the current epoch
        self.note = f"compiled step: on (CompiledClassifierStep, {self._threads} threads)"

    def preferred_steps(self) -> int:
        return self._chunk_steps

    def close(self) -> None:
        self._order = None

    def steps(self, limit: int):
        """One compiled call of up to `limit` steps; then its StepResults. A non-finite loss raises
        FloatingPointError after the steps before it were yielded."""
        trainer, loader = self.trainer, self.loader
        if trainer.batch_index >= len(loader):
            trainer.epoch += 1
            trainer.batch_index = 0
        first, batch_size = trainer.batch_index, loader.batch_size
        limit = min(limit, len(loader) - first)
        lrs = self._planned_lrs(limit) if trainer.scheduler is not None else None
        limit = limit if lrs is None else len(lrs)
        if self._order is None or self._order[0] != trainer.epoch:
            self._order = (trainer.epoch, loader.order(trainer.epoch))  # O(samples): once an epoch
        order = self._order[1]
        grad_norms = np.empty(limit, dtype=np.float64)
        started = time.perf_counter()
        losses = self._train_steps(order, batch_size, first_batch=first, steps=limit, lrs=lrs,
                                   grad_norms=grad_norms, threads=self._threads)
        if self._step.alone_from < limit:
            self._threads = 1
        taken = len(losses) if math.isfinite(losses[-1]) else len(losses) - 1
        per_step = (time.perf_counter() - started) / max(taken, 1)
        self._chunk_steps = max(self._min_chunk,
                                int(COMPILED_CHUNK_SECONDS / max(per_step, 1e-9)))
        trainer.batch_index = first + len(losses)  # as the reference: also past a failed batch
        for i in range(taken):
            start = (first + i) * batch_size
            items = min(start + batch_size, order.size) - start
            yield StepResult(float(losses[i]), items, float(grad_norms[i]))
        if taken < len(losses):
            start = (first + taken) * batch_size
            window = [loader.dataset.batch(order[start:start + batch_size])]
            raise FloatingPointError(non_finite_message(trainer, float(losses[taken]), window,
                                                        window_gradients(trainer, window)))

    def _planned_lrs(self, steps: int) -> np.ndarray:
        """(k, groups): each param group's lr at each of the next k <= `steps` steps.

        Found by stepping the scheduler as the loop would, then restoring it and the param groups
        (the compiled call reads the groups' other settings at its start; the scheduler really
        steps after the call, once per step taken). k < `steps` when a scheduler step changes a
        group setting other than "lr" (OneCycleLR's momentum): the chunk ends with that step.
        """
        scheduler, groups = self.trainer.scheduler, self.trainer.optimizer.param_groups
        saved_scheduler, saved_groups = scheduler.state_dict(), [dict(g) for g in groups]
        settings = _fixed_settings(groups)
        lrs = np.empty((steps, len(groups)), dtype=np.float64)
        try:
            for i in range(steps):
                lrs[i] = [group["lr"] for group in groups]
                scheduler.step()
                if _fixed_settings(groups) != settings:
                    return lrs[:i + 1]
            return lrs
        finally:
            scheduler.load_state_dict(saved_scheduler)
            for group, saved in zip(groups, saved_groups):
                group.update(saved)


def _compiled_step(trainer, loader):
    """(CompiledClassifierStep, x (S, D), y (S,)), or TypeError / ValueError naming what in this
    trainer or its data the compiled path does not do."""
    for what in trainer.gradient_readers():
        raise ValueError(what)
    for unsupported, what in (
            (trainer.update_in_backward, "the optimizer updates inside backward"),
            (trainer.precision not in ("fp32", "fp64", "bf16"), f"precision is "
                                                                f"{trainer.precision!r}, not 'fp32', "
                                                                "'fp64' or 'bf16'"),
            (not trainer.model.training, "the model is in eval mode"),
            (trainer.model.input_requires_grad, "model.input_requires_grad is True")):
        if unsupported:
            raise ValueError(what)
    step = CompiledClassifierStep(trainer.model, trainer.loss_fn, trainer.optimizer)
    dataset = loader.dataset
    if not isinstance(dataset, ArrayDataset) or type(dataset).batch is not ArrayDataset.batch:
        raise TypeError(f"the training data is a {type(dataset).__name__} (the compiled step "
                        "reads the x and y arrays of an ArrayDataset directly)")
    dtype = step.compute_dtype
    if dataset.x.ndim != 2 or dataset.x.dtype != (dtype if dataset.scale is None else np.uint8):
        raise ValueError(f"the training data's x is {dataset.x.dtype} {dataset.x.shape}; the "
                         f"compiled step takes {dtype} (samples, features) for this model, or "
                         "uint8 pixels with a scale")
    step.check_scale(dataset.scale)
    return step, step.gemm_input(dataset.x), dataset.y


def _fixed_settings(groups) -> list:
    """Each param group's settings but "params" and "lr": what a compiled call reads once."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in groups]
