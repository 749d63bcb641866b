"""Document collections: ``session.db.reports``, ``app.collection("reports")``.

A small Mongo-like surface over the store, as Capsule's: equality and
``$gt $gte $lt $lte $ne $in`` filters, ``$set $inc $unset $push`` updates.
Reads filter the store's in-memory mirror (kept current across processes
by the change feed); writes are transactional on disk. Every method does
its work at once and returns a value usable plainly (sync code, a thread
task) or awaited (Capsule code).
"""

from __future__ import annotations

import copy
import html
import json
import math
from typing import TYPE_CHECKING, Any, Iterable

from .checks import whole_number
from .awaitables import ReadyInt, ReadyList, ReadyValue
from .record import new_task_id, short_repr

if TYPE_CHECKING:
    from .store import Store

_COMPARE = {
    "$gt": lambda a, b: a is not None and a > b,
    "$gte": lambda a, b: a is not None and a >= b,
    "$lt": lambda a, b: a is not None and a < b,
    "$lte": lambda a, b: a is not None and a <= b,
    "$ne": lambda a, b: a != b,
    "$in": lambda a, b: a in b,
}
_UPDATES = ("$set", "$inc", "$unset", "$push")
_MISSING = object()
MAX_DOCUMENT_BYTES = 16 * 2**20  # as JSON; MongoDB's cap. Every process keeps every document in memory
MAX_DEPTH = 100  # nesting of a document, a filter or an update (MongoDB's too)
SCOPES = ("app", "user", "owner", "session")
TABLE_ROWS = 200  # rows a collection's table shows when it declares no ``paginate``

# What ``app.collection(name, columns=...)`` declared, by (store folder, name): how the table shows it.
_declared: dict[tuple[str, str], "TableSpec"] = {}


class TableSpec:
    """Capsule's collection options. Locally they shape the table display only; ``scope`` is
    checked and kept, but one notebook has one user and one owner, so every scope is one
    collection in the store."""

    def __init__(self, columns: Iterable[Any] | None = None, scope: str = "app", sortable: bool = False,
                 filterable: bool = False, paginate: int = 0):
        if scope not in SCOPES:
            raise ValueError(f"collection scope must be one of {SCOPES}, got {scope!r}")
        self.columns = [_column(c) for c in columns] if columns is not None else None
        self.scope = scope
        self.sortable = bool(sortable)
        self.filterable = bool(filterable)
        self.paginate = whole_number("paginate", paginate)


