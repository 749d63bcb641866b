"""Document collections: ``session.db.reports``, ``app.collection("reports")``.

A small Mongo-like surface over the store, as Capsule's: equality and
``$gt $gte $lt $lte $ne $in`` filters (an array field matching by any element), ``$set $inc $unset $push`` updates
(``$push`` with ``$each`` too).
A query hands the store what SQL can test of it (``doc_filters.conditions``),
which the store's table and indexes answer; every document it gives back is
checked with ``doc_filters.matches``. Writes are transactional on disk. Every method does its work at once and
returns a value usable plainly (sync code, a thread task) or awaited
(Capsule code).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import portable
from .awaitables import ReadyDict, ReadyInt, ReadyList, ReadyNone, unwrapped
from .checks import whole_number
from .doc_filters import (MISSING, check_depth, check_filter, check_path, conditions, field_value, is_operators,
                          matches, sort_keys, sortable)
from .record import new_task_id, short_repr
from .store.documents import json_path
from .tables import TABLE_ROWS, TableSpec, declare, declared, table_html

if TYPE_CHECKING:
    from .store import Store

_UPDATES = ("$set", "$inc", "$unset", "$push")
MAX_DOCUMENT_BYTES = 16 * 2**20  # as JSON; MongoDB's cap


class Collection:
    def __init__(self, store: "Store", name: str, spec: TableSpec | None = None):
        if not isinstance(name, str) or not name or "/" in name or name.startswith("_"):
            raise ValueError(f"bad collection name {name!r}: a non-empty name without '/' or a leading '_'")
        self._store = store
        self.name = name
        if spec is not None:
            declare(store.path, name, spec)
            if spec.columns and (spec.sortable or spec.filterable):
                store.index_docs(name, [column.key for column in spec.columns])

    def __repr__(self) -> str:
        return f"<collection {self.name!r}: {self.count()} documents>"

    def __reduce__(self) -> tuple:
        """To a worker process (a ``process=True`` run using a module-level collection, as
        Capsule code does): the same collection, on the same store by path."""
        return _collection_at, (str(self._store.path), self.name)

    # ----------------------------------------------------------------- writes

    def insert_one(self, doc: dict[str, Any]) -> ReadyDict:
        """Store ``doc`` (a copy) with a new ``_id`` and ``id``; gives the stored document."""
        return ReadyDict(self.insert_many([doc])[0])

    def insert_many(self, docs: Iterable[dict[str, Any]]) -> ReadyList:
        """All of ``docs``, or none if an ``_id`` is taken or given twice (MongoDB's duplicate
        key): an insert never overwrites a document."""
        prepared = [_prepared(doc) for doc in docs]  # copies, which the store does not keep
        batch = {doc["_id"]: doc for doc in prepared}
        if len(batch) < len(prepared):
            twice = next(doc["_id"] for doc in prepared if batch[doc["_id"]] is not doc)
            raise ValueError(f"insert_many: _id {twice!r} is given twice; nothing inserted")
        self._store.write_docs(self.name, {i: functools.partial(self._new, doc=d) for i, d in batch.items()})
        return ReadyList(prepared)

    def _new(self, current: dict | None, doc: dict[str, Any]) -> dict[str, Any]:
        if current is not None:
            raise ValueError(f"collection {self.name!r} already holds a document with _id {doc['_id']!r}; "
                             f"nothing inserted (update_one changes a document)")
        return doc

    def update_one(self, filter: dict[str, Any], update: dict[str, Any], *, upsert: bool | None = None) -> ReadyDict:
        """Update the first match; a plain dict is a patch (``$set``). Gives what Capsule's
        does, ``{"matched": 0 or 1, "modified": 0 or 1}``; ``upsert``: no match inserts the
        filter's plain fields with the update applied (and gives its ``"upserted_id"``)."""
        operations = _operations(update)
        check_filter(filter)
        if upsert is not None:  # (given at all, False too: Capsule's update_one takes no upsert)
            if not isinstance(upsert, bool):
                raise TypeError(f"upsert is True or False, not {upsert!r}")
            portable.note("doc_options")
        modified = []

        def change(current: dict) -> dict:
            new = _updated(current, operations)
            modified.append(new != current)
            return new

        matched, _ = self._change_first(filter, change)
        if matched or not upsert:
            return ReadyDict({"matched": int(matched), "modified": int(bool(modified) and modified[-1])})
        plain = {key: value for key, value in filter.items() if not key.startswith("$")
                 and not (isinstance(value, dict) and any(str(k).startswith("$") for k in value))}
        seed = _updated({}, {"$set": plain})  # (a dotted field becomes the nested one it names, as in MongoDB)
        inserted = self.insert_many([_updated(seed, operations)])[0]
        return ReadyDict({"matched": 0, "modified": 0, "upserted_id": inserted["_id"]})

    def delete_one(self, filter: dict[str, Any]) -> ReadyDict:
        """Delete the first match; gives what Capsule's does, ``{"deleted": 0 or 1}``."""
        check_filter(filter)
        return ReadyDict({"deleted": int(self._change_first(filter, lambda current: None)[0])})

    def _change_first(self, filter: dict[str, Any], change: Callable[[dict], dict | None]) -> tuple[bool, dict | None]:
        """``(whether a match was changed, the new document)``: ``change`` applied to the first
        match, re-checked inside the write's transaction (one another process changed first
        so that it no longer matches is passed over for the next match)."""
        while True:
            found = self._find(filter, limit=1)
            if not found:
                return False, None
            stale = []

            def guarded(current: dict | None) -> dict | None:
                if current is None or not matches(current, filter):
                    stale.append(True)
                    return current
                return change(current)

            doc_id = found[0]["_id"]
            new = self._store.write_docs(self.name, {doc_id: guarded})[doc_id]
            if not stale:
                return True, new

    # ------------------------------------------------------------------ reads

    def find_one(self, filter: dict[str, Any] | None = None) -> ReadyDict | ReadyNone:
        """The first matching document, or a stand-in for None (falsy, ``== None``)."""
        found = self.find(filter, limit=1)
        return ReadyDict(found[0]) if found else ReadyNone()

    def find(self, filter: dict[str, Any] | None = None, limit: int = 0, skip: int = 0,
             sort: str | list[tuple[str, int]] | dict[str, int] | None = None) -> ReadyList:
        """Matching documents (copies) in insertion order or by ``sort``: Capsule's
        ``{"field": 1, "other": -1}`` (keys in order), ``"field"``, ``"-field"``
        or ``[("field", 1), ("other", -1)]``."""
        whole_number("limit", limit)
        whole_number("skip", skip)
        filter = filter or {}
        check_filter(filter)
        keys = sort_keys(sort)
        if sort is not None and not isinstance(sort, dict):
            portable.note("doc_options")
        return ReadyList(self._find(filter, keys, limit, skip))

    def _find(self, filter: dict[str, Any], sort: Sequence[tuple[str, int]] = (), limit: int = 0,
              skip: int = 0) -> list[dict[str, Any]]:
        """Sorted in SQL when SQL can name every sort field; else here, in the same order."""
        where, _ = conditions(filter)
        keep = functools.partial(matches, filter=filter)
        if all(json_path(field) is not None for field, _ in sort):
            return self._store.find_docs(self.name, where, sort, keep=keep, limit=limit or None, offset=skip)
        docs = self._store.find_docs(self.name, where, keep=keep)
        for field, direction in reversed(sort):
            docs.sort(key=lambda d: sortable(field_value(d, field)), reverse=direction < 0)
        return docs[skip : skip + limit] if limit else docs[skip:]

    def count(self, filter: dict[str, Any] | None = None) -> ReadyInt:
        filter = filter or {}
        check_filter(filter)
        where, exact = conditions(filter)
        return ReadyInt(self._store.count_docs(self.name, where, keep=functools.partial(matches, filter=filter),
                                               exact=exact))

    # ---------------------------------------------------------------- display

    def _repr_html_(self) -> str:
        spec = declared(self._store.path, self.name)
        docs = self._find({}, limit=spec.paginate if spec and spec.paginate else TABLE_ROWS)
        return table_html(self.name, docs, self.count(), spec, _shown)


