"""Checks of user-given settings, each failing with an error that names the value."""

from __future__ import annotations


LARGEST = 2**63 - 1  # what SQLite (a limit, an offset) and a C long can hold


def whole_number(name: str, value: object, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) from ``minimum`` to ``LARGEST``; else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if value > LARGEST:
        raise ValueError(f"{name} must be a whole number <= 2**63 - 1, got {value!r}")
    return value


def text_or_none(name: str, value: object) -> str | None:
    """``value`` if it is a string or None; else ``TypeError`` (a widget's trait would say
    only that *its* trait expected a unicode string)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def true_or_false(name: str, value: object) -> bool:
    """``value`` if it is a bool; else ``TypeError``: "no" and "yes" are both truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
