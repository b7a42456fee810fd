"""Argument checks shared by every public entry point: integers, real numbers and flags.

Each check returns the value as a plain Python int, float or bool, or raises an error whose message
names the owner (class or function), the argument, the bound and the received value, e.g.
``DataLoader: batch_size must be >= 1, got 0``.

A value of the wrong type raises `ArgumentTypeError`, which is a TypeError and also a ValueError:
numpy's AxisError does the same (ValueError and IndexError), and callers written against the
earlier checks of some arguments (Lookahead's k, seeds, scheduler step counts), which raised
ValueError for a value such as 2.5, keep working. A value of the right type outside its bounds
raises ValueError.

`parse_json` is the one reading of JSON a user can hand npcpu (checkpoint state, safetensors
headers, meta.json, tokenizer files, a run's config), with one wording for its failures.
"""

from __future__ import annotations

import json
import math
import numbers
import operator

import numpy as np


def parse_json(text: str | bytes, source: str, error: type[Exception] = ValueError, **options):
    """json.loads(text, **options), bytes read as UTF-8, raising `error` named after `source` when
    the text is not JSON ("<source>: not valid JSON (<why>)") or nests deeper than Python's
    recursion limit allows ("<source>: JSON nested too deeply to read": json.loads raises
    RecursionError for that, which is not a ValueError, so a hostile file would otherwise escape
    every reader's error handling)."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return json.loads(text, **options)
    except ValueError as e:  # JSONDecodeError, bytes that are not UTF-8, a rejected constant
        raise error(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read") from None


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (see the module docstring for why it is both errors)."""


def _show(bound) -> str:
    """A bound as written in code: powers of two from 2**16 up as ``2**k``, whole floats as ints."""
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"
    return f"{bound}"


def check_int(owner: str, name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum) (either bound None: no bound on that side).

    Accepts Python and NumPy integers (anything with ``__index__``) but not bool.
    """
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{owner}: {name} must be an integer, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{owner}: {name} must be an integer, "
                                f"got {type(value).__name__} {value!r}") from None
    if maximum is not None and (value >= maximum or (minimum is not None and value < minimum)):
        low = "-inf" if minimum is None else _show(minimum)
        raise ValueError(f"{owner}: {name} must be in [{low}, {_show(maximum)}), got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {_show(minimum)}, got {value}")
    return value


def _interval(low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool) -> str:
    """The bounds in words: "in (0, 1]", "> 0 and finite", "<= 1", "finite"."""
    if low > -math.inf and high < math.inf:  # both ends finite: so is any value between them
        return f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    if low > -math.inf:
        condition = f"{'>' if low_open else '>='} {_show(low)}"
    elif high < math.inf:
        condition = f"{'<' if high_open else '<='} {_show(high)}"
    else:
        return "a number" if allow_inf else "finite"
    return condition if allow_inf else f"{condition} and finite"


def check_real(owner: str, name: str, value, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float in the interval from `low` to `high` (each end closed unless `*_open`).

    NaN is always rejected; +-inf only with `allow_inf` (and then still subject to the bounds).
    Accepts Python and NumPy reals but not bool.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{owner}: {name} must be {_interval(low, high, low_open, high_open, allow_inf)}, "
                         f"got {value!r}")
    return value


def check_flag(owner: str, name: str, value) -> bool:
    """`value` as a bool; only Python and NumPy bools are accepted (not 0 / 1)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)
