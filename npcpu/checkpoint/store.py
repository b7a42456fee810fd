"""The run-directory store: where checkpoints live, ``latest``, keeping the last k and the best.

A run directory holds its checkpoints like this::

    run_dir/checkpoints/
        latest                  "step-000300\\n": the name of the newest checkpoint
        step-000200/            one directory per checkpoint, named by the optimizer step
            tensors.safetensors every array of the state, under its dotted path
            state.json          the rest of the state as JSON, plus step, metric, versions, SHA-256
        step-000300/
        step-000300.2/          a second save of the same step (a new revision never overwrites)
        .tmp-...  .trash-...    leftovers of an interrupted save or clean-up: ignored, then removed

**Crash safety.** A save writes both files into a temporary directory inside ``checkpoints/``,
fsyncs each file and the directory, renames the directory to its final name (a name that did not
exist before), fsyncs ``checkpoints/``, then replaces ``latest`` atomically (temporary file, fsync,
``os.replace``, fsync). Only then are checkpoints beyond the last `keep_last` (and the best by
metric) removed: renamed to ``.trash-*`` first, so that no half-deleted directory ever carries a
checkpoint's name. A crash at any moment therefore leaves ``latest`` naming a complete checkpoint.
One process saves into a run directory at a time.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import safetensors

from npcpu.checks import check_int, check_real
from npcpu.checkpoint.codec import (FORMAT_VERSION, CheckpointError, decode_plain, encode_float,
                                    encode_plain, flatten_state)
from npcpu.checkpoint.durable import (check_writable, fsync_dir, remove_quietly, token,
                                      write_durably, write_safetensors)
from npcpu.checkpoint.tensors import storable

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT = "npcpu-checkpoint"
# "step-000123" or, for a later save of the same step, "step-000123.2"
CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:\.(\d+))?")


def ensure_writable(run_dir) -> Path:
    """Check that checkpoints can be written under `run_dir`, touching nothing; returns the Path.

    Raises NotADirectoryError when `run_dir` (or its nearest existing ancestor) is a file and
    PermissionError when it cannot be written.
    """
    run_dir = Path(run_dir)
    check_writable(run_dir / CHECKPOINTS, f"checkpoint run directory {run_dir}")
    return run_dir


# -- saving ----------------------------------------------------------------------------------------
def save_checkpoint(run_dir, state: dict, *, step: int, keep_last: int | None = 3,
                    metric: float | None = None, mode: str = "min", config=None) -> Path:
    """Write `state` as a new checkpoint of `run_dir`, point ``latest`` at it, prune old ones.

    Parameters
    ----------
    run_dir : str or Path
        The run directory; checkpoints go to ``run_dir/checkpoints/step-{step:06d}`` (a later
        save of the same step gets ``.2``, ``.3``, ...; an existing checkpoint is never replaced).
    state : dict
        The state, as `flatten_state` takes it. By convention the model's state dict sits under
        "model", so its tensors are named ``model.<torch key>`` in the tensors file.
    step : int
        The optimizer step, >= 0.
    keep_last : int or None
        How many of the newest checkpoints to keep (older revisions of one step do not count);
        the best one by `metric` is kept as well. None keeps every checkpoint.
    metric : float or None
        A score recorded with the checkpoint (e.g. validation loss); nan is never the best.
    mode : {"min", "max"}
        Whether a lower or a higher `metric` is better.
    config : JSON-like, optional
        The run's configuration, recorded in ``state.json`` (no arrays).

    Returns
    -------
    Path
        The new checkpoint directory, durable on disk and named by ``latest``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    step = check_int("save_checkpoint", "step", step, 0)
    if keep_last is not None:
        keep_last = check_int("save_checkpoint", "keep_last", keep_last, 1)
    if mode not in ("min", "max"):
        raise ValueError(f"save_checkpoint: mode must be 'min' or 'max', got {mode!r}")
    if metric is not None:  # nan is recorded (a diverged evaluation), and is never the best
        metric = math.nan if isinstance(metric, (float, np.floating)) and math.isnan(metric) \
            else check_real("save_checkpoint", "metric", metric, allow_inf=True)
    tensors, meta = flatten_state(state)
    tensors = {name: storable(name, array) for name, array in tensors.items()}
    config = encode_plain(config, "config")

    root = ensure_writable(run_dir) / CHECKPOINTS
    try:
        return _save(root, tensors, meta, step, keep_last, metric, mode, config)
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, f"checkpoint of step {step} not saved, the previous ones are "
                      f"intact ({err.strerror})", err.filename) from err


