"""Checkpoints: crash-safe save and validated load of training state (safetensors + JSON, no pickle).

A run directory holds its checkpoints like this::

    run_dir/checkpoints/
        latest                  "step-000300\\n": the name of the newest checkpoint
        step-000200/            one directory per checkpoint, named by the optimizer step
            tensors.safetensors every array of the state, under its dotted path
            state.json          the rest of the state as JSON, plus step, metric, versions, SHA-256
        step-000300/
        step-000300.2/          a second save of the same step (a new revision never overwrites)
        .tmp-...  .trash-...    leftovers of an interrupted save or clean-up: ignored, then removed

The state is a nested structure of dicts, lists, tuples, numbers, strings, bools, None and NumPy
arrays (`flatten_state`). Each array goes into the safetensors file under its dotted path and is
replaced in the JSON by a marker ``{"__tensor__": name, "dtype": ..., "shape": [...]}``; floats are
written exactly (Python writes the shortest repr that round-trips; nan and +-inf as
``{"__float__": "nan"}``), tuples as ``{"__tuple__": [...]}`` and dicts whose keys are not all
strings (torch's optimizer state uses int keys) as ``{"__dict__": [[key, value], ...]}``.

**Model weights are readable without npcpu.** The Trainer saves its model's state dict under the
key "model", so a checkpoint's tensors file holds the weights as ``model.0.weight``,
``model.0.bias``, ... with PyTorch's names, layouts and dtypes (bfloat16 stays bfloat16)::

    from safetensors.torch import load_file
    tensors = load_file("run/checkpoints/step-000300/tensors.safetensors")
    torch_model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                                 if k.startswith("model.")})

`export_model` writes a state dict alone, without the prefix, for `load_file` directly.

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
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import safetensors
from safetensors.numpy import save_file

from npcpu.precision import bfloat16

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT = "npcpu-checkpoint"
FORMAT_VERSION = 1

# safetensors dtype codes and the NumPy dtypes they hold (bfloat16 through ml_dtypes).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": bfloat16,
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_SUPPORTED_DTYPES = set(SAFETENSORS_DTYPES.values())
_FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), bfloat16)

_TENSOR, _FLOAT, _TUPLE, _DICT = "__tensor__", "__float__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _FLOAT, _TUPLE, _DICT)
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# "step-000123" or, for a later save of the same step, "step-000123.2"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:\.(\d+))?")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or inconsistent (the message says which)."""


# -- state tree <-> (tensors, JSON) ---------------------------------------------------------------
def flatten_state(tree) -> tuple[dict[str, np.ndarray], dict]:
    """Split a nested state into its arrays and a JSON-serializable description of the rest.

    Parameters
    ----------
    tree : dict, list, tuple, int, float, str, bool, None or ndarray, nested
        NumPy scalars become Python scalars; dict keys may be str, int, bool, float, None or tuples
        of these, and come back with their types.

    Returns
    -------
    tensors : dict[str, ndarray]
        Every array under its dotted path ("optimizer.state.3.exp_avg"), not copied.
    meta : dict
        ``{"format_version": 1, "tree": ...}``: the tree with arrays replaced by markers; it
        contains only JSON types, and `json.dumps(meta, allow_nan=False)` writes it exactly.
    """
    tensors: dict[str, np.ndarray] = {}
    return tensors, {"format_version": FORMAT_VERSION, "tree": _encode(tree, "", tensors)}


def unflatten_state(tensors: dict[str, np.ndarray], meta: dict):
    """The tree `flatten_state` took apart; raises CheckpointError if `tensors` does not match.

    Every marker must find its tensor with the recorded dtype and shape, and every tensor must be
    referenced. The arrays are returned as they are in `tensors` (not copied).
    """
    return _unflatten(tensors, meta)[0]


