"""Data-parallel runs under mpiexec, compared with one process (npcpu.dist).

Each test starts `mpiexec -n N python -m npcpu train ...` as a subprocess on a tiny MLP, ranks
oversubscribed on this machine with one thread each. Without mpi4py or mpiexec the tests skip
and say why, unless NPCPU_REQUIRE_MPI=1 (the `mpiexec` fixture of conftest.py).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npcpu.checkpoint import load_checkpoint

# a tiny run with every feature of the default system that touches the gradients: dropout,
# accumulation over 2 micro-batches, clipping, LAMB inside Lookahead, a warmup-cosine schedule,
# sharded evaluation every 3 steps, checkpoints every 3 steps
TINY = ["--model.hidden", "16,9", "--model.dropout", "0.2", "--data.train_size", "330",
        "--data.eval_size", "1100", "--data.input_dim", "12", "--train.batch_size", "30",
        "--train.accumulation_steps", "2", "--train.max_steps", "6", "--train.eval_every", "3",
        "--train.checkpoint_every", "3", "--train.threads", "1", "--train.log_every", "1",
        "--progress", "lines"]
DETERMINISTIC = ["--dist.deterministic", "true", "--dist.parts", "6", "--train.precision", "bf16"]
FP32 = ["--train.precision", "fp32"]
SECONDS = 120  # a hung run fails the test instead of hanging it


def train(mpiexec, ranks: int, run_dir: Path, *options, resume=False, check=True, wrapper=None):
    """Run `npcpu train` on `ranks` processes (1: no launcher); returns the CompletedProcess."""
    where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    program = [sys.executable, *(["-c", wrapper] if wrapper else ["-m", "npcpu"]), "train",
               *where, *options]
    command = program if ranks == 1 else [mpiexec, "-n", str(ranks), *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_state(run_dir: Path) -> dict:
    state, _ = load_checkpoint(run_dir)
    return state


def metrics(run_dir: Path) -> list[str]:
    """The metrics file's lines without the timing."""
    import json
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("samples_per_s", None)
    return lines


def test_two_and_three_ranks_equal_one_process_to_float32_rounding(mpiexec, tmp_path):
    """fp32, batch 31 split unevenly (16/15, 11/10/10; the last batch of an epoch, 20 samples,
    10/10 and 7/6/7)."""
    for batch in ("31",):
        options = [*TINY, *FP32, "--train.batch_size", batch]
        train(mpiexec, 1, tmp_path / f"one-{batch}", *options)
        one = final_state(tmp_path / f"one-{batch}")
        one_metrics = metrics(tmp_path / f"one-{batch}")
        for ranks in (2, 3):
            run_dir = tmp_path / f"{ranks}-{batch}"
            train(mpiexec, ranks, run_dir, *options)
            state = final_state(run_dir)
            assert state["trainer"]["step"] == one["trainer"]["step"] == 6
            assert state["trainer"]["samples_seen"] == one["trainer"]["samples_seen"]
            for name, value in one["model"].items():
                np.testing.assert_allclose(state["model"][name], value, rtol=2e-5, atol=2e-6,
                                           err_msg=f"{ranks} ranks, batch {batch}: {name}")
            mine = metrics(run_dir)
            assert [m["step"] for m in mine] == [m["step"] for m in one_metrics]
            for got, want in zip(mine, one_metrics):
                for key, value in want.items():
                    if isinstance(value, float):
                        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ranks, key)
                    else:
                        assert got[key] == value, (ranks, key)