def _collection_at(home: str, name: str) -> Collection:
    from .store import open_store

    return Collection(open_store(home), name)


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
    operator = next((key for key in doc if isinstance(key, str) and key.startswith("$")), None)
    if operator is not None:  # (names with dots are kept: a filter reaches them as paths or not at all)
        raise ValueError(f"an insert takes a document, not an update: its field {operator!r} is an operator "
                         f"(update_one(filter, {{{operator!r}: ...}}) applies it)")
    value = _stored(doc, "the document")
    doc_id = value.get("_id")
    if doc_id is None:
        doc_id = new_task_id()
    elif not isinstance(doc_id, str) or "/" in doc_id or not doc_id:
        raise ValueError(f"document _id must be a non-empty string without '/', got {doc_id!r}")
    value["_id"] = doc_id
    value.setdefault("id", doc_id)
    return value


def _stored(doc: dict[str, Any], what: str) -> dict[str, Any]:
    """``doc`` as the store keeps it (a JSON copy), or an error that says why it cannot be:
    not JSON (NaN and Infinity included), nested too deep, or too big."""
    check_depth(doc, what)
    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        plain = unwrapped(doc)  # a stand-in for None or a bool given on (``find_one()`` of nothing)
        if plain is not doc:
            return _stored(plain, what)
        raise TypeError(f"documents are stored as JSON; {what} is not ({exc}): {short_repr(doc, 200)}") from None
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{what} would be {len(text):,} bytes of JSON, over the {MAX_DOCUMENT_BYTES:,}-byte "
                         f"cap on a document; keep big data in files or task results")
    copy = json.loads(text)
    if copy != doc:  # a tuple, a key that is not text: JSON would change it
        raise TypeError(f"documents are stored as JSON; {what} does not survive it unchanged: {short_repr(doc, 200)}")
    return copy


