"""The one test of "a finite JSON number" every reader of untrusted documents uses."""

from __future__ import annotations

import math
from typing import Any, TypeGuard


def finite_number(value: Any) -> TypeGuard[int | float]:
    """True for an int or float a float can hold and that is finite. bool is an int subclass
    but never a meaningful number here; an integer literal of a few hundred digits is valid
    JSON, and math.isfinite raises OverflowError on it instead of answering."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
