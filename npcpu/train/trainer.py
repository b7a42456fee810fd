"""The training loop: accumulation, precision, loss scaling, clipping, freezing, checkpoints.

One optimizer step ("step" below) processes a window of `accumulation_steps` micro-batches:

    for each micro-batch (x, y) of the window:
        logits = model.forward(x)
        loss   = loss_fn(logits, y, normalizer=N)   # N = items in the whole window: mean over it
        model.backward(scaler.scale(loss_fn.backward()))   # gradients add up in float32
    found_inf = scaler.unscale_(optimizer)          # unscaled, finished sums from here on
    grad_norm = clip_grad_norm(params, max_norm)    # pre-clip norm
    freezer.observe(model, step)                    # windowed per-layer gradient norms
    if not found_inf: optimizer.step(); scheduler.step()     # a skipped step moves no counter
    scaler.update(); optimizer.zero_grad()

Because every micro-batch's loss is divided by the size of the whole window (a short last window
by its real size), k micro-batches give the same gradient as one batch of k times the size.

The compiled path: when the run is one CompiledClassifierStep supports (npcpu.train.compiled: a
Sequential of Linear/FusedLinearReLU in fp32 or fp64, CrossEntropyLoss, plain SGD) and the loop
above would do nothing it does not (one micro-batch per step, no loss scaler, no clipping, no
freezer, an ArrayDataset in the parameters' dtype), fit() runs the steps in chunks of one Numba
call each: a chunk ends wherever the loop acts on the model between steps (evaluation,
checkpoint, epoch end, the last step), where the scheduler changes a group setting other than
"lr" (OneCycleLR's momentum, which the call reads once at its start), and otherwise after about
COMPILED_CHUNK_SECONDS of steps, at least max(log_every, COMPILED_CHUNK_STEPS) (the log lines of a
chunk are written when it ends). The call gets each step's
learning rates from a dry run of the scheduler (stepped, then restored). After it, as in the loop,
the scheduler steps once per step taken, the counters advance, and every callback's on_step_end
runs once per step with the metrics the loop would have given (samples_per_s is the chunk's rate);
a non-finite loss raises the loop's FloatingPointError after the steps before it are counted.
Both paths leave the same state at every step boundary, so checkpoints resume in either.

With `update_in_backward=True` the optimizer updates each parameter inside model.backward
(Optimizer.fuse_into_backward) and the whole-model gradients are never held: the loop above then
checks the loss before backward (a non-finite loss still leaves the parameters unchanged), has no
gradient norm to report, and calls no optimizer.step(). It excludes accumulation, loss scaling,
clipping and freezing, which all read the finished gradients.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from npcpu import checkpoint
from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.optim.clip import clip_grad_norm as clip_grad_norm_
from npcpu.optim.clip import get_total_norm
from npcpu.optim.optimizer import Optimizer
from npcpu.optim.scaling import DynamicLossScaler
from npcpu.precision import check_precision
from npcpu.train.callbacks import Callback, MetricsFile, Progress, Stopwatch
from npcpu.train.compiled import CompiledClassifierStep

COMPILED_MODES = ("auto", "on", "off")
# A compiled call costs about 1 ms to start (its threads, their arguments): a logreg-mnist epoch of
# 469 steps in chunks of 100 took 4-5 ms longer than in one call. So a chunk runs about
# COMPILED_CHUNK_SECONDS of steps (measured on the chunk before), at least COMPILED_CHUNK_STEPS:
# callbacks and log lines wait at most that long for the chunk to end.
COMPILED_CHUNK_STEPS = 100
COMPILED_CHUNK_SECONDS = 0.25


class Trainer:
    """Train `model` on `loss_fn` with `optimizer`.

    Parameters
    ----------
    model : Module
        Its `set_precision(precision)` is called here; build the optimizer on its parameters before
        or after, either works (Parameters keep their identity).
    loss_fn : Loss
        `loss_fn(logits, y, normalizer=N) -> float`, `loss_fn.backward() -> dL/dlogits`.
    optimizer : Optimizer or Lookahead
    scheduler : LR scheduler, optional
        Stepped once per optimizer step that was taken.
    accumulation_steps : int
        Micro-batches per optimizer step.
    precision : {"fp32", "bf16", "fp16"}
        Storage of parameters and saved activations (DESIGN.md, "Precision"). "fp16" turns on a
        DynamicLossScaler unless one is given.
    loss_scaler : DynamicLossScaler, optional
    clip_grad_norm : float, optional
        Clip the total gradient 2-norm to this value after unscaling.
    freezer : DynamicFreezer, optional
    callbacks : sequence of Callback
    seed : int
        Seeds the data order (shuffling is a pure function of (seed, epoch)).
    compiled : {"auto", "on", "off"}
        The compiled path (module docstring): "auto" takes it when it applies, "on" makes fit()
        raise ValueError saying why when it does not, "off" never takes it. fit() logs which path
        it runs ("compiled step: on (...)" or "compiled step: off (reason)"). On the compiled path
        the on_step_end calls of a chunk come after the whole chunk ran: the model, the optimizer
        and the trainer's counters are then at the chunk's end, and metrics["step"] names the step
        the metrics are of. A callback that sets stop_training there stops training at the end of
        the chunk, and SIGTERM / Ctrl-C finish the chunk, not only the step.
    update_in_backward : bool
        Update each parameter inside backward, as soon as its gradient is complete, and never hold
        the whole model's gradients (module docstring; the metrics' grad_norm is then None). Taken
        as True when the optimizer's fuse_into_backward() was already called.
    """

    def __init__(self, model, loss_fn, optimizer, *, scheduler=None, accumulation_steps: int = 1,
                 precision: str = "fp32", loss_scaler=None, clip_grad_norm: float | None = None,
                 freezer=None, callbacks=(), seed: int = 0, compiled: str = "auto",
                 update_in_backward: bool = False, log_stream=None):
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"Trainer: accumulation_steps must be an integer >= 1, "
                             f"got {accumulation_steps!r}")
        if compiled not in COMPILED_MODES:
            raise ValueError(f"Trainer: compiled must be one of {COMPILED_MODES}, got {compiled!r}")
        check_precision(precision)
        if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
            raise ValueError(f"Trainer: clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"Trainer: callbacks must be Callback instances, got {type(cb).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation_steps = accumulation_steps
        self.precision = precision
        if loss_scaler is None and precision == "fp16":
            loss_scaler = DynamicLossScaler()
        self.loss_scaler = loss_scaler
        self.clip_grad_norm = clip_grad_norm
        self.freezer = freezer
        self.callbacks = list(callbacks)
        self.seed = seed
        self.compiled = compiled
        self.log_stream = log_stream or sys.stderr
        self.update_in_backward = bool(update_in_backward) or getattr(
            optimizer, "fused_into_backward", False)
        if self.update_in_backward:
            self._fuse_optimizer_into_backward()

        if model.precision != precision:
            model.set_precision(precision)
        model.input_requires_grad = False  # the data needs no gradient: no dx GEMM in layer 0

        self.step = 0            # optimizer steps attempted (taken or skipped)
        self.epoch = 0
        self.batch_index = 0     # micro-batches of the current epoch already consumed
        self.skipped_steps = 0
        self.samples_seen = 0
        self.stop_training = False
        self.interrupted: str | None = None
        self.last_eval: dict | None = None
        self._progress: Progress | None = None
        self._batches = None     # the running iterator over the current epoch's micro-batches
        self._order = None       # compiled path: (epoch, loader.order(epoch)) of the current epoch
        self._saved_step = None  # the step of the last checkpoint this trainer wrote

    def _fuse_optimizer_into_backward(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"Trainer: update_in_backward needs an npcpu Optimizer (SGD, Adam, AdamW), "
                            f"got {type(self.optimizer).__name__}")
        for what in self._gradient_readers():
            raise ValueError(f"Trainer: update_in_backward cannot be combined with this: {what} "
                             "(it needs the finished gradients, which are never held whole)")
        if not self.optimizer.fused_into_backward:
            self.optimizer.fuse_into_backward()

    def _gradient_readers(self) -> list[str]:
        """What this trainer does between backward and the optimizer step, each as the reason the
        compiled path and updates inside backward give for not applying (empty: nothing)."""
        return [what for active, what in (
            (self.accumulation_steps != 1, f"accumulation_steps is {self.accumulation_steps}, not 1"),
            (self.loss_scaler is not None, "a loss scaler is set (precision 'fp16' sets one)"),
            (self.clip_grad_norm is not None, f"clip_grad_norm is {self.clip_grad_norm}"),
            (self.freezer is not None, "a freezer is set")) if active]

    # -- logging --------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.write(message)
        else:
            print(message, file=self.log_stream, flush=True)

    def header(self) -> str:
        """Versions, BLAS and threading, precision and model size: the first lines of every run."""
        from npcpu.info import system_info
        info = system_info()
        blas, threads = info["blas"], info["numba_threading"]
        return (f"npcpu {info['npcpu']} | numpy {info['numpy']} | numba {info['numba']} | "
                f"python {info['python']}\n"
                f"BLAS {blas['vendor']} {blas['version']} ({blas['threads']} threads) | "
                f"Numba threading {threads['layer']} ({threads['threads']} threads)\n"
                f"precision {self.precision} | parameters {self.model.num_parameters():,} | "
                f"accumulation {self.accumulation_steps} | optimizer {_describe(self.optimizer)}"
                + (" (updates inside backward)" if self.update_in_backward else ""))

    # -- one step -------------------------------------------------------------------------------
    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _train_window(self, window: list) -> dict:
        """Forward and backward over a window of micro-batches, then one optimizer step."""
        model, loss_fn, scaler = self.model, self.loss_fn, self.loss_scaler
        items = sum(len(y) for _, y in window)
        loss = 0.0
        for x, y in window:
            logits = model.forward(x)
            loss += loss_fn(logits, y, normalizer=items)
            if self.update_in_backward and not math.isfinite(loss):  # backward would update
                raise FloatingPointError(self._non_finite_message(loss, window))
            dlogits = loss_fn.backward()
            if scaler is not None:
                dlogits = scaler.scale_loss_grad(dlogits)
            model.backward(dlogits)

        if self.update_in_backward:  # updated by backward; the gradients are gone
            return self._count_step(loss, items, None, stepped=True, frozen_now=[])
        params = [p for p in model.parameters() if not p.frozen]
        found_inf = scaler.unscale_(self.optimizer) if scaler is not None else False
        if scaler is None and not math.isfinite(loss):
            self.optimizer.zero_grad()
            raise FloatingPointError(self._non_finite_message(loss, window))
        grad_norm, frozen_now = None, []
        if not found_inf:
            grad_norm = clip_grad_norm_(params, self.clip_grad_norm) \
                if self.clip_grad_norm is not None else get_total_norm(params)
            if self.freezer is not None:
                frozen_now = self.freezer.observe(model, self.step + 1)
        if scaler is not None:
            stepped = scaler.step(self.optimizer)  # skips the step when a gradient is Inf/NaN
        else:
            self.optimizer.step()
            stepped = True
        if scaler is not None:
            scaler.update()
        self.optimizer.zero_grad()
        return self._count_step(loss, items, grad_norm, stepped, frozen_now)

    def _count_step(self, loss: float, items: int, grad_norm, stepped: bool, frozen_now: list) -> dict:
        """Step the scheduler (after a step taken) and the counters; the window's metrics."""
        if stepped:
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped_steps += 1
        self.step += 1
        self.samples_seen += items
        return {"loss": loss, "items": items, "grad_norm": grad_norm, "skipped": not stepped,
                "frozen_now": frozen_now}

    def _non_finite_message(self, loss: float, window: list) -> str:
        bad_inputs = [i for i, (x, _) in enumerate(window)
                      if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))]
        where = (f"micro-batch(es) {bad_inputs} of this window contain NaN/Inf inputs"
                 if bad_inputs else "the inputs are finite, so the model diverged "
                 "(lower the learning rate, clip gradients, or use a loss scaler)")
        return (f"loss is {loss} at step {self.step + 1} (epoch {self.epoch}): {where}. "
                "The optimizer step was not taken; parameters are unchanged.")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, train_data, *, epochs: int | None = None, max_steps: int | None = None,
            batch_size: int = 128, eval_data=None, eval_every: int | None = None,
            run_dir=None, checkpoint_every: int | None = None, keep_last: int = 3,
            log_every: int = 10, progress: bool | None = None) -> dict:
        """Train until `epochs` epochs or `max_steps` optimizer steps (whichever comes first).

        `train_data` is a dataset (batched with `batch_size` micro-batches, shuffled by
        (seed, epoch)) or a DataLoader. Evaluates every `eval_every` steps and at the end when
        `eval_data` is given; checkpoints to `run_dir` every `checkpoint_every` steps, at the end,
        and on SIGTERM / Ctrl-C. Resumes where `resume()` left the counters. Runs the steps on
        the compiled path where it applies (see `compiled` in the class docstring).

        Returns the last metrics (including the final evaluation when there is eval data).
        """
        if epochs is None and max_steps is None:
            raise ValueError("Trainer.fit: give epochs or max_steps")
        for name, value in (("epochs", epochs), ("max_steps", max_steps), ("eval_every", eval_every),
                            ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Trainer.fit: {name} must be an integer >= 1, got {value!r}")
        loader = train_data if isinstance(train_data, DataLoader) else \
            DataLoader(train_data, batch_size, shuffle=True, seed=self.seed)
        compiled_steps, path_note = self._choose_path(loader)
        run_dir = Path(run_dir) if run_dir is not None else None
        if run_dir is not None:
            checkpoint.ensure_writable(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)  # the metrics file goes there from the start

        windows_per_epoch = math.ceil(len(loader) / self.accumulation_steps)
        total = max_steps if max_steps is not None else None
        if epochs is not None:
            by_epochs = epochs * windows_per_epoch
            total = by_epochs if total is None else min(total, by_epochs)

        callbacks = list(self.callbacks)
        if run_dir is not None:
            callbacks.append(MetricsFile(run_dir, log_every))
        self._progress = Progress(total, log_every, self.log_stream, use_bar=progress)
        callbacks.append(self._progress)
        self.log(self.header())
        self.log(path_note)
        # where the loop acts on the model between steps: a compiled chunk ends at each multiple
        # of these (logging only reads the metrics, so it waits for the chunk's end)
        intervals = [n for n, used in ((eval_every, eval_data is not None),
                                       (checkpoint_every, run_dir is not None)) if n and used]
        chunk_steps = max(log_every, COMPILED_CHUNK_STEPS)

        metrics: dict = {}
        self.stop_training = False
        with self._signals_save_and_stop():
            for cb in callbacks:
                cb.on_fit_start(self)
            watch = Stopwatch()
            try:
                while self.step < total and not self.stop_training and self.interrupted is None:
                    if compiled_steps is None:
                        metrics = self._reference_step(loader, watch, callbacks)
                    else:
                        steps = min([total - self.step, chunk_steps]
                                    + [n - self.step % n for n in intervals])
                        started, first_step = time.perf_counter(), self.step
                        metrics = self._compiled_chunk(compiled_steps, loader, steps, watch,
                                                       callbacks)
                        per_step = (time.perf_counter() - started) / max(self.step - first_step, 1)
                        chunk_steps = max(log_every, COMPILED_CHUNK_STEPS,
                                          int(COMPILED_CHUNK_SECONDS / max(per_step, 1e-9)))
                    if eval_data is not None and eval_every and self.step % eval_every == 0:
                        self._evaluate_and_report(eval_data, batch_size, callbacks)
                    if run_dir is not None and checkpoint_every and self.step % checkpoint_every == 0:
                        self._checkpoint(run_dir, keep_last, callbacks)
                if eval_data is not None and (self.last_eval is None
                                              or self.last_eval["step"] != self.step):
                    self._evaluate_and_report(eval_data, batch_size, callbacks)
                if run_dir is not None and self._saved_step != self.step:
                    self._checkpoint(run_dir, keep_last, callbacks)
            finally:
                for cb in callbacks:
                    cb.on_fit_end(self)
                self._progress = None
                if self._batches is not None:
                    self._batches.close()  # stops the prefetch thread
                    self._batches = None
                self._order = None
        if self.interrupted is not None:
            self.log(f"stopped by {self.interrupted} at step {self.step}"
                     + (f"; checkpoint saved in {run_dir}" if run_dir is not None else ""))
        return {**metrics, **(self.last_eval or {})}

    def _reference_step(self, loader, watch: Stopwatch, callbacks) -> dict:
        """One step of the loop in the module docstring, then its on_step_end calls."""
        result = self._train_window(self._next_window(loader))
        watch.add(result["items"])
        metrics = self._step_metrics(result, self.step, self._lr(), watch.rate())
        for name in result["frozen_now"]:
            self.log(f"step {self.step}: froze layer {name}")
        for cb in callbacks:
            cb.on_step_end(self, metrics)
        return metrics

    def _next_window(self, loader) -> list:
        """The next `accumulation_steps` micro-batches; a window never crosses an epoch boundary."""
        if self.batch_index >= len(loader):
            self.epoch += 1
            self.batch_index = 0
            self._batches = None
        if self._batches is None:  # first window of a fit(), or a new epoch
            self._batches = loader.iter_from(self.epoch, self.batch_index)
        stop = min(self.batch_index + self.accumulation_steps, len(loader))
        window = [next(self._batches) for _ in range(stop - self.batch_index)]
        self.batch_index = stop
        return window

    def _step_metrics(self, result: dict, step: int, lr: float, samples_per_s: float) -> dict:
        """on_step_end's metrics of step `step`; `lr`: group 0's lr after that step's scheduler step."""
        metrics = {
            "step": step, "epoch": self.epoch, "loss": result["loss"], "lr": lr,
            "samples_per_s": samples_per_s, "grad_norm": result["grad_norm"],
            "skipped_steps": self.skipped_steps,
            "frozen_layers": sorted(self.freezer.frozen_at) if self.freezer else [],
        }
        if self.loss_scaler is not None:
            metrics["loss_scale"] = float(self.loss_scaler.scale)
        if result["frozen_now"]:
            metrics["frozen_now"] = result["frozen_now"]
        return metrics

    # -- the compiled path ----------------------------------------------------------------------
    def _choose_path(self, loader):
        """(train_steps, note): the bound CompiledClassifierStep.train_steps(x, y, ...) for this
        fit, or None for the reference loop; `note` is the line fit() logs about the choice."""
        if self.compiled == "off":
            return None, "compiled step: off (compiled='off')"
        try:
            step, x, y = self._compiled_setup(loader)
        except (TypeError, ValueError) as reason:
            if self.compiled == "on":
                raise ValueError(f"Trainer: compiled='on' but the compiled step does not apply: "
                                 f"{reason}") from None
            return None, f"compiled step: off ({reason})"
        threads = step.default_threads(loader.batch_size)
        return (functools.partial(step.train_steps, x, y),
                f"compiled step: on (CompiledClassifierStep, {threads} threads)")

    def _compiled_setup(self, loader):
        """(CompiledClassifierStep, x (S, D), y (S,)), or TypeError / ValueError naming what in this
        trainer or its data the compiled path does not do."""
        for what in self._gradient_readers():
            raise ValueError(what)
        for unsupported, what in (
                (self.update_in_backward, "the optimizer updates inside backward"),
                (self.precision not in ("fp32", "fp64"), f"precision is {self.precision!r}, not "
                                                         "'fp32' or 'fp64'"),
                (not self.model.training, "the model is in eval mode"),
                (self.model.input_requires_grad, "model.input_requires_grad is True")):
            if unsupported:
                raise ValueError(what)
        step = CompiledClassifierStep(self.model, self.loss_fn, self.optimizer)
        dataset = loader.dataset
        if not isinstance(dataset, ArrayDataset) or type(dataset).batch is not ArrayDataset.batch:
            raise TypeError(f"the training data is a {type(dataset).__name__} (the compiled step "
                            "reads the x and y arrays of an ArrayDataset directly)")
        dtype = step.layers[0].weight.data.dtype
        if dataset.x.ndim != 2 or dataset.x.dtype != dtype:
            raise ValueError(f"the training data's x is {dataset.x.dtype} {dataset.x.shape}; the "
                             f"compiled step takes {dtype} (samples, features) for this model")
        return step, dataset.x, dataset.y

    def _compiled_chunk(self, train_steps, loader, steps: int, watch: Stopwatch, callbacks) -> dict:
        """Up to `steps` steps in one compiled call, from the current position to at most the
        epoch's end; then the scheduler, the counters and the callbacks as the loop would leave
        them. A non-finite loss raises FloatingPointError as the loop does, after the steps before
        it were counted."""
        if self.batch_index >= len(loader):
            self.epoch += 1
            self.batch_index = 0
        first, batch_size = self.batch_index, loader.batch_size
        steps = min(steps, len(loader) - first)
        lrs = self._planned_lrs(steps) if self.scheduler is not None else None
        steps = steps if lrs is None else len(lrs)
        grad_norms = np.empty(steps, dtype=np.float64)
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, loader.order(self.epoch))  # O(samples): once an epoch
        order = self._order[1]
        losses = train_steps(order, batch_size, first_batch=first, steps=steps, lrs=lrs,
                             grad_norms=grad_norms)
        taken = len(losses) if math.isfinite(losses[-1]) else len(losses) - 1
        logged_lrs = []  # group 0's lr after each step's scheduler step, as the loop reports it
        for _ in range(taken):
            if self.scheduler is not None:
                self.scheduler.step()
            logged_lrs.append(self._lr())
        items = min((first + taken) * batch_size, order.size) - first * batch_size
        watch.add(items)
        samples_per_s = watch.rate()
        first_step = self.step
        self.step += taken
        self.samples_seen += items
        self.batch_index = first + len(losses)  # as the loop: also past the batch that failed
        metrics: dict = {}
        for i in range(taken):
            result = {"loss": float(losses[i]), "grad_norm": float(grad_norms[i]), "frozen_now": []}
            metrics = self._step_metrics(result, first_step + i + 1, logged_lrs[i], samples_per_s)
            for cb in callbacks:
                cb.on_step_end(self, metrics)
        if taken < len(losses):
            start = (first + taken) * batch_size
            window = [loader.dataset.batch(order[start:start + batch_size])]
            raise FloatingPointError(self._non_finite_message(float(losses[taken]), window))
        return metrics

    def _planned_lrs(self, steps: int) -> np.ndarray:
        """(k, groups): each param group's lr at each of the next k <= `steps` steps.

        Found by stepping the scheduler as the loop would, then restoring it and the param groups
        (the compiled call reads the groups' other settings at its start; the scheduler really
        steps after the call, once per step taken). k < `steps` when a scheduler step changes a
        group setting other than "lr" (OneCycleLR's momentum): the chunk ends with that step.
        """
        groups = self.optimizer.param_groups
        saved_scheduler, saved_groups = self.scheduler.state_dict(), [dict(g) for g in groups]
        settings = _fixed_settings(groups)
        lrs = np.empty((steps, len(groups)), dtype=np.float64)
        try:
            for i in range(steps):
                lrs[i] = [group["lr"] for group in groups]
                self.scheduler.step()
                if _fixed_settings(groups) != settings:
                    return lrs[:i + 1]
            return lrs
        finally:
            self.scheduler.load_state_dict(saved_scheduler)
            for group, saved in zip(groups, saved_groups):
                group.update(saved)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, data, batch_size: int = 512) -> dict:
        """Mean loss and accuracy over `data` (on Lookahead's slow weights where Lookahead is used)."""
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size, shuffle=False)
        swap = getattr(self.optimizer, "slow_weights_swapped", None)
        items = len(loader.dataset)
        self.model.eval()
        loss, correct = 0.0, 0
        try:
            with swap() if swap is not None else contextlib.nullcontext():
                for x, y in loader:
                    logits = self.model.forward(x)
                    loss += self.loss_fn(logits, y, normalizer=items)
                    correct += int(np.count_nonzero(np.argmax(logits, axis=-1) == y))
        finally:
            self.model.train()
        return {"eval_loss": loss, "eval_accuracy": correct / items}

    def _evaluate_and_report(self, eval_data, batch_size, callbacks) -> None:
        self.last_eval = {"step": self.step, **self.evaluate(eval_data, max(batch_size, 512))}
        for cb in callbacks:
            cb.on_eval_end(self, self.last_eval)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly: model, optimizer, schedule, scaler, counters."""
        return {
            "model": dict(self.model.state_dict(remove_duplicate=True)),  # a tied weight once
            "model_extra": {name: m.extra_state() for name, m in self.model.named_modules()
                            if m.extra_state()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "freezer": self.freezer.state_dict() if self.freezer is not None else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None
                          for cb in self.callbacks],
            "trainer": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                        "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
                        "seed": self.seed, "accumulation_steps": self.accumulation_steps,
                        "precision": self.precision, "last_eval": self.last_eval},
        }

    def load_state_dict(self, state: dict) -> None:
        counters = state["trainer"]
        for key in ("seed", "accumulation_steps", "precision"):
            if counters[key] != getattr(self, key):
                raise ValueError(f"Trainer: the checkpoint was made with {key}={counters[key]!r}, "
                                 f"this trainer has {key}={getattr(self, key)!r}")
        for part, obj in (("scheduler", self.scheduler), ("loss_scaler", self.loss_scaler),
                          ("freezer", self.freezer)):
            if (state[part] is None) != (obj is None):
                raise ValueError(f"Trainer: the checkpoint {'has' if state[part] is not None else 'has no'}"
                                 f" {part} state but this trainer {'has no' if obj is None else 'has a'} {part}")
        self.model.load_state_dict(state["model"])
        modules = dict(self.model.named_modules())
        for name, extra in state["model_extra"].items():
            modules[name].load_extra_state(extra)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        if self.freezer is not None:
            self.freezer.load_state_dict(state["freezer"])
            self.freezer.apply(self.model)
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        self.step, self.epoch = int(counters["step"]), int(counters["epoch"])
        self.batch_index = int(counters["batch_index"])
        self.skipped_steps = int(counters["skipped_steps"])
        self.samples_seen = int(counters["samples_seen"])
        self.last_eval = counters["last_eval"]
        self._batches = self._order = None

    def save(self, run_dir, *, keep_last: int = 3) -> Path:
        metric = self.last_eval["eval_loss"] if self.last_eval else None
        return checkpoint.save_checkpoint(run_dir, self.state_dict(), step=self.step,
                                          keep_last=keep_last, metric=metric, mode="min")

    def resume(self, path) -> dict:
        """Load the latest (or the given) checkpoint into this trainer; returns the checkpoint info."""
        state, info = checkpoint.load_checkpoint(path)
        self.load_state_dict(state)
        return info

    def _checkpoint(self, run_dir: Path, keep_last: int, callbacks) -> None:
        path = self.save(run_dir, keep_last=keep_last)
        self._saved_step = self.step
        for cb in callbacks:
            cb.on_checkpoint(self, path)

    @contextlib.contextmanager
    def _signals_save_and_stop(self):
        """SIGTERM and Ctrl-C finish the current step, then fit() saves a checkpoint and returns."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.interrupted = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self.interrupted = None
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _fixed_settings(groups) -> list:
    """Each param group's settings but "params" and "lr": what a compiled call reads once."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in groups]


def _describe(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", None)
    return f"{type(optimizer).__name__}({_describe(inner)})" if inner is not None \
        else type(optimizer).__name__
