"""Checks of the numbers a user passes in: one ValueError that names the argument, the range and the value.

Every public function of the package validates its numeric arguments through these, so that the
messages read alike: ``lr must be a number > 0, got 0.0``, ``density must be a number in (0, 1], got 1.5``,
``chains must be a positive integer, got 0``, ``seed must be an integer in [0, 2**32), got -1``.
Booleans, NaN and infinities are refused wherever a number is expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_number(value: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> Any:
    """``value`` unchanged if it is a finite number (an integer when ``integer``) in the range from ``low``
    to ``high`` (open ends as given); otherwise a ValueError naming ``name``, the range and the value."""
    ok = is_number(value) and (not integer or int(value) == value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {_range(low, high, low_open, high_open)}, got {value!r}")
    return value


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """``check_number`` for a number > 0 (>= 0 with ``allow_zero``)."""
    return check_number(name, value, 0.0, low_open=not allow_zero, integer=integer)


def check_count(name: str, value: Any) -> int:
    """A positive integer (a count: epochs, chains, samples, a batch size, ...), returned as an int."""
    if not (is_number(value) or isinstance(value, numbers.Integral) and not isinstance(value, bool)) or \
            int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_fraction(name: str, value: Any, *, low_open: bool = False, high_open: bool = True) -> float:
    """A number in [0, 1) by default (ends as given), returned as a float."""
    return float(check_number(name, value, 0.0, 1.0, low_open=low_open, high_open=high_open))


def check_seed(seed: Any, bits: int = 32) -> int | None:
    """``seed`` as an int, or None; anything but an integer in [0, 2**bits) is a ValueError.

    The loops take seeds in [0, 2**32) (as numpy does) and derive per-chain seeds from them; a
    generator itself accepts [0, 2**64)."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**bits:
        raise ValueError(f"seed must be an integer in [0, 2**{bits}), got {seed!r}")
    return int(seed)
