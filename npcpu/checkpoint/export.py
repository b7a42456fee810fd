"""Exporting a model's state dict as one safetensors file that torch loads directly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from npcpu.checkpoint.durable import (check_writable, fsync_dir, remove_quietly, token,
                                      write_safetensors)
from npcpu.checkpoint.tensors import storable


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
        tensors[name] = storable(name, array)
    check_writable(path.parent, f"export_model {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}-{token()}.tmp"
    try:
        write_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path
