"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed matches an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npcpu.checkpoint import list_checkpoints, load_checkpoint
from statecheck import assert_same_state

SCRIPT = Path(__file__).resolve().parent / "run_training.py"


def run(run_dir, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), *extra], capture_output=True,
                          text=True, timeout=300)


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, min_step, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        steps = [int(p.name.split("-")[1].split(".")[0]) for p in list_checkpoints(run_dir)] \
            if (run_dir / "checkpoints").exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {timeout} s")


def train_history(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["frozen_layers"]) for r in lines if r["kind"] == "train"]


def final_state(run_dir):
    state, info = load_checkpoint(run_dir)
    assert state["trainer"]["step"] == 40
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one(uninterrupted, tmp_path, how):
    run_dir = tmp_path / "run"
    process = start(run_dir, "--sleep", "0.1")
    wait_for_checkpoint(run_dir, 12, process)
    process.send_signal(getattr(signal, how))
    out, err = process.communicate(timeout=60)
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, err
        assert "stopped by SIGTERM" in err
        # SIGTERM saves a checkpoint at the step it stopped on
        interrupted_at = load_checkpoint(run_dir)[0]["trainer"]["step"]
        assert any(line for line in train_history(run_dir) if line[0] == interrupted_at)
    resumed = run(run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train_history(run_dir) == train_history(uninterrupted)
    assert_same_state(final_state(run_dir), final_state(uninterrupted))


def test_freezing_happened_in_the_resume_run(uninterrupted):
    """The configuration must exercise freezing, or the resume test would not cover it."""
    assert train_history(uninterrupted)[-1][3], "no layer froze: tune run_training.CONFIG"
