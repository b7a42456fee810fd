"""Step runners: what runs the optimizer steps of `Trainer.fit`, behind one interface.

The Trainer's loop (epochs, evaluation, checkpoints, callbacks, signals, early stop) never runs
a forward or backward pass itself: it asks a step runner for up to `limit` steps and gets one
StepResult per step. Two runners exist:

    ReferenceRunner   (here) one step per call: forward and backward over a window of
                      micro-batches, then unscale, clip, freeze and the optimizer step.
    CompiledRunner    (npcpu.train.runner_compiled) many plain-SGD steps of a small classifier
                      in one Numba call.
    LanguageModelRunner (npcpu.train.lm) the reference step with target tokens as its items.

The contract, for the runners to come (a data-parallel one):

- `note`: one line fit() logs after the header ("compiled step: off (...)").
- `preferred_steps() -> int`: how many steps the runner wants from its next call (>= 1). The
  loop asks for min(that, steps to the end, steps to the next evaluation or checkpoint).
- `steps(limit) -> iterator of StepResult`: run at most `limit` steps from the trainer's data
  position (`trainer.epoch`, `trainer.batch_index`, which the runner advances as it consumes
  micro-batches; a step never spans two epochs) and yield one StepResult per step run. The
  loop handles each result as it arrives: it steps the scheduler (after a step taken), counts
  `trainer.step`, `samples_seen`, `skipped_steps`. A runner that yields lazily, one step at a
  time, therefore sees the scheduler and counters as the step before left them; a runner that
  runs several steps before its first yield must plan the learning rates itself (as
  CompiledRunner does). The loop calls the callbacks once the iterator is exhausted.
  A step whose loss is not finite, or without a loss scaler whose gradients are not, raises
  FloatingPointError (naming the step, whether the inputs were finite, and the first layer, in
  the model's parameter order, whose gradient is not) after yielding the steps before it, with
  the optimizer step not taken.
- `close()`: release what the runner holds (a prefetch thread); called at the end of fit().

A runner reads the trainer's model, loss, optimizer and settings; it is built by
`Trainer.make_runner(loader, log_every)`, which a subclass overrides to supply its own. A runner
that changes only part of the reference step subclasses ReferenceRunner and overrides one of its
parts: `forward_backward(window)` (a data-parallel runner all-reduces the gradients, loss
and samples after it), `optimizer_step(loss, items, window)`, or `window_items(window)`, what
the window's loss is a mean over (LanguageModelRunner: its non-ignored target tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from npcpu.optim.clip import clip_grad_norm as clip_grad_norm_
from npcpu.optim.clip import clip_grad_norm_and_squares, get_total_norm, norm_from_squares


@dataclass
class StepResult:
    """One optimizer step, as a runner reports it.

    loss        the window's mean loss
    items       samples in the window
    grad_norm   total gradient 2-norm before clipping (None: not computed, e.g. updates inside
                backward, or a step skipped by the loss scaler)
    skipped     the loss scaler skipped the optimizer step (Inf/NaN gradients)
    frozen_now  names of the layers the freezer froze at this step
    extra       further per-step metrics, added to on_step_end's metrics as they are
    """
    loss: float
    items: int
    grad_norm: float | None
    skipped: bool = False
    frozen_now: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class StepRunner(Protocol):
    """The interface Trainer.fit runs its steps through (the contract: the module docstring)."""

    note: str

    def preferred_steps(self) -> int: ...

    def steps(self, limit: int) -> Iterator[StepResult]: ...

    def close(self) -> None: ...


def non_finite_message(trainer, loss: float, window: list, gradients: str | None = None) -> str:
    """The FloatingPointError text for a non-finite loss at the trainer's next step; `gradients`
    is `non_finite_gradients(model)` when backward has run."""
    bad_inputs = [i for i, (x, _) in enumerate(window)
                  if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))]
    where = (f"micro-batch(es) {bad_inputs} of this window contain NaN/Inf inputs"
             if bad_inputs else "the inputs are finite, so the model diverged "
             "(lower the learning rate, clip gradients, or use a loss scaler)")
    grads = f"; {gradients}" if gradients else ""
    return (f"loss is {loss} at step {trainer.step + 1} (epoch {trainer.epoch}){grads}: {where}. "
            "The optimizer step was not taken; parameters are unchanged.")


def non_finite_gradients(model) -> str | None:
    """Which gradients hold NaN/Inf, in the model's parameter order: "non-finite gradient first
    in layer '0' (Linear), parameter 0.weight; 2 of 4 gradients non-finite", or None."""
    bad = [name for name, p in model.named_parameters()
           if not p.frozen and p.grad is not None and not np.all(np.isfinite(p.grad))]
    if not bad:
        return None
    layer = bad[0].rpartition(".")[0]
    module = dict(model.named_modules())[layer]
    total = sum(1 for _, p in model.named_parameters() if not p.frozen and p.grad is not None)
    return (f"non-finite gradient first in layer {layer or '(the model)'!r} "
            f"({type(module).__name__}), parameter {bad[0]}; {len(bad)} of {total} gradients "
            "non-finite")


