"""Callbacks: code that runs at named points of `Trainer.fit`.

Hooks, in the order they fire:

    on_fit_start(trainer)                 once, after resuming and before the first step
    on_step_end(trainer, metrics)         after every optimizer step (taken or skipped)
    on_eval_end(trainer, metrics)         after every evaluation
    on_checkpoint(trainer, path)          after a checkpoint is durable on disk
    on_fit_end(trainer)                   once, also when fit ends by early stop or signal

`metrics` is a dict of plain numbers and strings (see `Trainer.fit`). A callback stops training by
setting `trainer.stop_training = True`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from npcpu.checkpoint.durable import remove_quietly, token, write_durably
from npcpu.checks import check_int, check_real


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_eval_end(self, trainer, metrics: dict) -> None:
        pass

    def on_checkpoint(self, trainer, path: Path) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when an evaluation metric has not improved for `patience` evaluations.

    `monitor` is a key of the evaluation metrics ("eval_loss", "eval_accuracy"); `mode` "min" or
    "max"; an improvement must beat the best value by more than `min_delta`.
    """

    def __init__(self, monitor: str = "eval_loss", mode: str = "min", patience: int = 5,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.patience = check_int("EarlyStopping", "patience", patience, 1)
        self.min_delta = check_real("EarlyStopping", "min_delta", min_delta, low=0.0)
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evals = 0

    def on_eval_end(self, trainer, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"EarlyStopping: metric {self.monitor!r} not among {sorted(metrics)}")
        value = metrics[self.monitor]
        improved = (value < self.best - self.min_delta) if self.mode == "min" \
            else (value > self.best + self.min_delta)
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                trainer.log(f"early stopping: {self.monitor} has not improved for "
                            f"{self.patience} evaluations (best {self.best:.6g})")
                trainer.stop_training = True

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = float(state["best"]), int(state["bad_evals"])


class MetricsFile(Callback):
    """Append one flushed JSON line per logged step to `run_dir/metrics.jsonl`; export CSV at the end.

    Evaluations go to the same file with `"kind": "eval"`. On resume the file is cut back to the
    checkpoint's step, so the file always tells one consistent history. The file never holds
    half a line: each line is written whole, and a write that fails (disk full, I/O error) is
    cut back to the last newline before the OSError, naming the file, stops the run; the cut
    on resume replaces the file atomically.
    """

    def __init__(self, run_dir: Path, log_every: int = 10):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_every = log_every
        self._file = None

    def on_fit_start(self, trainer) -> None:
        kept, cut = [], False
        if self.path.exists():
            text = self.path.read_text()
            cut = text != "" and not text.endswith("\n")  # a last line that lost its newline
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    cut = True
                    break  # a line cut by a crash: everything after it is gone too
                if record.get("step", 0) <= trainer.step:
                    kept.append(line)
                else:
                    cut = True
        if cut or not self.path.exists():
            tmp = self.path.with_name(f".{self.path.name}-{token()}.tmp")
            try:
                write_durably(tmp, "".join(line + "\n" for line in kept).encode())
                os.replace(tmp, self.path)
            except BaseException:
                remove_quietly(tmp)
                raise
        self._file = open(self.path, "ab", buffering=0)

    def _write(self, record: dict) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        end = self._file.seek(0, os.SEEK_END)
        try:
            while line:  # an unbuffered write may write part of the line
                line = line[self._file.write(line):]
        except OSError as err:
            with contextlib.suppress(OSError):  # the reader on resume also drops a half line
                self._file.truncate(end)
            raise OSError(err.errno, f"metrics line not written ({err.strerror})",
                          str(self.path)) from err

    def on_step_end(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.log_every == 0 or metrics.get("frozen_now"):
            self._write({"kind": "train", **metrics})

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self._write({"kind": "eval", **metrics})

    def on_fit_end(self, trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            export_csv(self.path, self.path.with_suffix(".csv"))


def export_csv(jsonl_path: Path, csv_path: Path) -> None:
    """Write the JSON-lines metrics as a CSV table (one column per key seen)."""
    records = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line]
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                             for k, v in record.items()})


class Progress(Callback):
    """A tqdm bar (loss, lr, samples/s) on a terminal; plain periodic lines otherwise."""

    def __init__(self, total_steps: int | None, log_every: int = 10, stream=None,
                 use_bar: bool | None = None):
        self.total_steps = total_steps
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.use_bar = self.stream.isatty() if use_bar is None else use_bar
        self._bar = None
        self._last_line = 0.0

    def on_fit_start(self, trainer) -> None:
        if self.use_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=trainer.step, unit="step",
                             file=self.stream, dynamic_ncols=True)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if metrics["step"] % self.log_every == 0:
                self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.3g}",
                                      samples_s=f"{metrics['samples_per_s']:.0f}")
        elif metrics["step"] % self.log_every == 0:
            total = f"/{self.total_steps}" if self.total_steps else ""
            print(f"step {metrics['step']}{total}  epoch {metrics['epoch']}  "
                  f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.4g}  "
                  + (f"{metrics['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in metrics
                     else f"{metrics['samples_per_s']:.0f} samples/s"),
                  file=self.stream, flush=True)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.write(f"eval @ step {metrics['step']}: " + "  ".join(
            f"{name[len('eval_'):]} {value:.4f}" for name, value in metrics.items()
            if name.startswith("eval_")))

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def on_fit_end(self, trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Stopwatch:
    """Samples per second over the steps since the last reading."""

    def __init__(self):
        self._t0 = time.perf_counter()
        self._samples = 0

    def add(self, samples: int) -> None:
        self._samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._samples / max(now - self._t0, 1e-9)
        self._t0, self._samples = now, 0
        return rate


@contextlib.contextmanager
def stop_on_signals(trainer):
    """Within the block, SIGTERM and Ctrl-C set `trainer.interrupted` (the signal's name) instead of
    stopping the process: the trainer finishes its current step, saves a checkpoint and returns.
    Signal handlers can only be set from the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer.interrupted = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer.interrupted = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
