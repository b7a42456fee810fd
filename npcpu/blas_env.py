"""The BLAS thread count on macOS, set before NumPy and SciPy load (this module imports neither).

On macOS the NumPy and SciPy wheels (for macOS 14 and later) run their GEMMs on Apple Accelerate,
whose threads threadpoolctl cannot set: Accelerate reads VECLIB_MAXIMUM_THREADS once, when it
loads. So unless the user set it, `import npcpu` sets it to the count Numba's kernels will use
(NUMBA_NUM_THREADS if set, else the cores this process may run on, as Numba counts them), so that
BLAS and Numba get the same count as on other platforms (see npcpu.backend). npcpu.backend removes
it again once SciPy's BLAS has loaded, so that processes started later (torch in the benchmarks)
do not inherit it.

It has no effect when NumPy (or SciPy's BLAS) was imported before npcpu: Accelerate has read the
variable by then. Elsewhere than macOS nothing is set (OpenBLAS and MKL are set at run time through
threadpoolctl).
"""

from __future__ import annotations

import os
import sys

VECLIB_THREADS_ENV = "VECLIB_MAXIMUM_THREADS"

veclib_threads_set: str | None = None  # the value npcpu set (None: it set nothing)


def numba_thread_count() -> int:
    """The thread count Numba will start with, found the way Numba finds it, without importing it."""
    if os.environ.get("NUMBA_NUM_THREADS"):
        return max(1, int(os.environ["NUMBA_NUM_THREADS"]))
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_veclib_threads() -> str | None:
    """On macOS, set VECLIB_MAXIMUM_THREADS to Numba's thread count unless the user set it.
    Returns the value set here, or None when nothing was set."""
    global veclib_threads_set
    if sys.platform != "darwin" or VECLIB_THREADS_ENV in os.environ:
        return None
    veclib_threads_set = str(numba_thread_count())
    os.environ[VECLIB_THREADS_ENV] = veclib_threads_set
    return veclib_threads_set


def unset_veclib_threads() -> None:
    """Remove the VECLIB_MAXIMUM_THREADS set by set_veclib_threads (Accelerate has read it)."""
    if veclib_threads_set is not None and os.environ.get(VECLIB_THREADS_ENV) == veclib_threads_set:
        del os.environ[VECLIB_THREADS_ENV]


def veclib_threads() -> int | None:
    """The VECLIB_MAXIMUM_THREADS Accelerate read at load (npcpu's or the user's), or None."""
    value = veclib_threads_set or os.environ.get(VECLIB_THREADS_ENV)
    try:
        return int(value) if value else None
    except ValueError:
        return None
