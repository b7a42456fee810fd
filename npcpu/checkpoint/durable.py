"""Durable file writes: create, fsync, rename, fsync the directory; and the checks before them.

Every file npcpu publishes (a checkpoint's two files, the ``latest`` pointer, an exported model)
is written under a temporary name, flushed to disk, and only then renamed to its final name, so
a crash at any moment leaves either the old file or the complete new one. All writes of the
checkpoint package go through here.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from safetensors.numpy import save_file


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable. No-op where unsupported."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_and_hash(path: Path) -> str:
    """fsync a written file and return the SHA-256 of what it holds."""
    digest = hashlib.sha256()
    with open(path, "r+b") as f:
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
    """Write `tensors` as a safetensors file at `path` (through the safetensors library), fsync
    it, and return the SHA-256 of what it holds."""
    save_file(tensors, path, metadata=metadata)
    return fsync_and_hash(path)
