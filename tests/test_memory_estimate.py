"""The pre-run memory estimate (npcpu.train.memory): printed in the header, close to the measured
peak, and a run that cannot fit is refused with what would fit."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npcpu.cli import main
from npcpu.config import build_config
from npcpu.nn import work
from npcpu.train import memory
from npcpu.train.build import build_run
from statecheck import assert_same_state

SCRIPT = Path(__file__).resolve().parent / "measure_memory.py"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# the estimate of what fit() adds (gradients, optimizer states, activations) is within this
# factor of the measured growth of the resident set, either way
FACTOR = 1.5

TINY = {"model": {"hidden": [64, 32], "dropout": 0.1},
        "data": {"train_size": 512, "eval_size": 64, "input_dim": 32, "num_classes": 4},
        "train": {"epochs": None, "max_steps": 3, "batch_size": 64, "accumulation_steps": 1,
                  "precision": "fp32", "eval_every": None, "checkpoint_every": None,
                  "clip_grad_norm": None},
        "freeze": {"enabled": False}}


def tiny_run(**train):
    config = build_config(overrides={**TINY, "train": {**TINY["train"], **train}})
    run = build_run(config, log_stream=io.StringIO())
    return run


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
@pytest.mark.parametrize("system", ["mlp", "gpt"])
def test_estimate_is_within_a_factor_of_the_measured_peak(system):
    # a fixed mmap threshold: freed arrays go back to the kernel, so the resident set measures them
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, str(SCRIPT), system], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    estimated = found["gradients"] + found["optimizer"] + found["activations"]
    measured = found["added_at_peak"]
    print(f"\n{system}: estimated {estimated / 2**20:.1f} MiB added by fit, measured "
          f"{measured / 2**20:.1f} MiB (ratio {estimated / measured:.2f})")
    assert measured / FACTOR <= estimated <= measured * FACTOR


def test_the_estimate_is_in_the_header_and_changes_nothing(monkeypatch):
    run = tiny_run()
    work.reset()
    run.fit(None, progress=False)
    log = run.trainer.log_stream.getvalue()
    assert "memory estimate:" in log and "activations" in log and "micro-batches of 64" in log
    counts = dict(work.counts)

    monkeypatch.setattr(memory, "activation_bytes", lambda model, x: 0)  # no probe forward
    reference = tiny_run()
    work.reset()
    reference.fit(None, progress=False)
    assert dict(work.counts) == counts  # the probe's GEMMs are not counted as the run's
    # the probe leaves the weights and the dropout streams alone
    assert_same_state(run.trainer.state_dict(), reference.trainer.state_dict())


def test_a_wrapped_forward_does_not_let_the_probe_move_the_model(monkeypatch):
    """The probe's copy keeps a wrapper put on the model instance, which calls the original
    model: the dropout streams it advances there are put back."""
    def wrapped(run):
        original = run.trainer.model.forward
        run.trainer.model.forward = lambda x: original(x)
        return run

    run = wrapped(tiny_run())
    run.fit(None, progress=False)
    monkeypatch.setattr(memory, "activation_bytes", lambda model, x: 0)  # no probe forward
    reference = wrapped(tiny_run())
    reference.fit(None, progress=False)
    assert_same_state(run.trainer.state_dict(), reference.trainer.state_dict())


def test_estimate_scales_with_the_batch_and_counts_the_optimizer():
    small, large = tiny_run(), tiny_run(batch_size=256)
    a = memory.estimate_memory(small.trainer, small.trainer.make_loader(small.train_data, 64))
    b = memory.estimate_memory(large.trainer, large.trainer.make_loader(large.train_data, 256))
    assert a.parameters == b.parameters == sum(p.data.nbytes for p in small.trainer.model.parameters())
    assert a.gradients == a.parameters  # fp32 parameters, fp32 gradients
    assert a.optimizer >= 2 * a.parameters  # AdamW's two moments, plus Lookahead's slow weights
    assert b.activations == pytest.approx(4 * a.activations, rel=0.01)
    assert b.with_batch(64).activations == pytest.approx(a.activations, rel=0.01)
    config = build_config(overrides={**TINY, "train": {**TINY["train"], "update_in_backward": True},
                                     "optim": {"name": "adamw", "lookahead": False}})
    fused = build_run(config, log_stream=io.StringIO())
    c = memory.estimate_memory(fused.trainer, fused.trainer.make_loader(fused.train_data, 64))
    assert c.gradients == max(p.data.nbytes for p in fused.trainer.model.parameters())
    assert c.activations == a.activations


def test_a_run_that_cannot_fit_is_refused_with_what_would_fit(tmp_path, monkeypatch):
    run = tiny_run(batch_size=256)
    estimate = memory.estimate_memory(run.trainer, run.trainer.make_loader(run.train_data, 256))
    available = estimate.total - estimate.activations // 2  # half the batch would fit
    monkeypatch.setattr(memory, "available_memory", lambda: available)
    with pytest.raises(memory.InsufficientMemoryError) as error:
        run.fit(tmp_path / "run", progress=False)
    message = str(error.value)
    assert "does not fit in memory" in message and "memory estimate" in message
    assert "micro-batches of at most" in message and "precision bf16" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written
    rows = int(message.split("micro-batches of at most ")[1].split()[0])
    assert 64 <= rows < 256
    memory.check_fits(estimate.with_batch(rows), available)  # the advice fits
    with pytest.raises(memory.InsufficientMemoryError):
        memory.check_fits(estimate.with_batch(rows + 2), available)


def test_nothing_fits_says_so(monkeypatch):
    run = tiny_run()
    estimate = memory.estimate_memory(run.trainer, run.trainer.make_loader(run.train_data, 64))
    with pytest.raises(memory.InsufficientMemoryError, match="use a smaller model"):
        memory.check_fits(estimate, estimate.parameters // 4)
    memory.check_fits(estimate, None)  # unknown available memory: not checked


def test_memory_check_false_runs_anyway(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    run = tiny_run(memory_check=False)
    run.fit(None, progress=False)
    assert run.trainer.step == 3


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir",
                 str(tmp_path / "run"), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("npcpu train: error: the run does not fit in memory")


def test_available_memory_reads_meminfo_then_sysconf(monkeypatch):
    found = memory.available_memory()
    assert found is None or found > 0
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 10,
                                                     "SC_PAGE_SIZE": 4096}[name])
    assert memory.available_memory() == 40960


class FakeWorld:
    size = 4


class FakeTrainer:
    world = FakeWorld()


def test_ranks_on_this_machine(monkeypatch):
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert memory.ranks_on_this_machine(object()) == 1
    assert memory.ranks_on_this_machine(FakeTrainer()) == 4
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert memory.ranks_on_this_machine(FakeTrainer()) == 2
    estimate = memory.MemoryEstimate(1 << 20, 1 << 20, 2 << 20, 4 << 20, 8, ranks=2)
    assert "per rank" in estimate.describe() and estimate.machine_total == 16 << 20


def test_the_probe_batch_is_the_first_one_and_starts_no_thread(monkeypatch):
    """A DataLoader's first micro-batch is made on the calling thread (its prefetch thread is
    never started for it), and is the batch iteration serves first."""
    import threading
    run = tiny_run()
    loader = run.trainer.make_loader(run.train_data, 64)
    started, start = [], threading.Thread.start

    def recorded_start(thread):
        started.append(thread.name)
        start(thread)
    monkeypatch.setattr(threading.Thread, "start", recorded_start)
    x = memory.first_micro_batch(loader)
    assert started == []
    monkeypatch.undo()
    np.testing.assert_array_equal(x, next(loader.iter_from(0, 0))[0])
