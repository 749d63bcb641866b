"""Which documents a collection call means: MongoDB's filter rules (``matches``, the one
definition of a match), what SQL can test of a filter (``conditions``, which the store's
table and indexes answer), the order of a sort, and the checks every filter, update and
document passes (field paths, nesting).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

from .record import short_repr
from .store.documents import Condition, json_path, text

_ORDER = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
_FILTERS = (*_ORDER, "$ne", "$in")
_RANGES = {"$gt": ">=", "$gte": ">=", "$lt": "<=", "$lte": "<="}  # as SQL tests them (a superset)
_SURROGATES = re.compile("[\ud800-\udfff]")
_EXACT_INTEGERS = 2**53  # integral numbers up to here read back from JSON text exactly, as floats too
MAX_DEPTH = 100  # nesting of a document, a filter or an update (MongoDB's too)
MISSING = object()  # what ``field_value`` gives for a field a document has not


def check_depth(value: Any, what: str) -> None:
    """Refuse nesting past ``MAX_DEPTH`` before anything recurses into it (no RecursionError)."""
    level, depth = [value] if isinstance(value, (dict, list, tuple)) else [], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list, tuple))]


def check_path(field: Any, what: str) -> list[str]:
    """A field name or dotted path, split; names the bad one."""
    if not isinstance(field, str):
        raise TypeError(f"{what} names fields with text, got the key {field!r}")
    parts = field.split(".")
    if not all(parts):
        raise ValueError(f"{what}: bad field path {field!r} (an empty part)")
    return parts


def check_filter(filter: dict[str, Any]) -> None:
    if not isinstance(filter, dict):
        raise TypeError(f"a filter is a dict, not {short_repr(filter, 200)}")
    check_depth(filter, "the filter")
    for field, condition in filter.items():
        check_path(field, "a filter")
        if field.startswith("$"):
            raise ValueError(f"unknown filter operator {field!r}: filters are field conditions, "
                             f"with {sorted(_FILTERS)} inside a field")
        if isinstance(condition, dict) and any(k.startswith("$") for k in condition):
            unknown = [k for k in condition if k not in _FILTERS]
            if unknown:
                raise ValueError(f"unknown filter operator {unknown[0]!r} on {field!r}; known: {sorted(_FILTERS)}")
            if "$in" in condition and not isinstance(condition["$in"], (list, tuple, set)):
                raise ValueError(f"$in on {field!r} needs a list, got {condition['$in']!r}")


def matches(doc: dict[str, Any], filter: dict[str, Any]) -> bool:
    """Mongo's rules: a missing field reads as None (so ``{"x": None}`` matches it); an
    array matches a condition that it or any of its elements meets (``{"tags": "urgent"}``
    finds ``["urgent", "late"]``); an order comparison with None or an unlike type is
    simply not a match."""
    for field, condition in filter.items():
        value = field_value(doc, field)
        value = None if value is MISSING else value
        if is_operators(condition):
            if not all(_holds(op, value, arg) for op, arg in condition.items()):
                return False
        elif not _equal(value, condition):
            return False
    return True


def _holds(op: str, value: Any, arg: Any) -> bool:
    if op == "$ne":
        return not _equal(value, arg)
    if op == "$in":
        return any(_equal(value, item) for item in arg)
    return any(_ordered(_ORDER[op], item, arg) for item in _each(value))


def _equal(value: Any, wanted: Any) -> bool:
    return json_equal(value, wanted) or (type(value) is list and any(json_equal(v, wanted) for v in value))


def json_equal(value: Any, wanted: Any) -> bool:
    """Equal as JSON values are, and as Mongo matches them: a boolean is no number (``True == 1``)."""
    return value == wanted and (type(value) is bool) == (type(wanted) is bool)


def _each(value: Any) -> list[Any]:
    """What an order comparison tests: each element of an array, else the value."""
    return value if type(value) is list else [value]


def _ordered(compare: Callable[[Any, Any], bool], value: Any, bound: Any) -> bool:
    """Values of one kind only, as Mongo orders them: ``{"$gt": 0}`` finds no ``true``."""
    try:
        return value is not None and (type(value) is bool) == (type(bound) is bool) and compare(value, bound)
    except TypeError:
        return False


def conditions(filter: dict[str, Any]) -> tuple[list[Condition], bool]:
    """What SQL can test of ``filter`` (``store/documents.py``): conditions every match of
    ``matches`` meets, and whether they say all it says (exact). ``json_extract`` gives None
    for a missing or null field and 1 for true, so an equality tests the JSON type too and is
    exact for the values ``_sql_value`` lets through, as is ``$in`` of them but booleans and
    numbers; an order comparison with a number is tested inclusively (a superset)."""
    found: list[Condition] = []
    exact = True
    for field, condition in filter.items():
        if json_path(field) is None:
            exact = False
        elif not is_operators(condition):
            if _sql_value(condition):
                found.append((field, "=", condition))
            else:
                exact = False
        else:
            for op, arg in condition.items():
                if op == "$in" and all(_sql_value(item) for item in arg):
                    found.append((field, "in", list(arg)))  # (true is 1 there: a number decides in Python)
                    if not any(isinstance(item, (bool, int, float)) for item in arg):
                        continue
                exact = False
                if op in _RANGES and _sql_number(arg):
                    found.append((field, _RANGES[op], arg))
    return found, exact


def _sql_value(value: Any) -> bool:
    """Whether SQL's ``=`` agrees with Python's for ``value`` and any JSON value: not a
    string SQLite might confuse with the JSON text of an object or an array, or that
    holds a NUL (where SQLite stops reading) or a lone surrogate (not UTF-8), and no
    number it might read back rounded from a document's JSON text."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return "\x00" not in value and not value.startswith(("{", "[")) and not _SURROGATES.search(value)
    if isinstance(value, (int, float)):
        return abs(value) <= _EXACT_INTEGERS and float(value).is_integer()
    return False