def _operations(update: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(update, dict) or not update:
        raise TypeError(f"an update is a non-empty dict, not {short_repr(update, 200)}")
    check_depth(update, "the update")
    for key in update:
        check_path(key, "an update")
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
    _check_conflicts(update)
    for op, fields in update.items():
        for field in fields:
            if check_path(field, op)[0] == "_id":
                raise ValueError(f"_id cannot be changed ({op} {field!r})")
        if op == "$inc":
            bad = {k: v for k, v in fields.items()
                   if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
            if bad:
                raise TypeError(f"$inc needs numbers (finite ones), got {bad!r}")
        if op == "$push":
            for field, arg in fields.items():
                if is_operators(arg) and (list(arg) != ["$each"] or not isinstance(arg["$each"], list)):
                    raise ValueError(f"$push {field!r}: the one modifier here is {{'$each': [values]}}, got {arg!r}")
    return update


def _check_conflicts(update: dict[str, dict[str, Any]]) -> None:
    """Refuse two changes to one field (``$set`` and ``$inc`` of ``n``; ``a`` and ``a.b``), as
    MongoDB does: applied in turn, the later one would silently undo the earlier."""
    paths = sorted((tuple(check_path(field, op)), op) for op, fields in update.items() for field in fields)
    for (first, op1), (second, op2) in zip(paths, paths[1:]):
        if second[: len(first)] == first:
            raise ValueError(f"update conflict: {op1} {'.'.join(first)!r} and {op2} {'.'.join(second)!r} "
                             f"change the same field; make them one change")


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
                current.extend(arg["$each"] if is_operators(arg) else [arg])
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


def _shown(doc: dict[str, Any], key: str) -> Any:
    value = field_value(doc, key)
    return "" if value is MISSING else value
