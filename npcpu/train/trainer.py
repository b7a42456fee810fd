"""The training loop: epochs, evaluation, checkpoints, callbacks, signals, early stop.

`Trainer.fit` runs its optimizer steps through a step runner (npcpu.train.runners: the
interface, and the reference step; npcpu.train.runner_compiled: the compiled one). The
reference step processes a window of `accumulation_steps` micro-batches:

    for each micro-batch (x, y) of the window:
        logits = model.forward(x)
        loss   = loss_fn(logits, y, normalizer=N)   # N = items in the whole window: mean over it
        model.backward(scaler.scale(loss_fn.backward()))   # gradients add up in float32
    found_inf = scaler.unscale_(optimizer)          # unscaled, finished sums from here on
    grad_norm = clip_grad_norm(params, max_norm)    # pre-clip norm
    freezer.observe(model, step)                    # windowed per-layer gradient norms
    if not found_inf: optimizer.step()              # a skipped step moves no counter
    scaler.update(); optimizer.zero_grad()

and the loop then steps the scheduler (after a step taken) and the counters. Because every
micro-batch's loss is divided by the size of the whole window (a short last window by its real
size), k micro-batches give the same gradient as one batch of k times the size.

With `update_in_backward=True` the optimizer updates each parameter inside model.backward
(Optimizer.fuse_into_backward) and the whole-model gradients are never held: the step then
checks the loss before backward (a non-finite loss still leaves the parameters unchanged), has no
gradient norm to report, and calls no optimizer.step(). It excludes accumulation, loss scaling,
clipping and freezing, which all read the finished gradients.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

from npcpu import checkpoint
from npcpu.checks import check_int, check_real
from npcpu.data.loader import DataLoader
from npcpu.optim.protocol import TrainerOptimizer
from npcpu.optim.scaling import DynamicLossScaler
from npcpu.precision import check_precision
from npcpu.train import memory
from npcpu.train.callbacks import Callback, MetricsFile, Progress, Stopwatch, stop_on_signals
from npcpu.train.evaluation import Evaluation
from npcpu.train.runner_compiled import CompiledRunner
from npcpu.train.runners import ReferenceRunner, StepResult, StepRunner
from npcpu.train.state import load_trainer_state, trainer_state

COMPILED_MODES = ("auto", "on", "off")


class Trainer(Evaluation):
    """Train `model` on `loss_fn` with `optimizer`.

    fit() is one loop over a step runner (npcpu.train.runners): it asks the runner for steps,
    counts each (scheduler, counters, metrics, on_step_end), and between calls evaluates,
    checkpoints, and stops on early stop, SIGTERM or Ctrl-C. `make_runner(loader, log_every)`
    chooses the runner: the compiled one where it applies (see `compiled`), else the reference
    one. A trainer for another kind of step (a language model's, data-parallel) overrides
    `make_runner` to return its own runner, or one that wraps ReferenceRunner; fit() stays as it is.

    Parameters
    ----------
    model : Module
        Its `set_precision(precision)` is called here; build the optimizer on its parameters before
        or after, either works (Parameters keep their identity).
    loss_fn : Loss
        `loss_fn(logits, y, normalizer=N) -> float`, `loss_fn.backward() -> dL/dlogits`;
        `loss_fn.evaluation_sums(logits, y)` gives the metrics `evaluate` reports besides the loss.
    optimizer : Optimizer or Lookahead
        Anything with the methods of npcpu.optim.protocol.TrainerOptimizer.
    scheduler : LR scheduler, optional
        Stepped once per optimizer step that was taken.
    accumulation_steps : int
        Micro-batches per optimizer step.
    precision : {"fp32", "bf16", "fp16"}
        Storage of parameters and saved activations (docs/DESIGN.md, "Precision"). "fp16" turns on
        a DynamicLossScaler unless one is given.
    loss_scaler : DynamicLossScaler, optional
    clip_grad_norm : float, optional
        Clip the total gradient 2-norm to this value after unscaling.
    freezer : DynamicFreezer, optional
    callbacks : sequence of Callback
    seed : int
        Seeds the data order (shuffling is a pure function of (seed, epoch)).
    compiled : {"auto", "on", "off"}
        The compiled runner (npcpu.train.runner_compiled): "auto" takes it when it applies, "on"
        makes fit() raise ValueError saying why when it does not, "off" never takes it. fit() logs
        which it runs ("compiled step: on (...)" or "compiled step: off (reason)"). On the compiled
        path the on_step_end calls of a chunk come after the whole chunk ran: the model, the
        optimizer and the trainer's counters are then at the chunk's end, and metrics["step"]
        names the step the metrics are of. A callback that sets stop_training there stops training
        at the end of the chunk, and SIGTERM / Ctrl-C finish the chunk, not only the step.
    update_in_backward : bool
        Update each parameter inside backward, as soon as its gradient is complete, and never hold
        the whole model's gradients (module docstring; the metrics' grad_norm is then None). Taken
        as True when the optimizer's fuse_into_backward() was already called.
    memory_check : bool
        fit() logs an estimate of the run's peak memory (npcpu.train.memory) and, with this,
        raises InsufficientMemoryError, saying what would fit, when it exceeds the available memory.
    on_nonfinite : {"stop", "skip"}
        Without a loss scaler, a non-finite loss or gradient raises FloatingPointError naming the
        step and the first layer whose gradient is non-finite ("stop"), or is logged with the same
        words and its optimizer step skipped, counted in the metrics' skipped_steps ("skip").
    """

    def __init__(self, model, loss_fn, optimizer, *, scheduler=None, accumulation_steps: int = 1,
                 precision: str = "fp32", loss_scaler=None, clip_grad_norm: float | None = None,
                 freezer=None, callbacks=(), seed: int = 0, compiled: str = "auto",
                 update_in_backward: bool = False, memory_check: bool = True,
                 on_nonfinite: str = "stop", log_stream=None):
        accumulation_steps = check_int("Trainer", "accumulation_steps", accumulation_steps, 1)
        if compiled not in COMPILED_MODES:
            raise ValueError(f"Trainer: compiled must be one of {COMPILED_MODES}, got {compiled!r}")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"Trainer: on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        check_precision(precision)
        if clip_grad_norm is not None:
            clip_grad_norm = check_real("Trainer", "clip_grad_norm", clip_grad_norm, low=0.0,
                                        low_open=True)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"Trainer: callbacks must be Callback instances, got {type(cb).__name__}")
        if not isinstance(optimizer, TrainerOptimizer):
            raise TypeError(f"Trainer: optimizer must be an npcpu Optimizer or Lookahead (the "
                            f"methods of TrainerOptimizer), got {type(optimizer).__name__}")
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
        self.memory_check = bool(memory_check)
        self.on_nonfinite = on_nonfinite
        self.log_stream = log_stream or sys.stderr
        self.update_in_backward = bool(update_in_backward) or optimizer.fused_into_backward
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
        self._saved_step = None  # the step of the last checkpoint this trainer wrote
        # False in the data-parallel processes other than rank 0 (npcpu.dist): they write no
        # metrics file and no checkpoint
        self.writes_files = True

    def _fuse_optimizer_into_backward(self) -> None:
        for what in self.gradient_readers():
            raise ValueError(f"Trainer: update_in_backward cannot be combined with this: {what} "
                             "(it needs the finished gradients, which are never held whole)")
        if not self.optimizer.fused_into_backward:
            self.optimizer.fuse_into_backward()

    def gradient_readers(self) -> list[str]:
        """What this trainer does between backward and the optimizer step, each as the reason the
        compiled path and updates inside backward give for not applying (empty: nothing)."""
        return [what for active, what in (
            (self.accumulation_steps != 1, f"accumulation_steps is {self.accumulation_steps}, not 1"),
            (self.loss_scaler is not None, "a loss scaler is set (precision 'fp16' sets one)"),
            (self.clip_grad_norm is not None, f"clip_grad_norm is {self.clip_grad_norm}"),
            (self.freezer is not None, "a freezer is set"),
            (self.on_nonfinite == "skip", "non-finite steps are skipped (on_nonfinite='skip')"))
            if active]

    # -- logging --------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.write(message)
        else:
            print(message, file=self.log_stream, flush=True)

    def header(self) -> str:
        """Versions, BLAS and threading, precision and model size: the first lines of every run."""
        from npcpu.info import run_header
        return run_header(self.precision, self.model.num_parameters(), self.accumulation_steps,
                          self.optimizer.describe()
                          + (" (updates inside backward)" if self.update_in_backward else ""))

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, train_data, *, epochs: int | None = None, max_steps: int | None = None,
            batch_size: int = 128, eval_data=None, eval_every: int | None = None,
            run_dir=None, checkpoint_every: int | None = None, keep_last: int = 3,
            log_every: int = 10, progress: bool | None = None) -> dict:
        """Train until `epochs` epochs or `max_steps` optimizer steps (whichever comes first).

        `train_data` is a dataset (batched with `batch_size` micro-batches, shuffled by
        (seed, epoch)) or a DataLoader. Evaluates every `eval_every` steps and at the end when
        `eval_data` is given; checkpoints to `run_dir` every `checkpoint_every` steps, at the end,
        and on SIGTERM / Ctrl-C. Resumes where `resume()` left the counters; a run already at its
        limits (a finished run resumed with the same epochs / max_steps) logs that it is complete
        and changes nothing: no step, evaluation, checkpoint or metrics line.

        Returns the last metrics (including the final evaluation when there is eval data).
        """
        if epochs is None and max_steps is None:
            raise ValueError("Trainer.fit: give epochs or max_steps")
        for name, value in (("epochs", epochs), ("max_steps", max_steps), ("eval_every", eval_every),
                            ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
            if value is not None:
                check_int("Trainer.fit", name, value, 1)
        loader = self.make_loader(train_data, batch_size)
        windows_per_epoch = math.ceil(len(loader) / self.accumulation_steps)
        total = max_steps if max_steps is not None else None
        if epochs is not None:
            by_epochs = epochs * windows_per_epoch
            total = by_epochs if total is None else min(total, by_epochs)
        if self.step >= total:
            self.log(f"the run is complete: it is at step {self.step} and its limits (epochs "
                     f"{epochs}, max_steps {max_steps}) end it at step {total}; nothing to do "
                     "(raise epochs or max_steps to train further)")
            return dict(self.last_eval or {})

        estimate = memory.estimate_memory(self, loader)
        if self.memory_check:
            memory.check_fits(estimate, memory.available_memory())
        runner = self.make_runner(loader, log_every)
        run_dir = Path(run_dir) if run_dir is not None else None
        if run_dir is not None and self.writes_files:
            checkpoint.ensure_writable(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)  # the metrics file goes there from the start
        callbacks = list(self.callbacks)
        if run_dir is not None and self.writes_files:
            callbacks.append(MetricsFile(run_dir, log_every))
        self._progress = Progress(total, log_every, self.log_stream, use_bar=progress)
        callbacks.append(self._progress)
        self.log(self.header())
        self.log(estimate.describe())
        self.log(runner.note)
        # where the loop acts on the model between steps: a runner's call ends at each multiple
        # of these (logging only reads the metrics, so it waits for the call's end)
        intervals = [n for n, used in ((eval_every, eval_data is not None),
                                       (checkpoint_every, run_dir is not None)) if n and used]

        metrics: dict = {}
        self.stop_training = False
        with stop_on_signals(self):
            for cb in callbacks:
                cb.on_fit_start(self)
            watch = Stopwatch()
            try:
                while self.step < total and not self.stop_training and self.interrupted is None:
                    limit = min([total - self.step, runner.preferred_steps()]
                                + [n - self.step % n for n in intervals])
                    metrics = self._run_steps(runner, limit, watch, callbacks) or metrics
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
                runner.close()
        if self.interrupted is not None:
            self.log(f"stopped by {self.interrupted} at step {self.step}"
                     + (f"; checkpoint saved in {run_dir}" if run_dir is not None else ""))
        return {**metrics, **(self.last_eval or {})}

    def make_loader(self, train_data, batch_size: int):
        """fit()'s micro-batches: `train_data` itself when it is a DataLoader, else a DataLoader
        over it shuffled by (seed, epoch). A trainer whose data is addressed otherwise (a
        language model's, by (seed, step)) overrides this."""
        if isinstance(train_data, DataLoader):
            return train_data
        return DataLoader(train_data, batch_size, shuffle=True, seed=self.seed)

    def make_runner(self, loader: DataLoader, log_every: int) -> StepRunner:
        """The step runner of one fit() (npcpu.train.runners): CompiledRunner where `compiled`
        allows it and it applies, else ReferenceRunner, whose `note` says why not."""
        if self.compiled == "off":
            reason = "compiled='off'"
        else:
            try:
                return CompiledRunner(self, loader, log_every)
            except (TypeError, ValueError) as error:
                if self.compiled == "on":
                    raise ValueError(f"Trainer: compiled='on' but the compiled step does not "
                                     f"apply: {error}") from None
                reason = error
        return ReferenceRunner(self, loader, note=f"compiled step: off ({reason})")

    def _run_steps(self, runner: StepRunner, limit: int, watch: Stopwatch, callbacks) -> dict:
        """Up to `limit` steps of `runner`, each counted as it comes; then their on_step_end
        calls. Returns the last step's metrics ({} when none was run). A FloatingPointError of the
        runner is raised after the steps before it were counted and called back."""
        done, failure = [], None
        try:
            for result in runner.steps(limit):
                self._count_step(result)
                done.append((result, self._step_metrics(result)))
        except FloatingPointError as error:
            failure = error
        watch.add(sum(result.items for result, _ in done))
        samples_per_s = watch.rate()
        for result, metrics in done:
            metrics["samples_per_s"] = samples_per_s
            for name in result.frozen_now:
                self.log(f"step {metrics['step']}: froze layer {name}")
            for cb in callbacks:
                cb.on_step_end(self, metrics)
        if failure is not None:
            raise failure
        return done[-1][1] if done else {}

    def _count_step(self, result: StepResult) -> None:
        """Step the scheduler (after a step taken) and the counters."""
        if result.skipped:
            self.skipped_steps += 1
        elif self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.samples_seen += result.items

    def _step_metrics(self, result: StepResult) -> dict:
        """on_step_end's metrics of the step just counted (samples_per_s filled in by the caller)."""
        metrics = {
            "step": self.step, "epoch": self.epoch, "loss": result.loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]), "samples_per_s": None,
            "grad_norm": result.grad_norm, "skipped_steps": self.skipped_steps,
            "frozen_layers": sorted(self.freezer.frozen_at) if self.freezer else [],
        }
        if self.loss_scaler is not None:
            metrics["loss_scale"] = float(self.loss_scaler.scale)
        if result.frozen_now:
            metrics["frozen_now"] = result.frozen_now
        metrics.update(result.extra)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly (npcpu.train.state)."""
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()`, after checking it was made with this trainer's settings."""
        load_trainer_state(self, state)

    def save(self, run_dir, *, keep_last: int = 3) -> Path:
        metric = self.last_eval["eval_loss"] if self.last_eval else None
        return checkpoint.save_checkpoint(run_dir, self.state_dict(), step=self.step,
                                          keep_last=keep_last, metric=metric, mode="min")

    def resume(self, path) -> dict:
        """Load the newest valid checkpoint of a run directory (or the given checkpoint) into this
        trainer; returns the checkpoint info. Damaged newer checkpoints are skipped, each named
        with its error in the log (and in info["skipped"]); none valid is a CheckpointError."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # logged below instead
            state, info = checkpoint.load_newest_valid(path)
        for skipped, error in info["skipped"]:
            self.log(f"resume: skipped the damaged checkpoint {skipped.name}: {error}")
        self.load_state_dict(state)
        return info

    def _checkpoint(self, run_dir: Path, keep_last: int, callbacks) -> Path:
        path = self.save(run_dir, keep_last=keep_last)
        self._saved_step = self.step
        for cb in callbacks:
            cb.on_checkpoint(self, path)
        return path
