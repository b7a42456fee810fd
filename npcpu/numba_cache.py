"""Where Numba keeps the compiled kernels of npcpu: a per-user cache directory, never the package's own.

npcpu's kernels are `@njit(cache=True)`, so the first run compiles them and later runs load the
machine code from disk. Left to itself, Numba writes those files into a `__pycache__` folder beside
the source whenever that folder is writable: for an installed npcpu, inside `site-packages/npcpu/`.
pip does not know those files, so `pip uninstall` (and so a switch from `pip install .` to an
editable install) leaves `site-packages/npcpu/kernels/__pycache__/` behind. A `site-packages/npcpu/`
folder without `__init__.py` is then an implicit namespace package, and a process whose `sys.path`
does not start at the repository imports it instead of the real npcpu ("cannot import name
'synthetic' from 'npcpu.kernels' (unknown location)"). Numba's own discussion of the problem:
numba/numba issue #9350.

So npcpu puts one cache locator of its own in front of Numba's list. It answers only for npcpu's
source files, and only when the user has not chosen a directory with NUMBA_CACHE_DIR (Numba's own
locator then serves, as for any other code). The directory is `$XDG_CACHE_HOME/npcpu/numba` (or
`~/.cache/npcpu/numba`), one subfolder per source folder (Numba's hashed-path naming), so several
environments and checkouts never share or overwrite each other's files. Where that directory cannot
be written, the locator declines and Numba falls back to its usual choices.

Numba decides whether a cached kernel is fresh by its own source file alone (its stamp is a hash
of that file). A kernel's machine code also holds what it inlined or called from other files (the
fast exp, the GEMM tile, the scalar activations), so an edit there alone would leave the caller's
stale code in use (numba/numba issue #6845). npcpu's stamp is therefore the function's own file
and every file of npcpu/kernels/, the code a kernel may call: a change to any of them recompiles
npcpu's kernels on next use.

Numba has no public hook for a locator (issue #9350); `CacheImpl._locator_classes` is the list its
caching code reads (named `_CacheImpl` before Numba 0.61), and the base classes used here are the
ones its own locators are built from.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from numba.core import caching, config

PACKAGE_DIR = Path(__file__).resolve().parent
KERNELS_DIR = PACKAGE_DIR / "kernels"


def cache_root() -> Path:
    """The folder under which npcpu's compiled kernels are stored."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npcpu" / "numba"


def folder_stamp(folder: Path) -> bytes:
    """sha256 over the names and contents of the .py files directly in `folder`, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


@functools.cache
def kernels_stamp() -> bytes:
    """folder_stamp of npcpu/kernels/, once per process (the files do not change under a run)."""
    return folder_stamp(KERNELS_DIR)


class NpcpuCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba cache locator for functions defined in npcpu's own source files (module docstring)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(cache_root() / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self):
        """Numba's stamp of the function's own file, and the kernels folder's (module docstring)."""
        return super().get_source_stamp(), kernels_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if config.CACHE_DIR:  # the user's explicit choice wins
            return None
        if not Path(py_file).resolve().is_relative_to(PACKAGE_DIR):
            return None
        return super().from_function(py_func, py_file)  # None when the folder is not writable


def install() -> None:
    """Put NpcpuCacheLocator first in Numba's locator list (once). Must run before any npcpu kernel
    is decorated, which is why `npcpu/__init__.py` calls it first."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    if NpcpuCacheLocator not in impl._locator_classes:
        impl._locator_classes.insert(0, NpcpuCacheLocator)