def window_gradients(trainer, window: list) -> str | None:
    """`non_finite_gradients` after a reference forward and backward of `window`, for a runner
    whose step keeps its gradients to itself (the compiled one); the gradients are zeroed after."""
    ReferenceRunner(trainer, loader=None).forward_backward(window)
    try:
        return non_finite_gradients(trainer.model)
    finally:
        trainer.optimizer.zero_grad()


class ReferenceRunner:
    """The reference step (npcpu.train.trainer's module docstring), one per call of `steps`."""

    def __init__(self, trainer, loader, note: str = "reference step"):
        self.trainer, self.loader, self.note = trainer, loader, note
        self._batches = None  # the running iterator over the current epoch's micro-batches
        self.squares: dict = {}  # id(param) -> its clipped gradient's sum of squares, this step

    def preferred_steps(self) -> int:
        return 1  # the loop checks its stop conditions between any two steps

    def steps(self, limit: int):
        for _ in range(limit):
            window = self._next_window()
            loss, items = self.forward_backward(window)
            yield self.optimizer_step(loss, items, window)

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()  # stops the prefetch thread
            self._batches = None

    def _next_window(self) -> list:
        """The next `accumulation_steps` micro-batches; a window never crosses an epoch boundary."""
        trainer, loader = self.trainer, self.loader
        if trainer.batch_index >= len(loader):
            trainer.epoch += 1
            trainer.batch_index = 0
            self.close()
        if self._batches is None:  # first window of a fit(), or a new epoch
            self._batches = loader.iter_from(trainer.epoch, trainer.batch_index)
        stop = min(trainer.batch_index + trainer.accumulation_steps, len(loader))
        window = [next(self._batches) for _ in range(stop - trainer.batch_index)]
        trainer.batch_index = stop
        return window

    def forward_backward(self, window: list) -> tuple[float, int]:
        """(the window's mean loss, its samples), the gradients summed into the parameters.

        The seam for a data-parallel runner: it calls this, then all-reduces the gradients, the
        loss and the samples across processes before optimizer_step.
        """
        items = self.window_items(window)
        loss = 0.0
        for x, y in window:
            loss += self.micro_batch(x, y, items, window)
        return loss, items

    def window_items(self, window: list) -> int:
        """What the window's loss is the mean over: its samples (a language model's runner
        counts target tokens)."""
        return sum(len(y) for _, y in window)

    def micro_batch(self, x, y, normalizer: int, window: list) -> float:
        """Forward and backward of one micro-batch, its loss divided by `normalizer` (the items
        of the whole window); the gradients add into the parameters. Returns that loss."""
        trainer = self.trainer
        model, loss_fn, scaler = trainer.model, trainer.loss_fn, trainer.loss_scaler
        logits = model.forward(x)
        loss = loss_fn(logits, y, normalizer=normalizer)
        if trainer.update_in_backward and not math.isfinite(loss):  # backward would update
            raise FloatingPointError(non_finite_message(trainer, loss, window))
        dlogits = loss_fn.backward()
        if scaler is not None:
            dlogits = scaler.scale_loss_grad(dlogits)
        model.backward(dlogits)
        return loss

    def optimizer_step(self, loss: float, items: int, window: list) -> StepResult:
        """Unscale, check, clip, observe for freezing, step (or skip), zero the gradients."""
        trainer = self.trainer
        model, optimizer, scaler = trainer.model, trainer.optimizer, trainer.loss_scaler
        if trainer.update_in_backward:  # updated by backward; the gradients are gone
            return StepResult(loss, items, None)
        params = [p for p in model.parameters() if not p.frozen]
        found_inf = scaler.unscale_(optimizer) if scaler is not None else False
        if scaler is None and not math.isfinite(loss):
            gradients = non_finite_gradients(model)
            optimizer.zero_grad()
            return self._non_finite(non_finite_message(trainer, loss, window, gradients), loss, items)
        grad_norm, frozen_now = None, []
        if not found_inf:
            grad_norm = self._grad_norm(params, check=scaler is None)
            if not math.isfinite(grad_norm):  # only without a scaler (it found none above)
                gradients = non_finite_gradients(model)
                optimizer.zero_grad()
                return self._non_finite(
                    f"gradient norm is {grad_norm} at step {trainer.step + 1} (epoch "
                    f"{trainer.epoch}) with a finite loss {loss}: {gradients}. The optimizer "
                    "step was not taken; parameters are unchanged (a loss scaler, or "
                    "on_nonfinite='skip', skips such steps).", loss, items)
            if trainer.freezer is not None:
                frozen_now = self.observe_for_freezing()
        stepped = self.take_step()
        optimizer.zero_grad()
        return StepResult(loss, items, grad_norm, skipped=not stepped, frozen_now=frozen_now)

    def observe_for_freezing(self) -> list:
        """The freezer's look at this step's (clipped) gradients: the layers it froze now, their
        norms from the sums of squares `_grad_norm` kept. (A data-parallel runner whose ranks
        each hold only their own parameters' summed gradients gives it the layers' norms from
        the owners.)"""
        trainer = self.trainer
        return trainer.freezer.observe(trainer.model, trainer.step + 1,
                                       functools.partial(norm_from_squares, self.squares))

    def _non_finite(self, message: str, loss: float, items: int) -> StepResult:
        """A non-finite loss or gradient without a loss scaler (the gradients already zeroed):
        FloatingPointError(message), or with on_nonfinite='skip' the message logged and the step
        counted as skipped."""
        if self.trainer.on_nonfinite == "stop":
            raise FloatingPointError(message)
        self.trainer.log(f"skipped the optimizer step: {message}")
        return StepResult(loss, items, None, skipped=True)

    def take_step(self) -> bool:
        """The optimizer step on the finished gradients, through the loss scaler when there is
        one; False when the scaler skipped it. (A data-parallel runner that shards the optimizer
        step across processes overrides this.)"""
        optimizer, scaler = self.trainer.optimizer, self.trainer.loss_scaler
        if scaler is None:
            optimizer.step()
            return True
        stepped = scaler.step(optimizer)  # skips the step when a gradient is Inf/NaN
        scaler.update()
        return stepped

    def _grad_norm(self, params: list, check: bool) -> float:
        """The total gradient norm, clipping when the trainer clips. With `check`, a non-finite
        norm is returned with the gradients untouched (clipping would make them all NaN). With a
        freezer, each parameter's sum of squares after clipping is kept for its layer norms,
        taken in the same passes (`squares`)."""
        max_norm = self.trainer.clip_grad_norm
        try:
            if self.trainer.freezer is not None:
                norm, self.squares = clip_grad_norm_and_squares(params, max_norm, check)
                return norm
            if max_norm is None:
                return get_total_norm(params)
            return clip_grad_norm_(params, max_norm, error_if_nonfinite=check)
        except RuntimeError:  # raised only for a non-finite norm, before any gradient changes
            return math.nan
