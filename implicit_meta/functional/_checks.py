"""Checks of plain numeric and boolean settings, shared by the adjoint and the meta-optimizer."""

from __future__ import annotations

import math
import numbers


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an ``int`` of at least ``minimum``, or an error that names ``name``.

    Raises:
        TypeError: If ``value`` is not an integer (``bool`` is refused).
        ValueError: If it is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_real(value: object, name: str, *, positive: bool) -> float:
    """``value`` as a finite ``float``, positive or non-negative, or an error naming ``name``.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is refused).
        ValueError: If it is not finite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    if not positive and number < 0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    return number


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``, or an error that names ``name``.

    Truthy stand-ins (``1``, ``"yes"``) are refused: a flag set by mistake should fail loudly.

    Raises:
        TypeError: If ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