def compare_runs(tmp_path, mpiexec, ranks: int, *options) -> None:
    """1 process and `ranks` ranks with `options`: parameters to float32 rounding, same metrics."""
    train(mpiexec, 1, tmp_path / "one", *options)
    train(mpiexec, ranks, tmp_path / "many", *options)
    one, many = final_state(tmp_path / "one"), final_state(tmp_path / "many")
    for key, value in one["trainer"].items():
        assert key == "last_eval" or many["trainer"][key] == value, key
    assert many["freezer"]["frozen_at"] == one["freezer"]["frozen_at"]
    for name, value in one["model"].items():
        np.testing.assert_allclose(many["model"][name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    for got, want in zip(metrics(tmp_path / "many"), metrics(tmp_path / "one"), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-4, abs=1e-6)
                                if isinstance(value, float) else value), key


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_small_buckets_with_and_without_overlap_and_frozen_layers(mpiexec, tmp_path, overlap):
    """1 KB buckets (several per model, reduced by MPI as backward finishes them, or after it),
    and a freezer that freezes layers during the run (frozen parameters take no part in a
    bucket)."""
    freezing = ["--freeze.threshold", "1e9", "--freeze.patience", "1", "--freeze.window", "1",
                "--freeze.start_step", "3"]
    compare_runs(tmp_path, mpiexec, 3, *TINY, *FP32, "--dist.bucket_mb", "0.001",
                 "--dist.overlap", overlap, "--dist.shared_memory", "false", *freezing)
    assert any(line.get("frozen_layers") for line in metrics(tmp_path / "many"))


def test_deterministic_mode_is_bitwise_the_same_for_one_two_and_three_ranks(mpiexec, tmp_path):
    """bf16 storage with stochastic rounding, dropout: every parameter, every metric, bit for bit."""
    runs = {}
    for ranks in (1, 2, 3):
        train(mpiexec, ranks, tmp_path / str(ranks), *TINY, *DETERMINISTIC)
        runs[ranks] = (final_state(tmp_path / str(ranks)), metrics(tmp_path / str(ranks)))
    one_state, one_metrics = runs[1]
    for ranks in (2, 3):
        state, mine = runs[ranks]
        for name, value in one_state["model"].items():
            np.testing.assert_array_equal(state["model"][name].view(np.uint16),
                                          value.view(np.uint16), err_msg=f"{ranks} ranks: {name}")
        assert mine == one_metrics


def test_a_run_resumes_on_a_different_number_of_ranks(mpiexec, tmp_path):
    """Run 1 process to step 6; give its step-3 checkpoint to 3 ranks, and a 3-rank run's step-3
    checkpoint to 2 ranks: both finish bitwise at the 1-process run's step 6."""
    train(mpiexec, 1, tmp_path / "one", *TINY, *DETERMINISTIC)
    want = final_state(tmp_path / "one")["model"]
    train(mpiexec, 3, tmp_path / "three", *TINY, *DETERMINISTIC)
    for source, ranks in (("one", 3), ("three", 2)):
        resumed = tmp_path / f"{source}-on-{ranks}"
        shutil.copytree(tmp_path / source, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step-000006")
        (resumed / "checkpoints" / "latest").write_text("step-000003\n")
        done = train(mpiexec, ranks, resumed, resume=True)
        assert "resumed from" in done.stderr and "(step 3)" in done.stderr
        got = final_state(resumed)
        assert got["trainer"]["step"] == 6
        for name, value in want.items():
            np.testing.assert_array_equal(got["model"][name].view(np.uint16),
                                          value.view(np.uint16), err_msg=f"{source} on {ranks}: {name}")


# rank 1 writes its process id where the test finds it, then trains as `npcpu train` does
RECORD_PID = """
import os, sys
from pathlib import Path
run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / f"pid-{os.environ.get('PMI_RANK', '0')}").write_text(str(os.getpid()))
from npcpu.cli import main
sys.exit(main(sys.argv[1:]))
"""

# rank 1 fails at its 5th step: FAILURE is "raise" (an exception) or "hang" (sleeps for ever)
FAIL_ON_RANK_1 = """
import os, sys, time
from npcpu.dist.trainer import DataParallelRunner
if os.environ.get("PMI_RANK") == "1":
    plain, calls = DataParallelRunner.forward_backward, []
    def failing(self, window):
        calls.append(1)
        if len(calls) == 5 and FAILURE == "raise":
            raise RuntimeError("a failure planted by the test")
        if len(calls) == 5:
            time.sleep(1000)
        return plain(self, window)
    DataParallelRunner.forward_backward = failing
from npcpu.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A run that cannot end before a test stops it: its steps take milliseconds, so it must not end
# at the default 4 epochs either (test_limits_of_a_long_run_cost_nothing_when_it_starts checks
# that such limits cost nothing).
LONG = ["--train.max_steps", "100000000", "--train.epochs", "100000000",
        "--train.checkpoint_every", "2", "--train.eval_every", "none", "--dist.timeout", "20"]


def test_limits_of_a_long_run_cost_nothing_when_it_starts(tmp_path):
    """The run the signal tests start, in this process, stopped after 3 steps: the learning-rate
    schedule is evaluated once per step taken (not tabulated over the planned steps), and no
    allocation is as large as one byte per planned step."""
    import tracemalloc

    from npcpu.cli import _overrides, make_parser
    from npcpu.config import build_config
    from npcpu.train.build import build_run
    from npcpu.train.callbacks import Callback

    class StopAfter3(Callback):
        def on_step_end(self, trainer, metrics):
            trainer.stop_training = trainer.step >= 3

    args = make_parser().parse_args(["train", *TINY, *FP32, *LONG])
    run = build_run(build_config(overrides=_overrides(args)), callbacks=[StopAfter3()])
    assert run.total_steps == 100000000
    scheduler, calls = run.trainer.scheduler, []

    def counted(schedule):
        return lambda step: calls.append(step) or schedule(step)

    scheduler.lr_lambdas = [counted(schedule) for schedule in scheduler.lr_lambdas]
    tracemalloc.start()
    try:
        run.fit(tmp_path / "run", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.trainer.step == 3
    assert sorted(set(calls)) == [1, 2, 3]
    assert len(calls) == 3 * len(scheduler.lr_lambdas)
    assert peak < run.total_steps


def checkpointed_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in `run_dir` now (older ones are pruned as the run goes on)."""
    names = [p.name for p in (run_dir / "checkpoints").glob("step-*")]
    return [int(name[len("step-"):]) for name in names if name[len("step-"):].isdigit()]


def signal_rank_1(mpiexec, run_dir: Path, signum: int) -> subprocess.Popen:
    """A long 3-rank run, whose rank 1 gets `signum` once a checkpoint of step 4 or later exists
    (each is pruned a few steps after it is written, so the test cannot wait for one in
    particular); returns the finished job (stderr read) after checking it ended within 60 s of the
    signal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    command = [mpiexec, "-n", "3", sys.executable, "-c", RECORD_PID, "train", "--run-dir",
               str(run_dir), *TINY, *FP32, *LONG]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=env)
    try:
        deadline = time.monotonic() + SECONDS
        while max(checkpointed_steps(run_dir), default=0) < 4:
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        os.kill(int((run_dir / "pid-1").read_text()), signum)
        signalled_at = time.monotonic()
        job.errors = job.communicate(timeout=60)[1]
        assert time.monotonic() - signalled_at < 60
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return job


def test_a_killed_rank_ends_the_run_and_the_last_checkpoint_loads(mpiexec, tmp_path):
    job = signal_rank_1(mpiexec, tmp_path / "run", signal.SIGKILL)
    assert job.returncode != 0
    state, info = load_checkpoint(tmp_path / "run")
    assert info["step"] >= 4 and info["step"] % 2 == 0
    assert state["trainer"]["step"] == info["step"]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(mpiexec,
                                                                                 tmp_path):
    """The ranks agree on the step to stop after (else the others would wait for rank 1)."""
    job = signal_rank_1(mpiexec, tmp_path / "run", signal.SIGTERM)
    assert job.returncode != 0
    state, info = load_checkpoint(tmp_path / "run")
    assert f"stopped by a signal to another rank at step {info['step']}" in job.errors
    assert state["trainer"]["step"] == info["step"] > 4


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_rank_that_raises_or_hangs_ends_every_rank_with_an_error(mpiexec, tmp_path, failure):
    """Raising: rank 1 names itself and aborts the job. Hanging: the others time out (after
    dist.timeout, 3 s here) naming the reduction they waited for and rank 1, the one that did not
    time out with them, and abort the job. The raising
    case gets a long timeout: on a loaded machine the other ranks could otherwise time out waiting
    for rank 1 before it reaches its planted failure, and the job would end with their message."""
    started = time.monotonic()
    timeout = "3" if failure == "hang" else "30"
    done = train(mpiexec, 3, tmp_path / "run", *TINY, *FP32, *LONG, "--dist.timeout", timeout,
                 wrapper=f"FAILURE = {failure!r}\n" + FAIL_ON_RANK_1, check=False)
    assert time.monotonic() - started < SECONDS
    assert done.returncode != 0
    if failure == "raise":
        assert "rank 1 of 3" in done.stderr and "a failure planted by the test" in done.stderr
    else:
        assert "did not complete within 3 s" in done.stderr
        assert "rank(s) [1] did not time out too" in done.stderr  # named by ranks 0 and 2
    _, info = load_checkpoint(tmp_path / "run")
    assert info["step"] == 4  # rank 1 failed in step 5
