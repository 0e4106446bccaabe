"""Argument checks shared by the sweeps and the assertions.

Each message says what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

__all__ = [
    "as_ints",
    "check_finite_number",
    "check_nonnegative",
    "check_widths",
    "expect",
    "is_int",
    "is_number",
]


def expect(ok: bool, name: str, expected: str, got: object) -> None:
    """Raise ``ValueError("Expected `name` to be <expected> but got <got>.")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Expected `{name}` to be {expected} but got {got!r}.")


def as_ints(name: str, values: object, minimum: Optional[int]) -> tuple[int, ...]:
    """A non-empty sequence of ints (each ``>= minimum``) as a tuple, or ValueError."""
    items = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else ()
    ok = bool(items) and all(is_int(v) and (minimum is None or v >= minimum) for v in items)
    kind = "ints" if minimum is None else f"ints >= {minimum}"
    expect(ok, name, f"a non-empty sequence of {kind}", values)
    return items


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    values = as_ints("widths", widths, 1)
    expect(len(set(values)) >= 2, "widths", "at least two distinct positive ints", widths)
    return tuple(sorted(values))


def check_nonnegative(name: str, value: object) -> None:
    expect(is_number(value) and value >= 0, name, "a finite float >= 0", value)


def check_finite_number(name: str, value: object) -> None:
    expect(is_number(value), name, "a finite float", value)
