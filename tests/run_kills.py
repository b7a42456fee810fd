"""SIGKILL anywhere: kill training runs at seeded random moments and resume them (not collected).

    python tests/run_kills.py {mlp,lm} WORK_DIR [--kills 20] [--seed 0]

The runs are those of tests/run_training.py (CONFIG, or LM_CONFIG for "lm"). This process imports
npcpu once and runs every training process as a fork of itself: each is a real process, killed
by a real SIGKILL from inside (a timer thread, or a hook at a named point), without paying the
interpreter start and the imports again. The parent itself never trains, so it starts no thread
pool that a fork would copy half-initialised.

First one uninterrupted reference run, timed, counting its file-system calls in the run
directory. Then trials, each in its own directory: a fresh run killed at one moment, drawn
(seeded) from one of these kinds

    time    a timer fires after a uniform fraction of the reference run's duration
    file    before the n-th file-system call (mkdir, rename, replace, fsync, unlink, rmdir) in the
            run directory: inside a checkpoint write, the `latest` update, a pruning, or the
            metrics file's rewrite
    step    after the n-th optimizer update, before the trainer counts the step
    eval    inside an evaluation, at the n-th forward pass with the model in eval mode (Lookahead's
            slow weights swapped in)

then (in some trials) a resume killed while it resumes (after the checkpoint is loaded into the
trainer, or at the first file-system call of the resumed run: the metrics file's cut), then a
resume that runs to the end. A run killed before its first checkpoint starts afresh in the same
directory, as a user would. After every kill a forked checker loads every checkpoint directory
left behind (`load_checkpoint`) and the run directory as a resume does (`load_newest_valid`:
no checkpoint may be skipped as damaged; its warnings are kept: a kill between a checkpoint's
rename and the `latest` update leaves `latest` missing or one behind, which is no damage).

Writes WORK_DIR/report.json: the reference duration and file-call count, and per trial its
kills ({"kind", "at", "killed": bool, "checkpoints", "errors"}), its final run directory and
the exit status of its last process. tests/test_kill_anywhere.py asserts on it.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from npcpu import backend
from npcpu.checkpoint import list_checkpoints, load_checkpoint, load_newest_valid
from npcpu.checkpoint.store import CHECKPOINTS, scan
from npcpu.config import build_config
from npcpu.train.build import build_run
from run_training import CONFIG, LM_CONFIG

FILE_CALLS = ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir")
FIRST_KILLS = ("time",) * 6 + ("file",) * 5 + ("step",) * 3 + ("eval",) * 2
# the phase of the run each of the five file-call kills strikes in
FILE_PHASES = ("checkpoint write", "checkpoint write", "pointing latest", "pruning", "run start")


def phases(calls: list) -> list:
    """The phase of each of a run's file-system calls (count_file_calls' names, in order): the
    run start (the metrics file), a checkpoint write (the directory, its files, the rename),
    pointing `latest` at it, pruning the old ones."""
    phase, found = "run start", []
    for call in calls:
        if call.startswith(("mkdir(checkpoints)", "mkdir(.tmp-step")):
            phase = "checkpoint write"
        elif call.startswith("replace(.latest"):
            phase = "pointing latest"
        elif call.startswith("rename(step-"):
            phase = "pruning"
        found.append(phase)
    return found


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def file_name(target) -> str:
    """The name of a path, or of the file an open descriptor refers to."""
    if isinstance(target, int):
        try:
            target = os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            return "fd"
    return Path(target).name


def count_file_calls(run_dir: Path, kill_at: int | None) -> list:
    """Wrap os's file-system calls: note those on a path in `run_dir` (or on an open file or
    relative to an open directory, as fsync and shutil.rmtree call them), and SIGKILL this
    process before the `kill_at`-th. Returns the list of the calls noted, as "name(file)"."""
    calls, prefix = [], str(run_dir)
    for name in FILE_CALLS:
        original = getattr(os, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            target = args[0] if args else None
            if (isinstance(target, (str, Path)) and str(target).startswith(prefix)) \
                    or "dir_fd" in kwargs or isinstance(target, int):
                calls.append(f"{_name}({file_name(target)})")
                if len(calls) == kill_at:
                    die()
            return _original(*args, **kwargs)

        setattr(os, name, wrapper)
    return calls


def kill_after_call(owner, name: str, kill_at: int, when=lambda *args: True) -> None:
    """Replace owner.name by a wrapper that SIGKILLs after the `kill_at`-th call for which
    `when(*args)` holds."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args):
            calls[0] += 1
            if calls[0] == kill_at:
                die()
        return result

    setattr(owner, name, wrapper)