class Collection:
    def __init__(self, store: "Store", name: str, spec: TableSpec | None = None):
        if not isinstance(name, str) or not name or "/" in name or name.startswith("_"):
            raise ValueError(f"bad collection name {name!r}: a non-empty name without '/' or a leading '_'")
        self._store = store
        self.name = name
        if spec is not None:
            _declared[(str(store.path), name)] = spec

    def __repr__(self) -> str:
        return f"<collection {self.name!r}: {len(self._store.docs(self.name))} documents>"

    # ----------------------------------------------------------------- writes

    def insert_one(self, doc: dict[str, Any]) -> ReadyValue:
        """Store ``doc`` (a copy) with a new ``_id`` and ``id``; gives the stored document."""
        return ReadyValue(self.insert_many([doc])[0])

    def insert_many(self, docs: Iterable[dict[str, Any]]) -> ReadyList:
        prepared = [_prepared(doc) for doc in docs]
        self._store.write_docs(self.name, {d["_id"]: (lambda _, d=d: d) for d in prepared})
        return ReadyList(copy.deepcopy(prepared))

    def update_one(self, filter: dict[str, Any], update: dict[str, Any]) -> ReadyValue:
        """Update the first match; a plain dict is a patch (``$set``). Gives the new document or None."""
        operations = _operations(update)
        _check_filter(filter)
        for doc in self._store.docs(self.name):
            if not _matches(doc, filter):
                continue
            stale = []

            def change(current: dict | None) -> dict | None:
                if current is None or not _matches(current, filter):
                    stale.append(True)  # another process changed it first: try the next match
                    return current
                return _updated(current, operations)

            new = self._store.write_docs(self.name, {doc["_id"]: change})[doc["_id"]]
            if not stale:
                return ReadyValue(copy.deepcopy(new))
        return ReadyValue(None)

    def delete_one(self, filter: dict[str, Any]) -> ReadyValue:
        """Delete the first match; gives True if a document was deleted."""
        _check_filter(filter)
        for doc in self._store.docs(self.name):
            if _matches(doc, filter):
                self._store.write_docs(self.name, {doc["_id"]: lambda current: None})
                return ReadyValue(True)
        return ReadyValue(False)

    # ------------------------------------------------------------------ reads

    def find_one(self, filter: dict[str, Any] | None = None) -> ReadyValue:
        """The first matching document, or None (``await`` it, or read ``.value`` in sync code)."""
        found = self.find(filter, limit=1)
        return ReadyValue(found[0] if found else None)

    def find(self, filter: dict[str, Any] | None = None, limit: int = 0, skip: int = 0,
             sort: str | list[tuple[str, int]] | dict[str, int] | None = None) -> ReadyList:
        """Matching documents (copies) in insertion order or by ``sort``: Capsule's
        ``{"field": 1, "other": -1}`` (keys in order), ``"field"``, ``"-field"``
        or ``[("field", 1), ("other", -1)]``."""
        whole_number("limit", limit)
        whole_number("skip", skip)
        filter = filter or {}
        _check_filter(filter)
        docs = [d for d in self._store.docs(self.name) if _matches(d, filter)]
        for field, direction in reversed(_sort_keys(sort)):
            docs.sort(key=lambda d: _sortable(d.get(field)), reverse=direction < 0)
        chosen = docs[skip : skip + limit] if limit else docs[skip:]
        return ReadyList(copy.deepcopy(chosen))

    def count(self, filter: dict[str, Any] | None = None) -> ReadyInt:
        filter = filter or {}
        _check_filter(filter)
        return ReadyInt(sum(1 for d in self._store.docs(self.name) if _matches(d, filter)))

    # ---------------------------------------------------------------- display

    def _repr_html_(self) -> str:
        """A table: the declared ``columns`` (key and label) in order, else every key seen."""
        spec = _declared.get((str(self._store.path), self.name))
        total = self.count()
        docs = self._store.docs(self.name)[: spec.paginate if spec and spec.paginate else TABLE_ROWS]
        if spec is not None and spec.columns is not None:
            columns = spec.columns
        else:
            keys: list[str] = ["id"]
            for doc in docs:
                keys.extend(k for k in doc if k not in keys and k != "_id")
            columns = [(k, k) for k in keys]
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(_shown(d, key)))}</td>" for key, _ in columns)
                       + "</tr>" for d in docs)
        shown = f"{len(docs)} of {total} documents" if len(docs) < total else f"{total} documents"
        return (f"<div><b>{html.escape(self.name)}</b> ({shown})"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


class Database:
    """``session.db``: collections by attribute or by key."""

    def __init__(self, store: "Store"):
        self._store = store

    def __getattr__(self, name: str) -> Collection:
        if name.startswith("_"):
            raise AttributeError(name)
        return Collection(self._store, name)

    def __getitem__(self, name: str) -> Collection:
        return Collection(self._store, name)


# -------------------------------------------------------------------- helpers


def _prepared(doc: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise TypeError(f"a document is a dict, not {short_repr(doc, 200)}")
    value = _stored(doc, "the document")
    doc_id = value.get("_id")
    if doc_id is None:
        doc_id = new_task_id()
    elif not isinstance(doc_id, str) or "/" in doc_id or not doc_id:
        raise ValueError(f"document _id must be a string without '/', got {doc_id!r}")
    value["_id"] = doc_id
    value.setdefault("id", doc_id)
    return value


def _stored(doc: dict[str, Any], what: str) -> dict[str, Any]:
    """``doc`` as the store keeps it (a JSON copy), or an error that says why it cannot be:
    not JSON (NaN and Infinity included), nested too deep, or too big."""
    _check_depth(doc, what)
    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"documents are stored as JSON; {what} is not ({exc}): {short_repr(doc, 200)}") from None
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{what} would be {len(text):,} bytes of JSON, over the {MAX_DOCUMENT_BYTES:,}-byte "
                         f"cap on a document; keep big data in files or task results")
    copy = json.loads(text)
    if copy != doc:  # a tuple, a key that is not text: JSON would change it
        raise TypeError(f"documents are stored as JSON; {what} does not survive it unchanged: {short_repr(doc, 200)}")
    return copy


def _check_depth(value: Any, what: str) -> None:
    """Refuse nesting past ``MAX_DEPTH`` before anything recurses into it (no RecursionError)."""
    level, depth = [value] if isinstance(value, (dict, list, tuple)) else [], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list, tuple))]


def _check_path(field: Any, what: str) -> list[str]:
    """A field name or dotted path, split; names the bad one."""
    if not isinstance(field, str):
        raise TypeError(f"{what} names fields with text, got the key {field!r}")
    parts = field.split(".")
    if not all(parts):
        raise ValueError(f"{what}: bad field path {field!r} (an empty part)")
    return parts


def _check_filter(filter: dict[str, Any]) -> None:
    if not isinstance(filter, dict):
        raise TypeError(f"a filter is a dict, not {short_repr(filter, 200)}")
    _check_depth(filter, "the filter")
    for field, condition in filter.items():
        _check_path(field, "a filter")
        if field.startswith("$"):
            raise ValueError(f"unknown filter operator {field!r}: filters are field conditions, "
                             f"with {sorted(_COMPARE)} inside a field")
        if isinstance(condition, dict) and any(k.startswith("$") for k in condition):
            unknown = [k for k in condition if k not in _COMPARE]
            if unknown:
                raise ValueError(f"unknown filter operator {unknown[0]!r} on {field!r}; known: {sorted(_COMPARE)}")
            if "$in" in condition and not isinstance(condition["$in"], (list, tuple, set)):
                raise ValueError(f"$in on {field!r} needs a list, got {condition['$in']!r}")


