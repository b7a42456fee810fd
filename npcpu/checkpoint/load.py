"""Loading a checkpoint, with validation of everything in it before any of it is used."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from npcpu.checks import parse_json
from npcpu.checkpoint.codec import (FORMAT_VERSION, CheckpointError, decode_plain,
                                    unflatten_with_order)
from npcpu.checkpoint.store import FORMAT, STATE_FILE, TENSORS_FILE, candidates, resolve
from npcpu.checkpoint.tensors import FLOAT_DTYPES, parse_safetensors


def load_checkpoint(path, *, check_finite: bool = True) -> tuple[dict, dict]:
    """Load and validate a checkpoint.

    Parameters
    ----------
    path : str or Path
        A run directory (the checkpoint ``latest`` names; if that pointer is missing or broken,
        the newest complete checkpoint, with a warning) or a checkpoint directory.
    check_finite : bool
        Reject floating-point tensors holding nan or inf (the error names the first one).

    Returns
    -------
    state : dict
        The saved state; arrays are writable and keep their dtypes (bfloat16 included).
    info : dict
        path, step, metric, mode, config, versions, saved_at, tensors_sha256, and fallback
        (True when ``latest`` was bypassed).

    Raises
    ------
    CheckpointError
        Naming the file and the problem: missing file, unparsable JSON, SHA-256 mismatch, a
        tensor missing, extra, or of the wrong dtype or shape, or a non-finite tensor.
    """
    directory, fallback = resolve(Path(path))
    state_path, tensors_path = directory / STATE_FILE, directory / TENSORS_FILE
    for file in (state_path, tensors_path):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
    document = parse_json(state_path.read_bytes(), str(state_path), CheckpointError,
                          parse_constant=_reject_constant)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not an npcpu checkpoint (format "
                              f"{document.get('format') if isinstance(document, dict) else None!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: format_version {document.get('format_version')!r}, "
                              f"this npcpu reads {FORMAT_VERSION}")
    missing = [k for k in ("step", "tensors_sha256", "state") if k not in document]
    if missing:
        raise CheckpointError(f"{state_path}: missing field(s) {missing}")

    with open(tensors_path, "rb") as f:
        buffer = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buffer)
    digest = hashlib.sha256(buffer).hexdigest()
    if digest != document["tensors_sha256"]:
        raise CheckpointError(f"{tensors_path}: SHA-256 mismatch (changed or truncated file): "
                              f"{STATE_FILE} records {document['tensors_sha256']}, the file has "
                              f"{digest}")
    tensors = parse_safetensors(buffer, tensors_path)
    try:
        state, order = unflatten_with_order(tensors, document["state"])
        metric = decode_plain(document.get("metric"), "metric")
        config = decode_plain(document.get("config"), "config")
    except CheckpointError as err:
        raise CheckpointError(f"{state_path}: {err}") from err
    except RecursionError:
        raise CheckpointError(f"{state_path}: state nested too deeply to read") from None
    if check_finite:
        for name in order:
            array = tensors[name]
            if array.dtype in FLOAT_DTYPES and not np.isfinite(array).all():
                raise CheckpointError(f"{tensors_path}: tensor {name!r} holds non-finite values "
                                      "(nan or inf)")
    info = {"path": directory, "step": document["step"], "metric": metric,
            "mode": document.get("mode"), "config": config, "versions": document.get("versions"),
            "saved_at": document.get("saved_at"), "tensors_sha256": digest, "fallback": fallback}
    return state, info


def load_newest_valid(path, *, check_finite: bool = True) -> tuple[dict, dict]:
    """Load the newest checkpoint of a run directory that passes every check of `load_checkpoint`.

    For resuming and evaluating: a damaged newest checkpoint (a changed, truncated or missing
    file, a broken state.json) must not stop a run that has older valid ones, and must never be
    loaded. Each checkpoint passed over is named with its error in a RuntimeWarning and in
    ``info["skipped"]``, a list of (path, error message), newest first. The order tried is
    ``latest``'s target, then the other checkpoint directories newest first; a checkpoint
    directory given directly is the only one tried.

    Raises
    ------
    CheckpointError
        When no checkpoint is valid; the message lists each one tried with what was wrong.
    """
    skipped = []
    for directory in candidates(Path(path)):
        try:
            state, info = load_checkpoint(directory, check_finite=check_finite)
        except CheckpointError as err:
            skipped.append((directory, str(err)))
            continue
        for bad, error in skipped:
            warnings.warn(f"load_newest_valid: skipped the damaged checkpoint {bad.name}: {error}",
                          RuntimeWarning, stacklevel=2)
        info["skipped"] = skipped
        info["fallback"] = bool(skipped)
        return state, info
    listing = "\n".join(f"  {bad.name}: {error}" for bad, error in skipped)
    raise CheckpointError(f"{path}: no valid checkpoint; tried, newest first:\n{listing}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (npcpu writes non-finite floats as markers)")
