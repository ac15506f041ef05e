"""Per-axis primitives at the bottom of the house: one value per spatial axis, and sizes
rounded to a network's divisor.

Every option that takes "one number for all axes, or one per axis" reads it with
:func:`per_axis`; every size snapped to a multiple of a divisor uses :func:`round_down`,
:func:`round_up`, :func:`round_nearest` or :func:`nearest_valid`. This module imports
nothing from flexpatch but the error type, so any layer may use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, TypeVar, overload

from flexpatch.errors import FlexPatchError

__all__ = ["nearest_valid", "per_axis", "round_down", "round_nearest", "round_up"]

T = TypeVar("T")


def _is_scalar(value: Any) -> bool:
    """A number, a string, or a 0-d array/tensor: one value, not one per axis."""
    return isinstance(value, (numbers.Number, str, bytes)) or getattr(value, "ndim", None) == 0


@overload
def per_axis(value: Any, ndim: int, what: str, *, message: str | None = None) -> tuple[int, ...]: ...


@overload
def per_axis(
    value: Any, ndim: int, what: str, *, cast: Callable[[Any], T], message: str | None = None
) -> tuple[T, ...]: ...


def per_axis(
    value: Any, ndim: int, what: str, *, cast: Callable[[Any], Any] = int, message: str | None = None
) -> tuple[Any, ...]:
    """``value`` as one entry per axis: a scalar or a one-entry sequence is repeated ``ndim``
    times, a sequence of ``ndim`` entries is kept; each entry goes through ``cast``.

    Args:
        value: e.g. ``64``, ``(64,)`` or ``(64, 64, 32)``.
        ndim: number of axes.
        what: the option's name, for the error (``"patch_size"``, ``"divisor"``).
        cast: converts each entry (``int`` by default; ``float``, ``bool``, or a checking function
            that raises ``ValueError``/``TypeError`` on a bad entry).
        message: the whole error message instead of the default one, where a caller says it
            in its own words; used for a wrong length and for an entry ``cast`` refuses.

    Raises:
        FlexPatchError: ``value`` has neither 1 nor ``ndim`` entries, or an entry does not cast.
    """
    try:
        items = (value,) if _is_scalar(value) else tuple(value)
    except TypeError:
        raise FlexPatchError(
            message or f"{what} {value!r} is neither a number nor a sequence of {ndim} numbers"
        ) from None
    try:
        values = tuple(cast(v) for v in items)
    except (TypeError, ValueError):
        raise FlexPatchError(message or f"{what} {value!r} has an entry that is not a valid number") from None
    if len(values) == 1:
        return values * ndim
    if len(values) != ndim:
        default = f"{what} {values} has {len(values)} entries for a {ndim}D image: give 1 or {ndim}"
        raise FlexPatchError(message or default)
    return values


def round_down(size: int, divisor: int) -> int:
    """The largest multiple of ``divisor`` <= ``size`` (0 when ``size < divisor``)."""
    return size // divisor * divisor


def round_up(size: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` >= ``size``."""
    return -(-size // divisor) * divisor


def round_nearest(size: float, divisor: int) -> int:
    """The multiple of ``divisor`` nearest ``size`` (Python's ``round``: halves go to even)."""
    return round(size / divisor) * divisor


def nearest_valid(size: int, divisor: int) -> tuple[int, int]:
    """The multiples of ``divisor`` just below and above ``size`` (equal when it divides).

    The lower one is at least ``divisor``, so both are usable sizes.
    """
    if divisor < 1:
        raise FlexPatchError(f"divisor must be positive, got {divisor}")
    return max(divisor, round_down(size, divisor)), max(divisor, round_up(size, divisor))