def _matches(doc: dict[str, Any], filter: dict[str, Any]) -> bool:
    """Mongo's rules: a missing field reads as None (so ``{"x": None}`` matches it),
    and an order comparison with None or an unlike type is simply not a match."""
    for field, condition in filter.items():
        value = _get(doc, field)
        value = None if value is _MISSING else value
        if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
            try:
                if not all(_COMPARE[op](value, arg) for op, arg in condition.items()):
                    return False
            except TypeError:
                return False
        elif value != condition:
            return False
    return True


def _get(doc: dict[str, Any], field: str) -> Any:
    value: Any = doc
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _operations(update: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(update, dict) or not update:
        raise TypeError(f"an update is a non-empty dict, not {short_repr(update, 200)}")
    _check_depth(update, "the update")
    for key in update:
        _check_path(key, "an update")
    operators = [k for k in update if k.startswith("$")]
    if operators and len(operators) != len(update):
        raise ValueError(f"update mixes plain keys and operators: {sorted(update)}; use $set for the plain ones")
    if not operators:
        update = {"$set": update}
    unknown = [k for k in update if k not in _UPDATES]
    if unknown:
        raise ValueError(f"unknown update operator {unknown[0]!r}; known: {list(_UPDATES)}")
    for op, fields in update.items():
        if not isinstance(fields, dict):
            raise TypeError(f"{op} takes a dict of fields, got {short_repr(fields, 200)}")
        for field in fields:
            if _check_path(field, op)[0] == "_id":
                raise ValueError(f"_id cannot be changed ({op} {field!r})")
        if op == "$inc":
            bad = {k: v for k, v in fields.items()
                   if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
            if bad:
                raise TypeError(f"$inc needs numbers (finite ones), got {bad!r}")
    return update


def _updated(doc: dict[str, Any], operations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    for op, fields in operations.items():
        for field, arg in fields.items():
            *parents, leaf = field.split(".")
            target = _parent(new, parents, op, field)
            if target is None:  # $unset of a path that is not there
                continue
            if op == "$set":
                target[leaf] = arg
            elif op == "$unset":
                target.pop(leaf, None)
            elif op == "$inc":
                current = target.get(leaf, 0)
                if isinstance(current, bool) or not isinstance(current, (int, float)):
                    raise TypeError(f"$inc on {field!r}, which holds {short_repr(current, 100)}, not a number")
                target[leaf] = _sum(current, arg, field)
            elif op == "$push":
                current = target.setdefault(leaf, [])
                if not isinstance(current, list):
                    raise TypeError(f"$push on {field!r}, which holds {short_repr(current, 100)}, not a list")
                current.append(arg)
    return _stored(new, "the updated document")


def _parent(doc: dict[str, Any], parents: list[str], op: str, field: str) -> dict[str, Any] | None:
    """The document holding the last part of a dotted ``field`` (made for a write; None when
    ``$unset`` finds nothing there); a part that holds something other than a document is
    an error naming it, as in MongoDB."""
    target = doc
    for depth, part in enumerate(parents):
        inner = target.get(part)
        if inner is None and part not in target:
            if op == "$unset":
                return None
            inner = target[part] = {}
        if not isinstance(inner, dict):
            path = ".".join(parents[: depth + 1])
            raise ValueError(f"{op} {field!r}: {path!r} holds {short_repr(inner, 100)}, not a document")
        target = inner
    return target


def _sum(current: int | float, arg: int | float, field: str) -> int | float:
    try:
        total = current + arg
    except OverflowError:  # a huge int and a float
        total = math.inf
    if isinstance(total, float) and not math.isfinite(total):
        raise ValueError(f"$inc on {field!r}: {current!r} + {arg!r} overflows (JSON has no Infinity); nothing stored")
    return total


def _sort_keys(sort: str | list[tuple[str, int]] | dict[str, int] | None) -> list[tuple[str, int]]:
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
    return keys


def _sortable(value: Any) -> tuple:
    """Missing values first, then by type name, then by value (never a TypeError)."""
    if value is None:
        return (0, "", 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, "number", value)
    return (2, type(value).__name__, value if isinstance(value, str) else repr(value))


def _column(column: Any) -> tuple[str, str]:
    """``(key, label)`` of a column given as a name, a ``{"key", "label"}`` dict or a Column-like object."""
    if isinstance(column, str):
        return column, column
    key = column.get("key") if isinstance(column, dict) else getattr(column, "key", None)
    label = column.get("label") if isinstance(column, dict) else getattr(column, "label", None)
    if not isinstance(key, str) or not key:
        raise ValueError(f"a collection column is a field name, or has a 'key'; got {column!r}")
    return key, label or key


def _shown(doc: dict[str, Any], key: str) -> Any:
    value = _get(doc, key)
    return "" if value is _MISSING else value


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:79] + "…"
