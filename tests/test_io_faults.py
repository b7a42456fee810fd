"""Disk full and I/O errors while writing a checkpoint or a metrics line.

ENOSPC and EIO are injected at each file-system call of a checkpoint save in turn (mkdir, open,
each write, fsync, close, rename, replace), a failing write writing part of its bytes first as a
full disk does. Each must end in an OSError naming the file and the errno (or, in the clean-up
after the new checkpoint is published, a warning; Path.mkdir(exist_ok=True) of the existing
checkpoints/ tolerates its failure), with the newest checkpoint loadable, no
checkpoint damaged or lost, and no leftover mistaken for a checkpoint. Metrics lines are written
whole: a failing write never leaves half a line.
"""

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from npcpu.checkpoint import durable, list_checkpoints, load_checkpoint, load_newest_valid
from npcpu.checkpoint import save_checkpoint
from npcpu.train.callbacks import MetricsFile

ERRNOS = (errno.ENOSPC, errno.EIO)


class InjectedFault:
    """Raise OSError(`code`) at the `k`-th file-system call of a save (one fault; the calls after
    it succeed, as on a disk that frees space or recovers). A failing write writes half of its
    bytes first."""

    def __init__(self, monkeypatch, k: int, code: int):
        self.k, self.code, self.calls, self.fired = k, code, 0, None
        for name in ("mkdir", "rename", "replace", "fsync", "open", "close"):
            monkeypatch.setattr(os, name, self.wrap(name, getattr(os, name)))
        monkeypatch.setattr(durable, "open", self.wrap_open(open), raising=False)

    def due(self, name: str) -> bool:
        self.calls += 1
        if self.calls == self.k:
            self.fired = name
            return True
        return False

    def fail(self, *filename):
        raise OSError(self.code, os.strerror(self.code), *filename)

    def wrap(self, name, function):
        def faulty(*args, **kwargs):
            if self.due(name):
                # os.open, mkdir, rename and replace name their path; fsync and close do not
                self.fail(*([str(args[0])] if name in ("mkdir", "rename", "replace", "open")
                            else []))
            return function(*args, **kwargs)
        return faulty

    def wrap_open(self, real_open):
        def faulty_open(path, mode="r", *args, **kwargs):
            if self.due("open"):
                self.fail(str(path))
            return FaultyFile(real_open(path, mode, *args, **kwargs), self)
        return faulty_open


