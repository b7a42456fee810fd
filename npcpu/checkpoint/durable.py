"""Durable file writes: create, fsync, rename, fsync the directory; and the checks before them.

Every file npcpu publishes (a checkpoint's two files, the ``latest`` pointer, an exported model)
is written under a temporary name, flushed to disk, and only then renamed to its final name, so
a crash at any moment leaves either the old file or the complete new one. All writes of the
checkpoint package go through here.

**Errors name the file.** A failed write, fsync or close (ENOSPC, EIO) raises OSError with its
errno and the file's path; the callers remove the temporary file and leave every published file
as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def naming(path: Path):
    """Re-raise an OSError that carries an errno but no file name (a failed write, fsync or
    close) with `path` as its file name, so that the error says which file failed."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable. No-op where unsupported."""
    if os.name == "nt":
        return
    with naming(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk."""
    with naming(path), open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_and_hash(path: Path) -> str:
    """fsync a written file and return the SHA-256 of what it holds."""
    digest = hashlib.sha256()
    with naming(path), open(path, "r+b") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_quietly(path: Path) -> None:
    """Best-effort removal of a leftover file or directory (errors ignored: a later save retries)."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


def token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"



def check_writable(directory: Path, what: str) -> None:
    """Raise unless `directory` exists and is writable, or could be created where it is missing."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write to {probe}")



def write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> str:
    """Create `path` as a safetensors file holding `tensors` (C-contiguous arrays of the dtypes
    `SAFETENSORS_DTYPES` names), fsync it, and return the SHA-256 of what it holds.

    npcpu writes the format itself, array by array, because the safetensors library's
    `save_file` returns without an error when the disk is full (its buffered writer drops the
    error): a checkpoint would then be recorded as saved while its file is short, and pruning
    would delete the valid older ones. Layout: 8-byte little-endian header length, the JSON
    header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a
    multiple of 8 bytes, then each array's bytes, back to back in header order.
    """
    from npcpu.checkpoint.tensors import safetensors_code

    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, array in tensors.items():
        header[name] = {"dtype": safetensors_code(name, array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with naming(path), open(path, "xb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for array in tensors.values():
            if array.size:
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        f.flush()
    return fsync_and_hash(path)
