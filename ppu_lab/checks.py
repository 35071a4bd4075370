"""Argument checks, written once: each raises a ValueError that names the argument and what to pass.

The lab's functions are called by students from notebooks; a wrong argument must fail at once,
with a sentence, not deep inside NumPy or MPI.
"""

from __future__ import annotations

import numbers

import numpy as np


def real(name: str, value, hint: str = "") -> float:
    """``value`` as a float (any real number, NumPy scalars included; not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)):
        raise ValueError(f"{name} must be a real number{hint}; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number{hint}; got {value!r}") from None


def integer(name: str, value, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be None); 3.0 counts as 3, True does not.

    ``what`` is appended to the message, e.g. ``" (the number of samples is 100)"``.
    """
    if low is not None and high is not None:
        bound = f" between {low} and {high}"
    elif low is not None:
        bound = f" >= {low}"
    elif high is not None:
        bound = f" <= {high}"
    else:
        bound = ""
    message = f"{name} must be an integer{bound}{what}; got {value!r}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(message)
    if not np.isfinite(value) or int(value) != value:
        raise ValueError(message)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(message)
    return value


def optional_integer(name: str, value, low: int | None = None, high: int | None = None, what: str = ""):
    """``None``, or ``integer(name, value, low, high, what)``."""
    return None if value is None else integer(name, value, low, high, what)


def start_weights(w0, d: int) -> np.ndarray:
    """Starting weights of shape ``(d,)``: zeros when ``w0`` is None, else a finite float copy of it.

    A copy, so that the caller's ``w0`` is never changed by training.
    """
    if w0 is None:
        return np.zeros(d)
    try:
        w = np.array(w0, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"w0 (starting weights) must be a numeric array of shape ({d},)") from None
    if w.shape != (d,) or not np.all(np.isfinite(w)):
        raise ValueError(f"w0 (starting weights) must be finite with shape ({d},); got shape {w.shape}")
    return w
