"""Names and numbers a save writes and a reader parses back: steps (pure)."""

from __future__ import annotations

import operator
from typing import Any


def as_step(value: Any) -> int:
    """A step as a Python int: ints and numpy integers as they are, integral floats too;
    anything else (``5.7``, ``True``, ``"5"``) is refused.

    >>> import numpy as np
    >>> as_step(np.int64(3)), as_step(5.0)
    (3, 5)
    """
    if isinstance(value, bool):
        raise TypeError(f"step {value!r} is a bool; expected an integer")
    try:
        step = operator.index(value)
    except TypeError:
        if not (isinstance(value, float) or type(value).__name__.startswith("float")):
            raise TypeError(f"step {value!r} of type {type(value).__name__}; expected an integer") from None
        as_float = float(value)
        if not as_float.is_integer():
            raise TypeError(f"step {value!r} is not a whole number; expected an integer") from None
        step = int(as_float)
    if not 0 <= step < 2**63:
        raise ValueError(f"step {step} is out of range; expected 0 <= step < 2**63")
    return step
