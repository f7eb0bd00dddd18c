"""Input checks: one helper per kind of check, each raising an error that names the
argument and what was expected.

Scalars (``check_int``, ``check_number``, ``check_choice``, ``check_bool``) accept Python
and NumPy values alike (``np.int64(5)``, ``np.float32(2)``, ``np.bool_(True)``) and return
them as the Python value to store, so a config or a model never holds a NumPy scalar.
bool is not an integer here, and NaN and inf are not numbers: each would otherwise pass
a range check and fail later, far from the argument that caused it.

Sizes (``check_fits_in_memory``) are checked before allocating, so a width of 1e9 is one
line naming what was too large instead of a MemoryError traceback.

Arrays (``check_array``, ``check_labels``, ``check_range``, ``check_rng``) take the
``vae_np.backend.Backend`` the data must live on. Shapes and dtypes cost nothing to check;
finiteness and ranges read numbers back from the device, so callers in a hot loop may
check their data once and turn those off.

A leaf of the package: it imports nothing from ``vae_np`` (the backend is passed in), so
every module, ``data`` and ``plotting`` included, can use it.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import numpy as np
from array_api_compat import array_namespace


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` as a Python int, after checking it is an integer >= ``minimum`` (or None
    when ``allow_none``); ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a Python float, after checking it is a finite real number in the range
    [low, high] (a bound None is no bound; ``low_open`` / ``high_open`` exclude the
    bound itself); ValueError naming ``name`` and the range otherwise."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    expected = f"a finite number{' ' if bounds else ''}{' and '.join(bounds)}"
    if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (low is not None and (value < low or (low_open and value == low))) \
            or (high is not None and (value > high or (high_open and value == high))):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]):
    """``value``, after checking it is one of ``choices``; ValueError naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool, after checking it is one (0 and 1 are not)."""
    if not _is_bool(value):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


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


def check_layers_fit(what: str, networks: Sequence[Sequence[int]], itemsize: int,
                     copies: int = 4) -> None:
    """:func:`check_fits_in_memory` for fully connected networks of the layer ``widths``
    (one sequence per network, input first): each Linear a -> b holds (a + 1) b numbers,
    ``copies`` times (weights, gradients and an optimizer's two moments)."""
    values = sum((a + 1) * b for widths in networks for a, b in zip(widths, widths[1:]))
    check_fits_in_memory(what, copies * values, itemsize)


# ------------------------------------------------------------------------------------------
# Arrays


def check_array(name: str, x, backend, shape: tuple, check_finite: bool = True):
    """``x`` as an array of ``backend`` in its dtype, after checking it.

    ``shape`` gives each expected size, None for any size >= 1. Host (NumPy) data is
    accepted on every backend; arrays of another backend are refused (TypeError), never
    copied behind the caller's back. Integer and bool arrays are refused too: a float
    model silently fed labels or masks would compute nonsense. With ``check_finite``
    (one device read), NaN or inf is a ValueError.
    """
    xp = backend.xp
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
        x = backend.asarray(x)
    else:
        try:
            x_xp = array_namespace(x)
        except TypeError:
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from None
        if x_xp is not xp:
            raise TypeError(f"{name}: expected a NumPy array or an array of the "
                            f"{backend.name!r} backend, got {type(x).__module__}."
                            f"{type(x).__name__}")
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim != len(shape) or any(
            size < 1 if want is None else size != want for size, want in zip(x.shape, shape)):
        expected = ", ".join("N >= 1" if want is None else str(want) for want in shape)
        raise ValueError(f"{name}: expected shape ({expected}), got {tuple(x.shape)}")
    if x.dtype != backend.dtype:
        x = xp.astype(x, backend.dtype)
    if check_finite and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def check_range(name: str, x, backend, low: float, high: float, hint: str = "") -> None:
    """ValueError naming ``name`` unless every value of ``x`` lies in [low, high] (one
    reduction, one device read); ``hint`` says what to do instead."""
    xp = backend.xp
    lowest, highest = (float(v) for v in backend.to_numpy(xp.stack([xp.min(x), xp.max(x)])))
    if lowest < low or highest > high:
        raise ValueError(f"{name}: expected values in [{low:g}, {high:g}], got values in "
                         f"[{lowest:g}, {highest:g}]{hint}")


def check_labels(name: str, y, n: int, num_classes: int, backend) -> np.ndarray:
    """Class labels ``y`` as a host integer array (n,), after checking the shape, the
    integer dtype and the range 0..num_classes-1 (ValueError naming ``name``)."""
    labels = np.asarray(y if isinstance(y, np.ndarray) else backend.to_numpy(y))
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected ({n},) integer labels, got shape {labels.shape} "
                         f"and dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: expected labels in 0..{num_classes - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return labels


def check_rng(name: str, rng, backend) -> None:
    """TypeError naming ``name`` unless ``rng`` is a ``vae_np.backend.RNG`` drawing on
    ``backend`` (its library and dtype). A NumPy Generator would "work" and silently
    misread shapes as means, so it is refused by what it lacks: the backend it draws on."""
    want = f"{backend.name}/{backend.dtype_name}"
    prefix = f"{name}: expected an RNG of the model's backend ({want}), made by " \
             f"model.backend.rng(seed), got"
    drawn_on = getattr(rng, "backend", None)
    if not callable(getattr(rng, "normal", None)) or not hasattr(drawn_on, "dtype_name"):
        raise TypeError(f"{prefix} {type(rng).__module__}.{type(rng).__name__}")
    got = f"{drawn_on.name}/{drawn_on.dtype_name}"
    if got != want:
        raise TypeError(f"{prefix} an RNG of {got}")
