"""Counts of work done and skipped, so that tests and logs can see what freezing saves.

Layers call `record("gemm")` for each GEMM they run and `record("gemm_skipped")` for each they
skip (a frozen weight's dW, an input that needs no dx). Counting is a dict increment per GEMM:
negligible beside the GEMM itself.
"""

from collections import Counter

counts: Counter = Counter()


def record(kind: str, n: int = 1) -> None:
    counts[kind] += n


def reset() -> None:
    counts.clear()
