"""glibc malloc settings for training: keep freed memory in the process for the next step.

A training step allocates and frees the same large temporaries every step (activations,
gradients, workspaces: hundreds of KB to tens of MB). glibc's malloc serves a block above its
mmap threshold with freshly mapped pages and unmaps it when it is freed, and gives the free top
of its heap back to the system above its trim threshold. Either way the next step's arrays land
on pages the kernel has to fault in and zero-fill again, one page fault per 4 KB written, every
step. glibc raises both thresholds by itself when a mapped block is freed, but only to that
block's size, so a step whose temporaries come in many sizes keeps faulting.

`retain_freed_memory` fixes the two thresholds: blocks up to MMAP_THRESHOLD come from the heap,
and up to TRIM_THRESHOLD bytes of free heap stay in the process, so a step reuses the pages the
previous step freed. The price: what a run frees is not returned to the system before it exits
(its peak stays resident, which a training loop returns to every step anyway). Blocks above
MMAP_THRESHOLD (glibc's largest allowed value on 64-bit systems) are still mapped and unmapped.
Where the C library is not glibc (macOS, musl), or the environment sets glibc's malloc itself
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or malloc tunables in GLIBC_TUNABLES: the
user's choice, e.g. to measure memory), nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_")


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for the whole process (module docstring), once.
    Returns whether they were set (False where the C library is not glibc, or the environment
    configures its malloc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
