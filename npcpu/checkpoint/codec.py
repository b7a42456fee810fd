"""The state-tree codec: a nested training state <-> (its arrays by dotted path, JSON for the rest).

The state is a nested structure of dicts, lists, tuples, numbers, strings, bools, None and NumPy
arrays. Each array is taken out under its dotted path and replaced in the JSON by a marker
``{"__tensor__": name, "dtype": ..., "shape": [...]}``; floats are written exactly (Python writes
the shortest repr that round-trips; nan and +-inf as ``{"__float__": "nan"}``), tuples as
``{"__tuple__": [...]}`` and dicts whose keys are not all strings (torch's optimizer state uses
int keys) as ``{"__dict__": [[key, value], ...]}``.
"""

from __future__ import annotations

import math

import numpy as np

FORMAT_VERSION = 1

_TENSOR, _FLOAT, _TUPLE, _DICT = "__tensor__", "__float__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _FLOAT, _TUPLE, _DICT)
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


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
    return unflatten_with_order(tensors, meta)[0]


def unflatten_with_order(tensors: dict[str, np.ndarray], meta) -> tuple[object, list[str]]:
    """`unflatten_state`, plus the tensor names in the order the tree refers to them."""
    if not isinstance(meta, dict) or "tree" not in meta:
        raise CheckpointError(f"state meta must be a dict with a 'tree', got {short(meta)}")
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


def short(obj, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def encode_float(x: float):
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
        return encode_float(obj)
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
        raise CheckpointError(f"malformed {marker} marker at {path or 'the root'!r}: {short(node)}")
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
                                      f"{short(key)}") from None
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



def encode_plain(obj, path: str):
    """`obj` (no arrays) as JSON types, exactly (a run's config, a metric)."""
    return _encode(obj, path, None)


def decode_plain(node, path: str):
    """Invert `encode_plain`; CheckpointError for a malformed marker or an array marker."""
    return _decode(node, path, None, [])