def train(system: str, run_dir: Path, kill: dict | None, stats_path: Path | None) -> None:
    """One training process (the body of a fork): resume when the run has a checkpoint, train
    to the end, SIGKILLed where `kill` says."""
    backend.set_threads(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    kind, at = (kill["kind"], kill["at"]) if kill else (None, None)
    file_calls = count_file_calls(run_dir, at if kind in ("file", "resume-file") else None)
    config = build_config(overrides=LM_CONFIG if system == "lm" else CONFIG)
    run = build_run(config)
    trainer = run.trainer
    if kind == "time":
        threading.Timer(at, die).start()
    elif kind == "step":
        kill_after_call(trainer.optimizer, "step", at)
    elif kind == "eval":  # on the class: a wrapper on the instance would be copied with it
        model = trainer.model
        kill_after_call(type(model), "forward", at,
                        when=lambda *args: args[0] is model and not model.training)
    elif kind == "resume-load":
        kill_after_call(trainer, "load_state_dict", 1)
    if list_checkpoints(run_dir):
        trainer.resume(run_dir)
    run.fit(run_dir, progress=False)
    if stats_path is not None:
        stats_path.write_text(json.dumps({"file_calls": file_calls}))


def fork(body, log: Path) -> int:
    """Run body() in a forked child with its output in `log`; its wait status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            body()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def check_checkpoints(run_dir: Path, result: Path) -> None:
    """(The body of a forked checker.) Load every checkpoint directory of the run and the run
    directory itself; write their names, any errors and the last step in the metrics file to
    `result`."""
    names, errors, last_step = [], [], 0
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            last_step = max(last_step, json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass  # a line cut by the kill: the resume drops it
    for _, _, path in scan(run_dir / CHECKPOINTS, complete_only=False):
        names.append(path.name)
        try:
            load_checkpoint(path)
        except Exception as err:
            errors.append(f"{path.name}: {err}")
    notes = []
    if names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _, info = load_newest_valid(run_dir)
                errors += [f"skipped {path.name}: {error}" for path, error in info["skipped"]]
            except Exception as err:
                errors.append(f"run directory: {err}")
        notes = [str(warning.message) for warning in caught]
    result.write_text(json.dumps({"checkpoints": names, "errors": errors, "warnings": notes,
                                  "logged_step": last_step}))


def status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def trial(system: str, work: Path, index: int, kills: list) -> dict:
    """A fresh run killed where kills[0] says, resumed (and killed again where the rest say),
    then resumed to the end. A timer that did not fire before the run ended (a machine faster
    than during the reference run, whose kernels may have been compiling, on a loaded machine) is
    tried again from a fresh run at half its time, down to 1/128 of it."""
    run_dir, log = work / f"trial-{index:02d}", work / f"trial-{index:02d}.log"
    done = []
    for kill in kills:
        for _ in range(8):
            if not done:
                shutil.rmtree(run_dir, ignore_errors=True)
            status = fork(lambda: train(system, run_dir, kill, None), log)
            if status_text(status) == "SIGKILL" or kill["kind"] != "time" or done:
                break
            kill = {**kill, "at": round(kill["at"] / 2, 3)}
        record = {**kill, "killed": status_text(status) == "SIGKILL", "status": status_text(status)}
        checked = work / "checked.json"
        fork(lambda: check_checkpoints(run_dir, checked), log)
        record.update(json.loads(checked.read_text()))
        done.append(record)
        if not record["killed"]:
            break
    status = fork(lambda: train(system, run_dir, None, None), log)
    return {"run_dir": str(run_dir), "kills": done, "final_status": status_text(status)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=("mlp", "lm"))
    parser.add_argument("work_dir")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, ("mlp", "lm").index(args.system)])

    reference, stats = work / "reference", work / "reference-stats.json"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.perf_counter()
    status = fork(lambda: train(args.system, reference, None, stats), work / "reference.log")
    duration = time.perf_counter() - start
    if status != 0:
        sys.exit(f"the reference run failed ({status_text(status)}): see {work / 'reference.log'}")
    file_calls = json.loads(stats.read_text())["file_calls"]  # the reference run's, in order
    call_phases = phases(file_calls)
    schedule = (LM_CONFIG if args.system == "lm" else CONFIG)["train"]
    max_steps, evaluations = schedule["max_steps"], schedule["max_steps"] // schedule["eval_every"]

    def draw(kind: str) -> dict:
        at = {"time": lambda: round(float(rng.uniform(0.02, 0.85)) * duration, 3),
              "file": lambda: 1 + int(rng.choice(
                  [i for i, phase in enumerate(call_phases) if phase == FILE_PHASES[file_kills]])),
              # after the first checkpoint, so that a resume can follow
              "step": lambda: int(rng.integers(schedule["checkpoint_every"] + 1, max_steps + 1)),
              "eval": lambda: int(rng.integers(1, evaluations + 1)),
              "resume-load": lambda: 1,
              "resume-file": lambda: 1}[kind]()
        if kind != "file":
            return {"kind": kind, "at": at}
        return {"kind": kind, "at": at, "where": file_calls[at - 1], "phase": call_phases[at - 1]}

    # the trials whose first kill comes after the first checkpoint (steps drawn so, the first
    # evaluation after it) get a second kill while they resume, up to args.kills kills in all
    after_checkpoint = [i for i, kind in enumerate(FIRST_KILLS) if kind in ("step", "eval")]
    second = max(0, min(args.kills - len(FIRST_KILLS), len(after_checkpoint)))
    trials_with_second = set(rng.choice(after_checkpoint, second, replace=False).tolist())
    trials, file_kills = [], 0
    for index, kind in enumerate(FIRST_KILLS[:args.kills]):
        kills = [draw(kind)]
        file_kills += kind == "file"
        if index in trials_with_second:
            kills.append(draw(("resume-load", "resume-file")[int(rng.integers(2))]))
        trials.append(trial(args.system, work, index, kills))
    report = {"system": args.system, "reference": str(reference), "duration_s": duration,
              "file_calls": file_calls, "trials": trials}
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