def _unflatten(tensors: dict[str, np.ndarray], meta) -> tuple[object, list[str]]:
    """`unflatten_state`, plus the tensor names in the order the tree refers to them."""
    if not isinstance(meta, dict) or "tree" not in meta:
        raise CheckpointError(f"state meta must be a dict with a 'tree', got {_short(meta)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"state meta has format_version {meta.get('format_version')!r}, "
                              f"this npcpu reads {FORMAT_VERSION}")
    used: list[str] = []
    tree = _decode(meta["tree"], "", tensors, used)
    referenced = set(used)
    extra = [name for name in tensors if name not in referenced]
    if extra:
        raise CheckpointError(f"{len(extra)} tensor(s) not referenced by the state, first "
                              f"{extra[0]!r}")
    return tree, used


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _short(obj, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _encode_float(x: float):
    x = float(x)
    if math.isfinite(x):
        return x
    return {_FLOAT: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _encode(obj, path: str, tensors: dict | None):
    """`obj` as JSON types; arrays go into `tensors` (None: arrays are not allowed here)."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _encode_float(obj)
    if isinstance(obj, np.ndarray):
        if tensors is None:
            raise TypeError(f"flatten_state: {path or 'the value'} must not hold an array here")
        if not path:
            raise ValueError("flatten_state: a bare array has no name; put it in a dict")
        if path in tensors:
            raise ValueError(f"flatten_state: two arrays would be stored as {path!r} (keys that "
                             "differ only by type or by dots); rename one")
        tensors[path] = obj
        return {_TENSOR: path, "dtype": obj.dtype.name, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        value = obj.item()
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"flatten_state: {path or 'the root'} is a {type(obj).__name__}, "
                            "which has no exact JSON form")
        return _encode(value, path, tensors)
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(type(k) is str and k not in _MARKERS for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        return {_DICT: [[_encode(k, _join(path, k), None), _encode(v, _join(path, k), tensors)]
                        for k, v in obj.items()]}
    raise TypeError(f"flatten_state: {path or 'the root'} is a {type(obj).__name__}; expected "
                    "dict, list, tuple, int, float, str, bool, None or numpy array")


def _decode(node, path: str, tensors: dict | None, used: list):
    """Invert `_encode`; tensor markers are looked up in `tensors` and their names added to `used`."""
    if isinstance(node, list):
        return [_decode(v, _join(path, i), tensors, used) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    markers = [m for m in _MARKERS if m in node]
    if not markers:
        return {k: _decode(v, _join(path, k), tensors, used) for k, v in node.items()}
    marker = markers[0]
    expected_keys = {_TENSOR, "dtype", "shape"} if marker == _TENSOR else {marker}
    body = node[marker]
    if set(node) != expected_keys or not (
            (marker == _TENSOR and isinstance(body, str))
            or (marker == _FLOAT and body in _NONFINITE)
            or (marker == _TUPLE and isinstance(body, list))
            or (marker == _DICT and isinstance(body, list)
                and all(isinstance(p, list) and len(p) == 2 for p in body))):
        raise CheckpointError(f"malformed {marker} marker at {path or 'the root'!r}: {_short(node)}")
    if marker == _FLOAT:
        return _NONFINITE[body]
    if marker == _TUPLE:
        return tuple(_decode(v, _join(path, i), tensors, used) for i, v in enumerate(body))
    if marker == _DICT:
        out = {}
        for key, value in body:
            key = _decode(key, path, None, used)
            try:
                hash(key)
            except TypeError:
                raise CheckpointError(f"a key under {path or 'the root'!r} is unhashable: "
                                      f"{_short(key)}") from None
            out[key] = _decode(value, _join(path, key), tensors, used)
        return out
    return _decode_tensor(node, path, tensors, used)


def _decode_tensor(node: dict, path: str, tensors: dict | None, used: list) -> np.ndarray:
    name = node[_TENSOR]
    if tensors is None:
        raise CheckpointError(f"{path!r} refers to tensor {name!r} where no arrays are allowed")
    if name not in tensors:
        raise CheckpointError(f"tensor {name!r} (at {path or 'the root'!r}) is missing from the "
                              "tensors")
    array = tensors[name]
    if array.dtype.name != node["dtype"] or list(array.shape) != node["shape"]:
        raise CheckpointError(f"tensor {name!r}: expected dtype {node['dtype']} and shape "
                              f"{tuple(node['shape'])}, found {array.dtype.name} and shape "
                              f"{array.shape}")
    used.append(name)
    return array


# -- the safetensors file ---------------------------------------------------------------------------
def _storable(name: str, array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous array of a dtype safetensors holds (TypeError otherwise)."""
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"checkpoint tensor {name!r} has dtype {array.dtype}; supported: "
                        f"{sorted(d.name for d in _SUPPORTED_DTYPES)}")
    if name == "__metadata__":
        raise ValueError("checkpoint tensor name '__metadata__' is reserved by safetensors")
    return array.astype(dtype, order="C", copy=False)  # (np.ascontiguousarray makes 0-d 1-d)


def _parse_safetensors(buffer: bytearray, where: Path) -> dict[str, np.ndarray]:
    """The arrays in a safetensors file's bytes, as writable views into `buffer`.

    Layout: 8-byte little-endian header length N, N bytes of JSON header
    ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}``, then the data;
    offsets count from the end of the header.
    """
    if len(buffer) < 8:
        raise CheckpointError(f"{where}: {len(buffer)} bytes, too short for a safetensors file")
    header_len = int.from_bytes(buffer[:8], "little")
    data_start = 8 + header_len
    if data_start > len(buffer):
        raise CheckpointError(f"{where}: header claims {header_len} bytes but the file has "
                              f"{len(buffer)} (truncated?)")
    try:
        header = json.loads(bytes(buffer[8:data_start]))
    except ValueError as err:
        raise CheckpointError(f"{where}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    data_len = len(buffer) - data_start
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: bad header entry for {name!r}: "
                                  f"{_short(entry)}") from err
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
                or end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{where}: tensor {name!r} with shape {shape} and dtype "
                                  f"{dtype.name} does not fit data_offsets [{begin}, {end}] in "
                                  f"{data_len} data bytes")
        arrays[name] = (np.frombuffer(buffer, dtype, count, data_start + begin).reshape(shape)
                        if count else np.empty(shape, dtype))
    return arrays