def _sql_number(value: Any) -> bool:
    """A number SQL can compare with (an ulp's error in reading a document's number back
    is covered by testing order comparisons inclusively)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and -(2**63) <= value < 2**63


def is_operators(condition: Any) -> bool:
    """``{"$gt": 1}`` is a comparison; ``{"a": 1}`` (and ``{}``) a value to be equal to."""
    return isinstance(condition, dict) and bool(condition) and all(k.startswith("$") for k in condition)


def field_value(doc: dict[str, Any], field: str) -> Any:
    value: Any = doc
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def sort_keys(sort: str | list[tuple[str, int]] | dict[str, int] | None) -> list[tuple[str, int]]:
    if sort is None:
        return []
    if isinstance(sort, str):
        return [(sort[1:], -1)] if sort.startswith("-") else [(sort, 1)]
    try:
        keys = list(sort.items()) if isinstance(sort, dict) else list(sort)
    except TypeError:
        raise TypeError(f"sort takes 'field', '-field', {{'field': 1 or -1, ...}} or [('field', 1 or -1)], "
                        f"got {sort!r}") from None
    for item in keys:
        if not (isinstance(item, tuple) and len(item) == 2 and item[1] in (1, -1)):
            raise ValueError(f"sort takes {{'field': 1 or -1, ...}}, 'field', '-field' or [('field', 1 or -1)], "
                             f"got {sort!r}")
        check_path(item[0], "a sort")
    return keys


def sortable(value: Any) -> tuple:
    """SQLite's order of what ``json_extract`` gives, so a sort here agrees with one in SQL:
    missing and null, then numbers (false and true as 0 and 1), then text: strings, and
    objects and arrays by their JSON text as stored. Never a TypeError."""
    if value is None or value is MISSING:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, value if isinstance(value, str) else text(value))
