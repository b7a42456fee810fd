"""npcpu.checks: the argument checks every public entry point uses."""

import math

import numpy as np
import pytest

from npcpu.checks import ArgumentTypeError, check_flag, check_int, check_real


def test_check_int_accepts_python_and_numpy_integers_in_bounds():
    assert check_int("Owner", "n", 3, 1) == 3
    assert type(check_int("Owner", "n", np.int32(3), 1)) is int
    assert check_int("Owner", "n", -5) == -5
    assert check_int("Owner", "i", 4, 0, 5) == 4


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "Owner: n must be >= 1, got 0"),
    (2.5, ArgumentTypeError, "Owner: n must be an integer, got float 2.5"),
    (True, ArgumentTypeError, "Owner: n must be an integer, got bool True"),
    ("3", ArgumentTypeError, "Owner: n must be an integer, got str '3'"),
])
def test_check_int_names_owner_argument_bound_and_value(value, error, message):
    with pytest.raises(error) as info:
        check_int("Owner", "n", value, 1)
    assert str(info.value) == message


def test_check_int_upper_bound_is_exclusive_and_shown_as_written():
    with pytest.raises(ValueError, match=r"^f: seed must be in \[0, 2\*\*64\), got 18446744073709551616$"):
        check_int("f", "seed", 2**64, 0, 2**64)
    with pytest.raises(ValueError, match=r"^f: i must be in \[-3, 3\), got -4$"):
        check_int("f", "i", -4, -3, 3)
    assert check_int("f", "seed", 2**64 - 1, 0, 2**64) == 2**64 - 1


def test_wrong_type_is_both_type_error_and_value_error():
    for call in (lambda: check_int("o", "k", 2.5, 1), lambda: check_real("o", "x", "1"),
                 lambda: check_flag("o", "f", 1)):
        with pytest.raises(TypeError):
            call()
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("bounds, value, message", [
    (dict(), math.nan, "o: x must be finite, got nan"),
    (dict(), math.inf, "o: x must be finite, got inf"),
    (dict(low=0.0), -1.0, "o: x must be >= 0 and finite, got -1.0"),
    (dict(low=0.0, low_open=True), 0.0, "o: x must be > 0 and finite, got 0.0"),
    (dict(high=1.0, high_open=True), 1.0, "o: x must be < 1 and finite, got 1.0"),
    (dict(low=0.0, high=1.0, low_open=True), 0.0, "o: x must be in (0, 1], got 0.0"),
    (dict(low=0.0, high=0.5, high_open=True), 0.5, "o: x must be in [0, 0.5), got 0.5"),
    (dict(low=0.0, allow_inf=True), -math.inf, "o: x must be >= 0, got -inf"),
    (dict(allow_inf=True), math.nan, "o: x must be a number, got nan"),
])
def test_check_real_rejects_outside_bounds_with_the_bound_in_words(bounds, value, message):
    with pytest.raises(ValueError) as info:
        check_real("o", "x", value, **bounds)
    assert str(info.value) == message


def test_check_real_accepts_bounds_and_returns_float():
    assert check_real("o", "x", 0, low=0.0) == 0.0 and type(check_real("o", "x", 0, low=0.0)) is float
    assert check_real("o", "x", np.float32(0.25), low=0.0, high=1.0) == 0.25
    assert check_real("o", "x", math.inf, low=0.0, allow_inf=True) == math.inf
    with pytest.raises(TypeError, match="o: x must be a real number, got bool True"):
        check_real("o", "x", True)


def test_check_flag():
    assert check_flag("o", "f", True) is True
    assert check_flag("o", "f", np.bool_(False)) is False
    with pytest.raises(TypeError, match="o: f must be a bool, got int 1"):
        check_flag("o", "f", 1)
