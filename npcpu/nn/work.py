"""Counts of work done and skipped, so that tests and logs can see what freezing saves.

Layers call `record("gemm")` for each GEMM they run and `record("gemm_skipped")` for each they
skip (a frozen weight's dW, an input that needs no dx). Counting is a dict increment per GEMM:
negligible beside the GEMM itself.

The counts are per thread (threading.local): `counts` is the calling thread's, so two models
trained in two threads count separately; `reset()` clears the calling thread's counts.
"""

import threading
from collections import Counter

_local = threading.local()


def _counts() -> Counter:
    counts = getattr(_local, "counts", None)
    if counts is None:
        counts = _local.counts = Counter()
    return counts


def record(kind: str, n: int = 1) -> None:
    try:  # the thread's counts (a call per GEMM: the common case without a second call)
        _local.counts[kind] += n
    except AttributeError:
        _counts()[kind] += n


def record_gemms(done: int, skipped: int) -> None:
    """record("gemm", done) and record("gemm_skipped", skipped) in one call (a layer's backward),
    each only when not zero."""
    counts = _counts()
    if done:
        counts["gemm"] += done
    if skipped:
        counts["gemm_skipped"] += skipped


def reset() -> None:
    _counts().clear()


def __getattr__(name: str):
    """`work.counts`: the calling thread's Counter."""
    if name == "counts":
        return _counts()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
