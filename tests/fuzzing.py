"""Shared machinery of the property-based fuzz tests (tests/test_fuzz_*.py).

Every fuzzed call ends in one of three outcomes, tallied per category:

    ok           it returned, and the test then checks the result is correct
    clear error  ValueError, TypeError or FloatingPointError (OSError for files) whose message
                 names what it is about (the layer, the file, the key): an error a user can act on
    crash        anything else: IndexError, KeyError, AttributeError, a Numba error, an error
                 that names nothing, or more memory than the input justifies

A crash fails the test (hypothesis then shrinks the input). `pytest -s` prints the tally of each
fuzz module when it ends (the `table` fixture).
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CLEAR_ERRORS = (ValueError, TypeError, FloatingPointError)
OUTCOMES = ("ok", "clear error", "crash")

tally: dict[str, Counter] = defaultdict(Counter)

# the budget of each property: the whole fuzz suite about a minute on 2 shared cores
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


class Crash(AssertionError):
    """A fuzzed input that got neither a correct result nor a clear error."""


def attempt(category: str, call, *names: str, errors=CLEAR_ERRORS, memory_limit: int | None = None):
    """call() and its outcome, tallied under `category`: (True, result) or (False, the error).

    A clear error must name one of `names` (case-insensitive) in its message; with
    `memory_limit`, the Python and NumPy allocations made while calling must stay below it
    (tracemalloc's peak)."""
    tracing = memory_limit is not None and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        result = call()
        outcome = (True, result)
    except errors as error:
        text = str(error).lower()
        if names and not any(name.lower() in text for name in names):
            tally[category]["crash"] += 1
            raise Crash(f"{category}: the error does not name any of {names}: "
                        f"{type(error).__name__}: {error}") from error
        outcome = (False, error)
    except Exception as error:  # noqa: BLE001 - the point: anything else is a crash
        tally[category]["crash"] += 1
        raise Crash(f"{category}: {type(error).__name__}: {error}") from error
    finally:
        if tracing:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if tracing and peak > memory_limit:
        tally[category]["crash"] += 1
        raise Crash(f"{category}: allocated {peak} bytes at peak, the limit is {memory_limit}")
    tally[category]["ok" if outcome[0] else "clear error"] += 1
    return outcome


def print_table(categories) -> None:
    rows = [(name, tally[name]) for name in categories if tally[name]]
    if not rows:
        return
    width = max(len(name) for name, _ in rows)
    print(f"\n{'category':<{width}}  {'inputs':>6}  {'ok':>5}  {'clear error':>11}  {'crash':>5}")
    for name, counts in rows:
        print(f"{name:<{width}}  {sum(counts.values()):>6}  {counts['ok']:>5}  "
              f"{counts['clear error']:>11}  {counts['crash']:>5}")


def table_fixture(*categories):
    """A module fixture that prints the tally of `categories` when the module's tests end."""
    @pytest.fixture(scope="module", autouse=True)
    def table():
        yield
        print_table(categories)
    return table


# -- arrays as hostile callers pass them ------------------------------------------------------------
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool",
          "object", ">f4", ">f8", "complex64")


@st.composite
def hostile_arrays(draw, shape=None, max_dims: int = 4, max_side: int = 6, dtypes=DTYPES):
    """Arrays of random shape (empty and 0-d ones included), dtype (see DTYPES), values (NaN,
    Inf, huge), layout (non-contiguous, read-only)."""
    if shape is None:
        ndim = draw(st.integers(0, max_dims))
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=ndim, max_size=ndim)))
    dtype_name = draw(st.sampled_from(dtypes))
    values = draw(st.sampled_from(("normal", "nan", "inf", "huge", "zeros")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = np.asarray(rng.standard_normal(shape), dtype=np.float64)
    if values == "nan" and base.size:
        base.flat[rng.integers(base.size)] = np.nan
    elif values == "inf" and base.size:
        base.flat[rng.integers(base.size)] = -np.inf
    elif values == "huge":
        base = base * 1e30
    elif values == "zeros":
        base = np.zeros_like(base)
    array = np.asarray(as_dtype(np.asarray(base), dtype_name))
    layout = draw(st.sampled_from(("c", "fortran", "strided", "readonly")))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        wide = np.repeat(array, 2, axis=-1)
        array = wide[..., ::2]
    elif layout == "readonly":
        array = array.copy()
        array.flags.writeable = False
    return array


def as_dtype(values: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        from ml_dtypes import bfloat16
        with np.errstate(over="ignore", invalid="ignore"):
            return values.astype(bfloat16)
    if name == "object":
        return values.astype(object)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.dtype(name).kind in "iub":
            return np.nan_to_num(values, nan=0, posinf=0, neginf=0).clip(-100, 100).astype(name)
        return values.astype(name)


@contextlib.contextmanager
def quiet():
    """NumPy floating-point warnings off: NaN and Inf inputs are the point."""
    with np.errstate(all="ignore"):
        yield
