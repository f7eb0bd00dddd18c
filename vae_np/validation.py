"""The checks of scalar arguments, in one place: integers, numbers, choices, and sizes
that would not fit in memory (checked before allocating, not found by a MemoryError).

NumPy scalars are accepted wherever a Python one is (``np.int64(5)`` is an integer,
``np.float32(2)`` a number) and come back as Python ``int`` / ``float``, so that what a
constructor stores (``VAE.config``) is JSON-able; bools are neither (``True`` is no width).
Every failure is a ValueError whose message starts with the argument's name.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

__all__ = ["check_choice", "check_fits_in_memory", "check_int", "check_number",
           "physical_memory"]


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer (Python or
    NumPy) >= ``minimum``, or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite real number
    (Python or NumPy) with ``low <= value`` (``<`` with ``low_open``) and ``value < high``."""
    expected = "a finite number" + (
        "" if low is None else f" {'>' if low_open else '>='} {low:g}") + (
        "" if high is None else f"{' and' if low is not None else ''} < {high:g}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or (low is not None and value < low) \
            or (low_open and value == low) or (high is not None and value >= high):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value``; ValueError naming ``name`` unless it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(what: str, values: int, itemsize: int) -> None:
    """ValueError naming ``what`` when ``values`` numbers of ``itemsize`` bytes exceed this
    machine's memory: a size that cannot be allocated is said as such, before trying."""
    total = physical_memory()
    if total is not None and values * itemsize > total:
        raise ValueError(f"{what}: {values:,} numbers ({values * itemsize / 2 ** 30:,.3g} GiB) "
                         f"do not fit in this machine's {total / 2 ** 30:,.3g} GiB of memory")
