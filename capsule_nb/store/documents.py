"""Collection documents in their own SQLite table, queried there, never held in memory.

``capsule_docs`` lives in diskcache's database file and is written on its
connection, inside its transactions: a change reads the document on disk
and writes it back in one transaction, with its change-feed entry, so
``$inc`` from two processes adds up. ``seq`` is the insertion order (an
update keeps it). A document is JSON text (the JSON-only rule holds).

A query is SQL over ``json_extract(doc, '$."a"."b"')`` of the fields it
names, behind expression indexes, so a filtered, sorted page of a big
collection is a walk of a few index entries.
The caller passes conditions SQL may test (a superset of the matches: it
re-checks every document it is given with ``keep``) and says whether they
are the whole filter (``exact``), which lets ``count`` count in SQL. A
field that holds an array in some document (an index probe tells) is tested
loosely, letting every array through, since an array matches by its elements.
Which indexes exist, and when another is made, is ``doc_indexes.py``.

SQL orders what ``json_extract`` gives: missing and null first, then
numbers (false and true as 0 and 1), then text: strings, and objects and
arrays by their JSON text as stored (``text``). ``json_extract`` reads a
string only up to a NUL character (SQLite's documented limit), so a string
condition can let through a document that differs after one: ``keep``
drops it, and ``count`` re-checks the documents holding one, found through
a partial index that holds only them.

Stores made before this table kept documents as diskcache rows
``doc/<collection>/<id>``; they are moved in once, at open (``adopt``).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import diskcache

from .disk import NotUTF8, marks
from .doc_indexes import DocIndexes
from .feed import Feed, doc_key, split_doc_key

Change = Callable[["dict | None"], "dict | None"]
Condition = tuple[str, str, Any]  # (dotted field, "=" | "in" | ">=" | "<=", value); None: missing or null
Check = Callable[[str, Any, "str | None"], Any]  # ``rows.Rows.check``

_NUL = "instr(doc, '\\u0000') > 0"  # the document has a string holding a NUL character
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS capsule_docs (
        seq INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        doc TEXT NOT NULL CHECK (json_valid(doc)),
        UNIQUE (collection, doc_id))""",
    "CREATE INDEX IF NOT EXISTS capsule_docs_in_order ON capsule_docs (collection)",  # (rowid follows: seq)
    f"CREATE INDEX IF NOT EXISTS capsule_docs_with_nul ON capsule_docs (collection) WHERE {_NUL}",
)
_INSERT = "INSERT INTO capsule_docs (collection, doc_id, doc) VALUES (?, ?, ?) ON CONFLICT (collection, doc_id) "
WALK_SHARE = 100  # a filter matching this many times a page's end walks the sort field's index
_ARRAY_TEXT = ("[", "\\")  # json_extract gives an array as its JSON text, which sorts from "[" up to a backslash
# A field name SQLite finds as written: the stored text does not escape it (see ``text``).
_LABEL = re.compile(r'[^"\\\x00-\x1f\ud800-\udfff]+')
_SURROGATE = re.compile("[\ud800-\udfff]")
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def text(value: Any) -> str:
    """JSON text as stored: UTF-8 as it is (so SQLite finds non-ASCII field names as
    written), escaping only lone surrogates, which UTF-8 cannot carry."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", _encode(value))


def json_path(field: str) -> str | None:
    """``'$."a"."b"'`` for the dotted ``field``, or None when SQLite could not find it as
    written (a name with a quote, a backslash or a control character)."""
    parts = field.split(".")
    if not all(_LABEL.fullmatch(part) for part in parts):
        return None
    return "$" + "".join(f'."{part}"' for part in parts)


def _expr(field: str) -> str:
    """The SQL for a field's value: the same text in every query and index (SQLite uses an
    expression index only for an identical expression)."""
    expr = _path_expr(field)
    if expr is None:
        raise ValueError(f"SQL cannot name the field {field!r}")
    return expr


def _path_expr(field: str) -> str | None:
    path = json_path(field)
    return None if path is None else "json_extract(doc, '{}')".format(path.replace("'", "''"))


def _clause(condition: Condition) -> tuple[str, list[Any], str]:
    """``(SQL, arguments, the expression it tests)``. ``_id`` is also the column ``doc_id``
    (a row whose document says otherwise is skipped), so text ids are looked up there."""
    field, op, value = condition
    values = list(value) if op == "in" else [value]
    if field == "_id" and op in ("=", "in") and all(type(v) is str for v in values):
        return f"doc_id IN ({marks(len(values))})", values, "doc_id"
    expr = _expr(field)
    if op == "=":
        if value is None:
            return f"{expr} IS NULL", [], expr
        if isinstance(value, (bool, int, float)):  # json_extract reads true as 1: its JSON type tells them apart
            kinds = ("'true'" if value else "'false'") if isinstance(value, bool) else "'integer', 'real'"
            return f"({expr} = ? AND {expr.replace('json_extract', 'json_type', 1)} IN ({kinds}))", [value], expr
        return f"{expr} = ?", [value], expr
    if op in (">=", "<="):
        return f"{expr} {op} ?", [value], expr
    if op != "in":
        raise ValueError(f"unknown document condition {op!r}")
    items = [v for v in values if v is not None]
    sql = f"{expr} IN ({marks(len(items))})"
    return (f"({sql} OR {expr} IS NULL)" if len(items) < len(values) else sql), items, expr


def _term(field: str, direction: int) -> str:
    """A sort key, in ``ORDER BY`` and in an index alike."""
    expr = "doc_id" if field == "_id" else _expr(field)
    return f"{expr} DESC" if direction < 0 else expr


class Documents:
    """The documents of one store. ``check(key, value, wrong)`` (``rows.Rows.check``) gives a
    document, or None for a row that is not one (skipped with a warning, never a crash)."""

    def __init__(self, cache: diskcache.Cache, check: Check, feed: Feed):
        self._cache = cache
        self._check = check
        self._feed = feed
        with cache.transact(retry=True):
            for statement in _SCHEMA:
                cache._sql(statement)
        self._indexes = DocIndexes(cache)

    # ---------------------------------------------------------------- writes

    def write(self, collection: str, changes: dict[str, Change]) -> dict[str, dict | None]:
        """Apply ``{doc_id: change(current) -> new or None (delete)}`` in one transaction."""
        written: dict[str, dict | None] = {}
        young = self._indexes.young(collection)
        with self._cache.transact(retry=True):
            sql = self._cache._con
            for doc_id, change in changes.items():
                found = sql.execute("SELECT doc_id, doc FROM capsule_docs WHERE collection = ? AND doc_id = ?",
                                    (collection, doc_id)).fetchall()
                new = change(next(self._documents(collection, found), None))
                if new is None:
                    sql.execute("DELETE FROM capsule_docs WHERE collection = ? AND doc_id = ?", (collection, doc_id))
                else:
                    sql.execute(_INSERT + "DO UPDATE SET doc = excluded.doc", (collection, doc_id, text(new)))
                written[doc_id] = new
            self._feed.announce([doc_key(collection, doc_id) for doc_id in written])
        if young:
            self._indexes.for_fields(collection, written.values(), _path_expr)
        return written

    # ----------------------------------------------------------------- reads

    def select(self, collection: str, where: Sequence[Condition] = (), order: Sequence[tuple[str, int]] = (), *,
               keep: Callable[[dict], bool] | None = None, limit: int | None = None,
               offset: int = 0) -> list[dict[str, Any]]:
        """The documents matching ``where`` and ``keep``, by ``order`` (``[(field, 1 or -1)]``)
        then insertion; rows stream in that order until the page is full."""
        stop = None if limit is None else offset + limit
        clauses, args, _, key = self._where(collection, where, order)
        terms = [_term(field, direction) for field, direction in order]
        walk = self._walk(collection, where, order, key, clauses, args, stop)
        cursor = self._cache._sql(f"SELECT doc_id, doc FROM capsule_docs{walk} WHERE {' AND '.join(clauses)} "
                                  f"ORDER BY {', '.join([*terms, 'seq'])}", args)
        try:
            found = (doc for doc in self._documents(collection, cursor) if keep is None or keep(doc))
            return list(itertools.islice(found, offset, stop))
        finally:
            cursor.close()

    def count(self, collection: str, where: Sequence[Condition] = (), *, keep: Callable[[dict], bool],
              exact: bool) -> int:
        """How many documents match ``where`` and ``keep``: counted in SQL when ``where`` is
        ``exact`` (the documents holding a NUL character re-checked with ``keep``)."""
        if exact:
            clauses, args, exact, _ = self._where(collection, where, ())
        if not exact:
            return len(self.select(collection, where, keep=keep))
        found = self._cache._sql(f"SELECT count(*) FROM capsule_docs WHERE {' AND '.join(clauses)}", args)
        total = found.fetchone()[0]
        rows = self._cache._sql(f"SELECT doc_id, doc FROM capsule_docs WHERE {' AND '.join(clauses)} AND seq IN "
                                f"(SELECT seq FROM capsule_docs INDEXED BY capsule_docs_with_nul "
                                f"WHERE collection = ? AND {_NUL})", [*args, collection]).fetchall()
        return total - len(rows) + sum(1 for doc in self._documents(collection, rows) if keep(doc))

    def _documents(self, collection: str, rows: Iterable[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        for doc_id, stored in rows:
            if type(doc_id) is NotUTF8 or type(stored) is NotUTF8:
                value, wrong = None, "it is not UTF-8 text"
            else:
                try:
                    value, wrong = json.loads(stored), None
                except (TypeError, ValueError, RecursionError) as exc:
                    value, wrong = None, f"it is not readable JSON ({type(exc).__name__}: {exc})"
            doc = self._check(doc_key(collection, doc_id), value, wrong)
            if doc is not None:
                yield doc

    def _where(self, collection: str, where: Sequence[Condition],
               order: Sequence[tuple[str, int]]) -> tuple[list[str], list[Any], bool, list[str]]:
        """The SQL of ``where``, after making the index that serves it sorted by ``order``:
        its equality fields, then its sort fields (unsorted: its first other field).
        Also whether that SQL is all of ``where``: it is not when a field it tests holds
        an array in some document, since an array matches by any of its elements
        (``keep`` decides), so there it lets every array through. And that index's key."""
        tested = [(condition, *_clause(condition)) for condition in where]
        equal = {expr for condition, _, _, expr in tested if condition[1] == "="}
        other = [expr for condition, _, _, expr in tested if condition[1] != "="]
        key = [*sorted(equal), *([_term(field, direction) for field, direction in order] or other[:1])]
        if "doc_id" in equal.union(other) or not key or key[0].split()[0] == "doc_id":
            key = []  # the unique (collection, doc_id) index finds them
        else:
            self._indexes.for_query(collection, key)
        picks, args = self._indexes.where(collection)
        clauses, whole = [picks], True
        for _, sql, values, expr in tested:
            if expr != "doc_id" and self._holds_arrays(collection, expr):
                sql, values, whole = f"({sql} OR ({expr} >= ? AND {expr} < ?))", [*values, *_ARRAY_TEXT], False
            clauses.append(sql)
            args.extend(values)
        return clauses, args, whole, key

    def _walk(self, collection: str, where: Sequence[Condition], order: Sequence[tuple[str, int]],
              key: list[str], clauses: list[str], args: list[Any], stop: int | None) -> str:
        """``INDEXED BY`` the index on the first sort field, for a page of a filtered and sorted
        query on a collection that has no index of the query's whole shape, when the filter
        lets through so many documents (``WALK_SHARE``) that walking them in order fills the
        page sooner than sorting them all. SQLite's planner sorts them all."""
        if not (key and order and stop and any(op == "=" for _, op, _ in where)):
            return ""
        index = self._indexes.walk(collection, key, _term(order[0][0], 1))
        if index is None:
            return ""
        enough = WALK_SHARE * stop
        (found,) = self._cache._sql(f"SELECT count(*) FROM (SELECT 1 FROM capsule_docs WHERE {' AND '.join(clauses)} "
                                    f"LIMIT ?)", (*args, enough)).fetchone()
        return f" INDEXED BY {index}" if found >= enough else ""

    def _holds_arrays(self, collection: str, expr: str) -> bool:
        """Whether some document has an array (or a string starting with "[") at ``expr``:
        an index probe, through the index on ``expr`` made here if none serves it yet."""
        self._indexes.make(collection, [expr])
        picks, args = self._indexes.where(collection)
        return self._cache._sql(f"SELECT 1 FROM capsule_docs WHERE {picks} AND {expr} >= ? AND {expr} < ? LIMIT 1",
                                (*args, *_ARRAY_TEXT)).fetchone() is not None

    # --------------------------------------------------------------- indexes

    def index(self, collection: str, fields: Sequence[str]) -> None:
        """An index on each of ``fields`` (a collection's declared columns), where SQL can name it."""
        for field in fields:
            if json_path(field) is not None and field != "_id":
                self._indexes.make(collection, [_expr(field)])

    # ------------------------------------------------------------- migration

    def adopt(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """Take in documents kept as diskcache rows ``doc/<collection>/<id>`` (stores made
        before this table; ``rows.Rows.move``), keeping any already here. Call inside
        ``cache.transact()``."""
        self._cache._con.executemany(_INSERT + "DO NOTHING", [(*split_doc_key(key), text(doc)) for key, doc in rows])
