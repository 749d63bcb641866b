"""Which expression indexes the documents table has, and when to make another.

Making an index reads every document it covers: 0.2 s for 100,000. So a
collection makes them while it is young (``YOUNG`` documents at most), when
that costs a blink: one for each top-level field its documents hold a short
scalar at, as the fields appear, and, for a query, the index that serves
its whole shape (equality fields, then sort fields). Once it has grown, a
query of a new shape uses the indexes on its fields that exist, and makes
one only when none of its fields has an index. SQLite's planner picks among
them by their statistics (``ANALYZE``, sampled), except that a page of a
filter matching many documents walks its sort field's index
(``documents.Documents._walk``), which the planner never chooses.

An index serves one collection: ``WHERE collection = '<name>'`` (a partial
index), so writing to one collection never computes another's indexes, and
``MAX_INDEXES`` caps each collection's. Queries name the collection as the
same literal, since SQLite matches a partial index only to a literal.
Indexes made before, on ``(collection, ...)``, serve every collection.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import Counter
from typing import Any, Callable, Iterable

import diskcache

log = logging.getLogger("capsule_nb")

MAX_INDEXES = 16  # expression indexes serving one collection
YOUNG = 1000  # documents: an index on a collection this small takes about a millisecond to make
AUTO_FIELDS = MAX_INDEXES // 2  # of those, made for the fields its documents hold (the rest: for queries)
_PREFIX = "capsule_docs_by_"
_TABLE_INDEXES = ["sqlite_autoindex_capsule_docs_1", "capsule_docs_in_order"]  # (``documents._SCHEMA``)
_SHARED = "collection, "  # the leading column of the indexes made before they were per collection
_KEY_CHARS = 100  # a longer string is text to read, not a key to look a document up by
_ANALYZE_ROWS = 1000  # rows ANALYZE samples per index: statistics enough to pick an index, in a millisecond


def literal(collection: str) -> str | None:
    """``collection`` as an SQL string literal, or None when SQL text cannot carry it
    (a NUL character, a lone surrogate); such a collection uses only shared indexes."""
    try:
        collection.encode()
    except UnicodeEncodeError:
        return None
    return None if "\x00" in collection else "'" + collection.replace("'", "''") + "'"


def _keylike(value: Any) -> bool:
    """Whether a field holding ``value`` is worth an index before any query asks for one."""
    kind = type(value)
    return kind is int or kind is float or kind is bool or (kind is str and len(value) <= _KEY_CHARS)


def _leads(columns: str, expr: str) -> bool:
    """Whether an index on ``columns`` starts with ``expr`` (either way up)."""
    return columns == expr or columns.startswith((expr + ", ", expr + " DESC"))


class DocIndexes:
    """The indexes of ``capsule_docs``, as this process has found and made them."""

    def __init__(self, cache: diskcache.Cache):
        self._cache = cache
        self._served: set[tuple[str, str]] = set()  # (collection, columns) made sure of
        self._auto: Counter[str] = Counter()  # per collection: fields indexed for being there
        self._grown: set[str] = set()  # collections found past YOUNG: no more field indexes
        self._analyzed: set[str] = set()  # collections whose index statistics this process took

    def where(self, collection: str) -> tuple[str, list[str]]:
        """The SQL that picks ``collection``'s rows, as its partial indexes match it."""
        quoted = literal(collection)
        return ("collection = ?", [collection]) if quoted is None else (f"collection = {quoted}", [])

    def for_query(self, collection: str, key: list[str]) -> None:
        """Make sure of an index serving a query by ``key`` (its equality fields, then its
        sort fields), as the module's docstring says, with statistics to pick one by."""
        columns = ", ".join(key)
        if (collection, columns) not in self._served:
            made = self._indexes(collection)
            if not any(_leads(c, columns) for c in made):
                grown_and_served = not self.young(collection) and any(
                    _leads(c, term.removesuffix(" DESC")) for c in made for term in key)
                if not grown_and_served:
                    self.make(collection, key)
            self._served.add((collection, columns))
        if collection not in self._analyzed:
            self._analyzed.add(collection)
            self._analyze(collection)

    def walk(self, collection: str, key: list[str], expr: str) -> str | None:
        """The name of an index on ``expr`` that serves ``collection``, when none serves
        a query by ``key`` (its equality fields, then its sort fields) whole."""
        listed, whole = self._listed(collection), ", ".join(key)
        if any(_leads(columns, whole) for _, columns in listed):
            return None
        return next((name for name, columns in listed if _leads(columns, expr)), None)

    def young(self, collection: str) -> bool:
        """Whether ``collection`` has ``YOUNG`` documents at most (once past, it stays grown
        for this process: a few deletes do not make indexes cheap again)."""
        if collection in self._grown:
            return False
        (count,) = self._cache._sql("SELECT count(*) FROM (SELECT 1 FROM capsule_docs WHERE collection = ? LIMIT ?)",
                                    (collection, YOUNG + 1)).fetchone()
        if count > YOUNG or literal(collection) is None:
            self._grown.add(collection)
            return False
        return True

    def for_fields(self, collection: str, docs: Iterable[dict | None], expr_of: Callable[[str], str | None]) -> None:
        """Index the top-level fields that ``docs``, just written to a collection that was
        young, hold a short scalar at; ``expr_of(field)`` is a field's expression."""
        fields = dict.fromkeys(field for doc in docs if doc for field, value in doc.items()  # in the documents' order
                               if field != "_id" and _keylike(value))
        for expr in filter(None, map(expr_of, fields)):
            if (collection, expr) not in self._served:
                if self._auto[collection] >= AUTO_FIELDS:
                    break
                self._auto[collection] += 1
                self.make(collection, [expr])

    def make(self, collection: str, key: list[str]) -> None:
        """An index on ``key`` for ``collection``, unless one that starts so exists (made by
        any process) or ``MAX_INDEXES`` do; checked once per process."""
        columns = ", ".join(key)
        if (collection, columns) in self._served:
            return
        if not any(_leads(c, columns) for c in self._indexes(collection)):
            with self._cache.transact(retry=True):
                made = self._indexes(collection)
                if not any(_leads(c, columns) for c in made) and len(made) < MAX_INDEXES:
                    quoted = literal(collection)
                    body = f"({columns}) WHERE collection = {quoted}" if quoted else f"({_SHARED}{columns})"
                    name = _PREFIX + hashlib.sha1(body.encode()).hexdigest()[:12]
                    self._cache._sql(f"CREATE INDEX IF NOT EXISTS {name} ON capsule_docs {body}")
                    self._analyzed.discard(collection)  # the next query takes statistics of it
        self._served.add((collection, columns))

    def _analyze(self, collection: str) -> None:
        """Sampled statistics of the indexes serving ``collection``: without them SQLite
        would walk a sort field's index even to find one document among 100,000."""
        names = [name for name, _ in self._listed(collection)]
        if not names:
            return
        names += _TABLE_INDEXES  # else the planner weighs the indexes with statistics against guesses
        sql = self._cache._sql
        (waits,) = sql("PRAGMA busy_timeout").fetchone()
        sql(f"PRAGMA analysis_limit = {_ANALYZE_ROWS}")
        sql("PRAGMA busy_timeout = 0")  # statistics are a hint: a query never waits for a writer to take them
        try:
            with self._cache.transact(retry=False):
                for name in names:
                    sql(f"ANALYZE {name}")
        except (sqlite3.OperationalError, diskcache.Timeout) as exc:  # busy, or a full disk
            self._analyzed.discard(collection)  # the next query tries again
            log.debug("capsule_nb: no index statistics for %r yet: %s", collection, exc)
        finally:
            sql(f"PRAGMA busy_timeout = {waits}")

    def _indexes(self, collection: str) -> list[str]:
        """The columns (after ``collection`` for shared ones) of the indexes serving ``collection``."""
        return [columns for _, columns in self._listed(collection)]

    def _listed(self, collection: str) -> list[tuple[str, str]]:
        quoted = literal(collection)
        own = None if quoted is None else f") WHERE collection = {quoted}"
        found = []
        for name, sql in self._cache._sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name GLOB ?",
                                          (_PREFIX + "*",)).fetchall():
            body = sql.partition(" ON capsule_docs (")[2]
            if body.startswith(_SHARED):
                found.append((name, body[len(_SHARED):-1]))
            elif own is not None and body.endswith(own):
                found.append((name, body[:-len(own)]))
        return found