# -- durable file-system steps ------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable. No-op where unsupported."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_and_hash(path: Path) -> str:
    """fsync a written file and return the SHA-256 of what it holds."""
    digest = hashlib.sha256()
    with open(path, "r+b") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_quietly(path: Path) -> None:
    """Best-effort removal of a leftover file or directory (errors ignored: a later save retries)."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


# -- save ---------------------------------------------------------------------------------------------
def ensure_writable(run_dir) -> Path:
    """Check that checkpoints can be written under `run_dir`, touching nothing; returns the Path.

    Raises NotADirectoryError when `run_dir` (or its nearest existing ancestor) is a file and
    PermissionError when it cannot be written.
    """
    run_dir = Path(run_dir)
    _check_writable(run_dir / CHECKPOINTS, f"checkpoint run directory {run_dir}")
    return run_dir


def _check_writable(directory: Path, what: str) -> None:
    """Raise unless `directory` exists and is writable, or could be created where it is missing."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write to {probe}")


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
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an integer >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise ValueError(f"save_checkpoint: keep_last must be an integer >= 1 or None, "
                         f"got {keep_last!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"save_checkpoint: mode must be 'min' or 'max', got {mode!r}")
    if metric is not None and (isinstance(metric, (bool, np.bool_))
                               or not isinstance(metric, (int, float, np.integer, np.floating))):
        raise TypeError(f"save_checkpoint: metric must be a real number or None, got {metric!r}")
    step = int(step)
    metric = None if metric is None else float(metric)
    tensors, meta = flatten_state(state)
    tensors = {name: _storable(name, array) for name, array in tensors.items()}
    config = _encode(config, "config", None)

    root = ensure_writable(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = _new_checkpoint_name(root, step)
    final = root / name
    tmp = root / f".tmp-{name}-{_token()}"
    try:
        os.mkdir(tmp)
        save_file(tensors, tmp / TENSORS_FILE)
        document = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "metric": None if metric is None else _encode_float(metric), "mode": mode,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(), "tensors_file": TENSORS_FILE,
            "tensors_sha256": _fsync_and_hash(tmp / TENSORS_FILE),
            "config": config, "state": meta,
        }
        _write_durably(tmp / STATE_FILE, json.dumps(document, indent=1, allow_nan=False).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        _remove_quietly(tmp)
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
    revisions = [rev for s, rev, _ in _scan(root, complete_only=False) if s == step]
    return base if not revisions else f"{base}.{max(revisions) + 1}"


def _point_latest(root: Path, name: str) -> None:
    """Atomically make ``root/latest`` contain `name`: temporary file, fsync, rename, fsync."""
    tmp = root / f".latest-{_token()}.tmp"
    try:
        _write_durably(tmp, (name + "\n").encode())
        os.replace(tmp, root / LATEST)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(root)


def _prune(root: Path, keep_last: int | None, mode: str, newest: Path) -> None:
    """Remove checkpoints beyond the last `keep_last` and the best, and leftovers of past saves.

    Runs after the new checkpoint and ``latest`` are durable; a failure here only warns.
    """
    try:
        entries = _scan(root)
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
            os.rename(path, root / f".trash-{path.name}-{_token()}")
        if doomed:
            _fsync_dir(root)
        for leftover in root.iterdir():
            if leftover.name.startswith((".tmp-", ".trash-", ".latest-")):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    except OSError as err:
        warnings.warn(f"save_checkpoint: the new checkpoint {newest} is saved, but cleaning up "
                      f"old ones in {root} failed: {err}", RuntimeWarning, stacklevel=3)


# -- find and load ------------------------------------------------------------------------------------
def _scan(root: Path, complete_only: bool = True) -> list[tuple[int, int, Path]]:
    """(step, revision, path) of the checkpoint directories in `root`, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _CHECKPOINT_NAME.fullmatch(path.name)
            if match is None or not path.is_dir():
                continue
            if complete_only and not ((path / STATE_FILE).is_file()
                                      and (path / TENSORS_FILE).is_file()):
                continue
            found.append((int(match[1]), int(match[2] or 1), path))
    return sorted(found, key=lambda entry: entry[:2])


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoint directories of `run_dir`, oldest (lowest step) first."""
    return [path for *_, path in _scan(Path(run_dir) / CHECKPOINTS)]


def _recorded_metric(path: Path) -> tuple[float | None, str | None]:
    """(metric, mode) as recorded in a checkpoint's state.json; (None, None) if unreadable."""
    try:
        document = json.loads((path / STATE_FILE).read_bytes())
        metric = _decode(document["metric"], "metric", None, [])
        mode = document["mode"]
    except (OSError, ValueError, KeyError, TypeError):
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
    entries = _scan(Path(run_dir) / CHECKPOINTS)
    modes = [mode for *_, path in entries
             for metric, mode in [_recorded_metric(path)] if metric is not None]
    return _best(entries, modes[-1]) if modes else None


def _resolve(path: Path) -> tuple[Path, bool]:
    """The checkpoint directory `path` means, and whether ``latest`` had to be bypassed."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected a run directory or a "
                              "checkpoint directory)")
    root = path / CHECKPOINTS
    if not root.is_dir():
        if (path / STATE_FILE).exists() or _CHECKPOINT_NAME.fullmatch(path.name):
            return path, False
        raise CheckpointError(f"{path}: neither a run directory (no {CHECKPOINTS}/) nor a "
                              f"checkpoint directory (no {STATE_FILE})")
    pointer = root / LATEST
    try:
        name = pointer.read_text().strip()
        problem = None if _CHECKPOINT_NAME.fullmatch(name) else f"it holds {name!r}"
        if problem is None and not (root / name / STATE_FILE).is_file():
            problem = f"it names {name}, which is missing or incomplete"
    except (OSError, UnicodeDecodeError) as err:
        problem = f"it cannot be read ({err.__class__.__name__})"
    if problem is None:
        return root / name, False
    entries = _scan(root)
    if not entries:
        raise CheckpointError(f"{path}: no complete checkpoint in {root}")
    newest = entries[-1][2]
    warnings.warn(f"load_checkpoint: {pointer} is broken ({problem}); loading the newest complete "
                  f"checkpoint, {newest.name}", RuntimeWarning, stacklevel=3)
    return newest, True


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
    directory, fallback = _resolve(Path(path))
    state_path, tensors_path = directory / STATE_FILE, directory / TENSORS_FILE
    for file in (state_path, tensors_path):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
    try:
        document = json.loads(state_path.read_bytes(), parse_constant=_reject_constant)
    except ValueError as err:
        raise CheckpointError(f"{state_path}: not valid JSON ({err})") from err
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
    tensors = _parse_safetensors(buffer, tensors_path)
    try:
        state, order = _unflatten(tensors, document["state"])
        metric = _decode(document.get("metric"), "metric", None, [])
        config = _decode(document.get("config"), "config", None, [])
    except CheckpointError as err:
        raise CheckpointError(f"{state_path}: {err}") from err
    if check_finite:
        for name in order:
            array = tensors[name]
            if array.dtype in _FLOAT_DTYPES and not np.isfinite(array).all():
                raise CheckpointError(f"{tensors_path}: tensor {name!r} holds non-finite values "
                                      "(nan or inf)")
    info = {"path": directory, "step": document["step"], "metric": metric,
            "mode": document.get("mode"), "config": config, "versions": document.get("versions"),
            "saved_at": document.get("saved_at"), "tensors_sha256": digest, "fallback": fallback}
    return state, info


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (npcpu writes non-finite floats as markers)")


# -- model export -------------------------------------------------------------------------------------
def export_model(path, state_dict: dict, *, metadata: dict[str, str] | None = None) -> Path:
    """Write a model's state dict as one safetensors file, atomically and durably.

    The file loads into the equivalent torch module with
    ``module.load_state_dict(safetensors.torch.load_file(path))``: npcpu state dicts use
    PyTorch's keys and layouts, and bfloat16 arrays arrive as torch.bfloat16.

    Parameters
    ----------
    path : str or Path
        The file to write (replaced if it exists).
    state_dict : dict[str, ndarray]
        Flat: parameter names to arrays.
    metadata : dict[str, str], optional
        Free-text metadata for the safetensors header.
    """
    path = Path(path)
    tensors = {}
    for name, array in state_dict.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise TypeError(f"export_model: state_dict must map str to numpy arrays, got "
                            f"{type(name).__name__} -> {type(array).__name__} for {name!r}")
        tensors[name] = _storable(name, array)
    _check_writable(path.parent, f"export_model {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}-{_token()}.tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync_and_hash(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return path