def _save(root: Path, tensors: dict, meta: dict, step: int, keep_last, metric, mode,
          config) -> Path:
    """save_checkpoint's file-system work (the protocol in the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    name = _new_checkpoint_name(root, step)
    final = root / name
    tmp = root / f".tmp-{name}-{token()}"
    try:
        os.mkdir(tmp)
        digest = write_safetensors(tensors, tmp / TENSORS_FILE)
        document = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "metric": None if metric is None else encode_float(metric), "mode": mode,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(), "tensors_file": TENSORS_FILE,
            "tensors_sha256": digest,
            "config": config, "state": meta,
        }
        write_durably(tmp / STATE_FILE, json.dumps(document, indent=1, allow_nan=False).encode())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        remove_quietly(tmp)
        raise
    _point_latest(root, name)
    _prune(root, keep_last, mode, newest=final)
    return final


def _versions() -> dict:
    from npcpu import __version__

    return {"npcpu": __version__, "numpy": np.__version__, "numba": numba.__version__,
            "ml_dtypes": ml_dtypes.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _new_checkpoint_name(root: Path, step: int) -> str:
    base = f"step-{step:06d}"
    revisions = [rev for s, rev, _ in scan(root, complete_only=False) if s == step]
    return base if not revisions else f"{base}.{max(revisions) + 1}"


def _point_latest(root: Path, name: str) -> None:
    """Atomically make ``root/latest`` contain `name`: temporary file, fsync, rename, fsync."""
    tmp = root / f".latest-{token()}.tmp"
    try:
        write_durably(tmp, (name + "\n").encode())
        os.replace(tmp, root / LATEST)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(root)


def _prune(root: Path, keep_last: int | None, mode: str, newest: Path) -> None:
    """Remove checkpoints beyond the last `keep_last` and the best, and leftovers of past saves.

    Runs after the new checkpoint and ``latest`` are durable; a failure here only warns.
    """
    try:
        entries = scan(root)
        keep = {newest}
        if keep_last is None:
            keep.update(path for *_, path in entries)
        else:
            newest_revision = {}
            for step, _, path in entries:
                newest_revision[step] = path
            keep.update(list(newest_revision.values())[-keep_last:])
            best = _best(entries, mode)
            if best is not None:
                keep.add(best)
        doomed = [path for *_, path in entries if path not in keep]
        for path in doomed:
            os.rename(path, root / f".trash-{path.name}-{token()}")
        if doomed:
            fsync_dir(root)
        for leftover in root.iterdir():
            if leftover.name.startswith((".tmp-", ".trash-", ".latest-")):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    except OSError as err:
        warnings.warn(f"save_checkpoint: the new checkpoint {newest} is saved, but cleaning up "
                      f"old ones in {root} failed: {err}", RuntimeWarning, stacklevel=3)


# -- finding checkpoints ---------------------------------------------------------------------------
def scan(root: Path, complete_only: bool = True) -> list[tuple[int, int, Path]]:
    """(step, revision, path) of the checkpoint directories in `root`, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if match is None or not path.is_dir():
                continue
            if complete_only and not ((path / STATE_FILE).is_file()
                                      and (path / TENSORS_FILE).is_file()):
                continue
            found.append((int(match[1]), int(match[2] or 1), path))
    return sorted(found, key=lambda entry: entry[:2])


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoint directories of `run_dir`, oldest (lowest step) first."""
    return [path for *_, path in scan(Path(run_dir) / CHECKPOINTS)]


def _recorded_metric(path: Path) -> tuple[float | None, str | None]:
    """(metric, mode) as recorded in a checkpoint's state.json; (None, None) if unreadable."""
    try:
        document = json.loads((path / STATE_FILE).read_bytes())
        metric = decode_plain(document["metric"], "metric")
        mode = document["mode"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None, None
    if isinstance(metric, bool) or not isinstance(metric, (int, float)):
        return None, mode
    return float(metric), mode


def _best(entries: list[tuple[int, int, Path]], mode: str) -> Path | None:
    """The checkpoint with the best recorded metric (the earliest among equals); nan never wins."""
    best_path, best_metric = None, None
    for *_, path in entries:
        metric, _ = _recorded_metric(path)
        if metric is None or math.isnan(metric):
            continue
        if best_metric is None or (metric < best_metric if mode == "min" else metric > best_metric):
            best_path, best_metric = path, metric
    return best_path


def best_checkpoint(run_dir) -> Path | None:
    """The checkpoint of `run_dir` with the best metric, judged by the mode the newest one recorded.

    None when no checkpoint has a metric.
    """
    entries = scan(Path(run_dir) / CHECKPOINTS)
    modes = [mode for *_, path in entries
             for metric, mode in [_recorded_metric(path)] if metric is not None]
    return _best(entries, modes[-1]) if modes else None


def resolve(path: Path) -> tuple[Path, bool]:
    """The checkpoint directory `path` means, and whether ``latest`` had to be bypassed."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected a run directory or a "
                              "checkpoint directory)")
    root = path / CHECKPOINTS
    if not root.is_dir():
        if (path / STATE_FILE).exists() or CHECKPOINT_NAME.fullmatch(path.name):
            return path, False
        raise CheckpointError(f"{path}: neither a run directory (no {CHECKPOINTS}/) nor a "
                              f"checkpoint directory (no {STATE_FILE})")
    name, problem = _read_pointer(root)
    if problem is None and not (root / name / STATE_FILE).is_file():
        problem = f"it names {name}, which is missing or incomplete"
    if problem is None:
        return root / name, False
    entries = scan(root)
    if not entries:
        raise CheckpointError(f"{path}: no complete checkpoint in {root}")
    newest = entries[-1][2]
    warnings.warn(f"load_checkpoint: {root / LATEST} is broken ({problem}); loading the newest complete "
                  f"checkpoint, {newest.name}", RuntimeWarning, stacklevel=3)
    return newest, True



def _read_pointer(root: Path) -> tuple[str | None, str | None]:
    """(the checkpoint name ``root/latest`` holds, None), or (None, what is wrong with it)."""
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"it cannot be read ({err.__class__.__name__})"
    if not CHECKPOINT_NAME.fullmatch(name):
        return None, f"it holds {name!r}"
    return name, None


def candidates(path: Path) -> list[Path]:
    """The checkpoint directories to try, in order, when resuming from `path`.

    A checkpoint directory is its own only candidate. For a run directory: the checkpoint
    ``latest`` names, then every other checkpoint directory newest first, the incomplete ones
    included (so that a checkpoint with a missing file is reported, not passed over silently).
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected a run directory or a "
                              "checkpoint directory)")
    if not (path / CHECKPOINTS).is_dir():
        return [resolve(path)[0]]
    root = path / CHECKPOINTS
    newest_first = [entry for *_, entry in reversed(scan(root, complete_only=False))]
    name, _ = _read_pointer(root)
    if name is not None and root / name in newest_first:
        newest_first.remove(root / name)
        newest_first.insert(0, root / name)
    if not newest_first:
        raise CheckpointError(f"{path}: no checkpoint in {root}")
    return newest_first