class FaultyFile:
    """A file whose write (partly written first) or flush may fail."""

    def __init__(self, file, fault: InjectedFault):
        self.file, self.fault = file, fault

    def write(self, data):
        if self.fault.due("write"):
            data = memoryview(data).cast("B")
            self.file.write(data[:len(data) // 2])
            self.file.flush()
            self.fault.fail()
        return self.file.write(data)

    def flush(self):
        if self.fault.due("flush"):
            self.fault.fail()
        return self.file.flush()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"model": {"w": rng.standard_normal((5, 3)).astype(np.float32)}, "step": step}


def inject_into_checkpoint_saves(tmp_path, monkeypatch) -> dict:
    """Every call index x every errno; returns the counts the README's table reports."""
    base = tmp_path / "base"
    for step in (1, 2):
        save_checkpoint(base, state(step), step=step, keep_last=2)
    counts = {"injected": 0, "clear errors": 0, "warnings": 0, "tolerated": 0, "crashes": 0,
              "data lost": 0}
    for code in ERRNOS:
        k = 0
        while True:
            k += 1
            run = tmp_path / f"run-{code}-{k}"
            shutil.copytree(base, run)
            with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fault = InjectedFault(patch, k, code)
                try:
                    save_checkpoint(run, state(3), step=3, keep_last=2)
                    error = None
                except Exception as err:  # judged below: only a clear OSError is acceptable
                    error = err
            if fault.fired is None:
                break
            counts["injected"] += 1
            if error is None:  # a warning from the clean-up, or a failure the call tolerates
                warned = any("cleaning up" in str(w.message) for w in caught)
                counts["warnings" if warned else "tolerated"] += 1
            elif (type(error) is OSError and error.errno == code and error.filename
                    and os.strerror(code) in str(error) and "step 3 not saved" in str(error)):
                counts["clear errors"] += 1
            else:
                counts["crashes"] += 1
                print(f"call {k} ({fault.fired}): {error!r}")
            # `latest` names a valid checkpoint: strict load, no fallback, no warning
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loaded, info = load_checkpoint(run)
                newest, newest_info = load_newest_valid(run)
            step = info["step"]
            names = [p.name for p in list_checkpoints(run)]
            lost = (step not in ((2, 3) if error is not None else (3,))
                    or newest_info["skipped"] or newest_info["step"] != step
                    or not np.array_equal(loaded["model"]["w"], state(step)["model"]["w"])
                    or "step-000002" not in names
                    or any(load_checkpoint(run / "checkpoints" / name)[1]["step"] != int(name[5:])
                           for name in names))
            counts["data lost"] += bool(lost)
            # a later save cleans up: only real checkpoints and `latest` are left
            save_checkpoint(run, state(4), step=4, keep_last=1)
            assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-000004"]
            shutil.rmtree(run)
    return counts


def test_disk_full_or_io_error_at_each_call_of_a_checkpoint_save(tmp_path, monkeypatch):
    counts = inject_into_checkpoint_saves(tmp_path, monkeypatch)
    print(f"checkpoint save faults: {counts}")
    assert counts["injected"] > 2 * 20  # every call: mkdir, opens, writes, fsyncs, closes, renames
    assert counts["crashes"] == 0 and counts["data lost"] == 0
    assert counts["clear errors"] > counts["warnings"] + counts["tolerated"]


# -- metrics.jsonl ------------------------------------------------------------------------------------
class Trainer:
    step = 0


class FailingMetricsFile:
    """The metrics file's raw file: the `k`-th write writes part of its bytes, then fails."""

    def __init__(self, file, k: int, code: int, truncate_fails: bool = False):
        self.file, self.k, self.code, self.writes = file, k, code, 0
        self.truncate_fails = truncate_fails

    def write(self, data):
        self.writes += 1
        if self.writes == self.k:
            self.file.write(data[:len(data) // 3])
            raise OSError(self.code, os.strerror(self.code))
        return self.file.write(data[:7])  # a short write: the caller writes the rest

    def truncate(self, size):
        if self.truncate_fails:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.file.truncate(size)

    def __getattr__(self, name):
        return getattr(self.file, name)


def whole_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "half a line"
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("code", ERRNOS)
def test_a_failed_metrics_write_leaves_no_half_line(tmp_path, code):
    injected = 0
    for k in range(1, 30):
        metrics = MetricsFile(tmp_path / f"run{k}", log_every=1)
        metrics.path.parent.mkdir()
        metrics.on_fit_start(Trainer())
        metrics._file = FailingMetricsFile(metrics._file, k, code)
        written = 0
        with pytest.raises(OSError) as raised:
            for step in range(1, 10):
                metrics.on_step_end(Trainer(), {"step": step, "loss": step / 7, "pad": "x" * 40})
                written += 1
        injected += 1
        assert raised.value.errno == code and raised.value.filename == str(metrics.path)
        assert os.strerror(code) in str(raised.value)
        assert [r["step"] for r in whole_lines(metrics.path)] == list(range(1, written + 1))
        metrics._file.close()
        if written == 9 - 1:
            break
    print(f"metrics write faults ({errno.errorcode[code]}): {injected} injected, {injected} clear "
          "errors, 0 half lines")
    assert injected > 5


def test_a_half_line_left_by_a_failed_cut_is_dropped_on_resume(tmp_path):
    metrics = MetricsFile(tmp_path, log_every=1)
    metrics.on_fit_start(Trainer())
    metrics.on_step_end(Trainer(), {"step": 1, "loss": 0.5})
    metrics._file = FailingMetricsFile(metrics._file, 1, errno.ENOSPC, truncate_fails=True)
    with pytest.raises(OSError, match="No space left"):
        metrics.on_step_end(Trainer(), {"step": 2, "loss": 0.25})
    metrics._file.close()
    assert not metrics.path.read_text().endswith("\n")  # the cut failed too
    resumed = Trainer()
    resumed.step = 5
    MetricsFile(tmp_path).on_fit_start(resumed)
    assert [r["step"] for r in whole_lines(metrics.path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_cli_run_stops_on_a_full_disk_and_resumes_from_the_previous_checkpoint(tmp_path, capsys,
                                                                             monkeypatch):
    from npcpu.cli import main

    examples = Path(__file__).resolve().parent.parent / "examples"
    run_dir = tmp_path / "run"

    def disk_full_at_step_20(path, mode="r", *args, **kwargs):
        if "w" in mode or "x" in mode:
            if ".tmp-step-000020" in str(path) and str(path).endswith("tensors.safetensors"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(durable, "open", disk_full_at_step_20, raising=False)
        assert main(["train", "--config", str(examples / "tiny.toml"), "--run-dir", str(run_dir),
                     "--threads", "1", "--progress", "lines"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in error and "step 20 not saved" in error
    assert "tensors.safetensors" in error and "[Errno 28]" in error
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000010"]
    assert not any(".tmp-" in p.name for p in (run_dir / "checkpoints").iterdir())
    assert max(r["step"] for r in whole_lines(run_dir / "metrics.jsonl")) == 20

    assert main(["train", "--resume", str(run_dir), "--progress", "lines"]) == 0
    assert "step-000010 (step 10)" in capsys.readouterr().err
    assert load_checkpoint(run_dir)[1]["step"] == 32
    steps = [r["step"] for r in whole_lines(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30
