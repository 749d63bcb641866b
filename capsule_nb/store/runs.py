"""Run records in their own indexed SQLite table, so history costs nothing until asked for.

The table lives in diskcache's database file and is written on diskcache's
own connection, so one transaction can change a run, its payloads, its
cancel request and the change feed together, as before. Each row keeps
the record as JSON text (the JSON-only rule holds) beside the few fields
that queries filter on, copied out as columns with indexes behind them:
a page of the newest failed runs of a task is an index walk, not a scan.

``capsule_run_counts`` is kept by triggers inside the same transactions,
so counts by app, task, session and status, a board's lanes and its
filter menus are a read of a few small rows however long the history is.

Stores made before this table (records as diskcache rows ``run/<id>``)
are moved into it once, at open (``adopt``, through ``rows.Rows.move``), a
batch per transaction, so two processes opening an old store at once move
each record once.
"""

from __future__ import annotations

import json
import sqlite3
from functools import lru_cache, partial
from itertools import chain
from operator import add, itemgetter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import diskcache

from ..record import FINISHED, STATUSES, RunRecord, short_repr
from .disk import NotUTF8, batches, dumps_each, marks
from .feed import RUN

COLUMNS = ("app", "task_name", "status", "session_id", "scheduled_for")  # what ``where`` may name
CHECKED = ("app", "task_name", "status", "session_id")  # columns a row's record must agree with (counts use them)
READ = "task_id, app, task_name, status, session_id, record"  # what a read selects: the row, checked
_FINISHED = tuple(sorted(FINISHED))
_UNFINISHED = tuple(sorted(STATUSES - FINISHED))

_ADD_NEW = ("INSERT INTO capsule_run_counts VALUES (new.app, new.task_name, coalesce(new.session_id, ''), "
            "new.status, 1) ON CONFLICT (app, task_name, session_id, status) DO UPDATE SET n = n + 1;")
_REMOVE_OLD = ("UPDATE capsule_run_counts SET n = n - 1 WHERE app = old.app AND task_name = old.task_name "
               "AND session_id = coalesce(old.session_id, '') AND status = old.status;")
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS capsule_runs (
        task_id TEXT NOT NULL UNIQUE,
        app TEXT NOT NULL,
        task_name TEXT NOT NULL,
        status TEXT NOT NULL,
        session_id TEXT,
        scheduled_for REAL,
        finished_at REAL,
        record TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS capsule_runs_by_status ON capsule_runs (status, task_id)",
    "CREATE INDEX IF NOT EXISTS capsule_runs_by_task ON capsule_runs (app, task_name, task_id)",
    "CREATE INDEX IF NOT EXISTS capsule_runs_by_task_status ON capsule_runs (app, task_name, status, task_id)",
    "CREATE INDEX IF NOT EXISTS capsule_runs_by_session ON capsule_runs (session_id, task_id) "
    "WHERE session_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS capsule_runs_by_age ON capsule_runs (app, finished_at) WHERE finished_at IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS capsule_run_counts (
        app TEXT NOT NULL,
        task_name TEXT NOT NULL,
        session_id TEXT NOT NULL,
        status TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (app, task_name, session_id, status)) WITHOUT ROWID""",
    f"CREATE TRIGGER IF NOT EXISTS capsule_runs_counted AFTER INSERT ON capsule_runs BEGIN {_ADD_NEW} END",
    f"CREATE TRIGGER IF NOT EXISTS capsule_runs_uncounted AFTER DELETE ON capsule_runs BEGIN {_REMOVE_OLD} END",
    "CREATE TRIGGER IF NOT EXISTS capsule_runs_recounted AFTER UPDATE OF app, task_name, session_id, status "
    "ON capsule_runs WHEN old.status IS NOT new.status OR old.app IS NOT new.app "
    "OR old.task_name IS NOT new.task_name OR old.session_id IS NOT new.session_id "
    f"BEGIN {_REMOVE_OLD} {_ADD_NEW} END",
)

_INSERT = "INSERT INTO capsule_runs (task_id, app, task_name, status, session_id, scheduled_for, finished_at, record) "
# What the writer binds for each record: its columns as found, then its JSON text. The statement
# works out ``finished_at``, so a batch's parameters are made by C code alone (``_parameters``):
# Python work per row in the writer thread is time-sliced with a busy event loop, 5 ms each
# in turn, and took a quarter of the loop's speed during a burst.
_FIELDS = ("task_id", "app", "task_name", "status", "session_id", "scheduled_for", "completed_at", "created_at")
_fields = itemgetter(*_FIELDS)
_SELECT = (f"SELECT column1, column2, column3, column4, column5, column6, CASE WHEN column4 IN "
           f"({', '.join(map(repr, _FINISHED))}) THEN coalesce(column7, column8) END, column9 FROM ")
# (``WHERE true`` below: SQLite's parser needs it between a SELECT and ON CONFLICT.)
_ROW = "(" + ", ".join("?" * (len(_FIELDS) + 1)) + ")"
# Each statement hands the GIL away and waits to get it back, up to a switch interval (5 ms)
# while the loop is busy, so a batch goes in few statements: pieces of 2,048 rows (18,432
# parameters; SQLite before 3.32 takes 999 at most, so 64 there), then of powers of two, so
# that a dozen distinct statements are ever prepared and cached.
_ROWS_PER_STATEMENT = 2048 if sqlite3.sqlite_version_info >= (3, 32) else 64
# A run's app, task and session never change, so an update leaves those columns (and the
# indexes on them) alone: SQLite rewrites an index when its column is in the SET list.
_UPDATE = (" ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, scheduled_for = excluded.scheduled_for, "
           "finished_at = excluded.finished_at, record = excluded.record")


@lru_cache(maxsize=None)
def _upsert(rows: int) -> str:
    return _INSERT + _SELECT + "(VALUES " + ", ".join([_ROW] * rows) + ") WHERE true" + _UPDATE


_MOVE = _INSERT + _SELECT + "(VALUES " + _ROW + ") WHERE true ON CONFLICT (task_id) DO NOTHING"  # a record moved first stays


def _parameters(records: Sequence[RunRecord]) -> list[Any]:
    """The parameters of ``records``' rows, one after another."""
    try:
        fields = list(map(_fields, records))
    except KeyError:  # a record of an older version may lack an optional field
        fields = [tuple(map(record.get, _FIELDS)) for record in records]
    return list(chain.from_iterable(map(add, fields, zip(dumps_each(records)))))


def create_tables(execute: Callable[..., Any]) -> None:
    """Make whatever of the table, its indexes, the counts and their triggers is missing."""
    for statement in _SCHEMA:
        execute(statement)


def decode(task_id: Any, text: Any) -> tuple[str, Any, str | None]:
    """A row's name (``run/<task_id>``, as users know it), its record, and why it cannot be
    read at all (None: it can; ``record.validate`` and ``disagreement`` judge the rest)."""
    if type(task_id) is NotUTF8:
        return f"{RUN}{bytes(task_id)!r}", None, "its task_id is not UTF-8 text"
    if type(task_id) is not str:
        return f"{RUN}{task_id!r}", None, f"its task_id is {type(task_id).__name__}, not text"
    if type(text) is NotUTF8:
        return RUN + task_id, None, "its record is not UTF-8 text"
    try:
        return RUN + task_id, json.loads(text), None
    except (TypeError, ValueError, RecursionError) as exc:
        return RUN + task_id, None, f"its record is not readable JSON ({type(exc).__name__}: {exc})"


def disagreement(columns: Sequence[Any], record: RunRecord) -> str | None:
    """Which of a row's ``CHECKED`` columns says otherwise than its (valid) record: such a
    row would be found by the wrong filters and counted in the wrong place."""
    for name, column in zip(CHECKED, columns):
        if column != record.get(name):
            return (f"its {name} column says {short_repr(column, 40)} but its record says "
                    f"{short_repr(record.get(name), 40)}")
    return None


def _where(where: Mapping[str, Any], *also: str) -> tuple[str, list[Any]]:
    """SQL for ``{column: value or list of values}`` (an empty list matches nothing) and then
    the conditions ``also``, written in SQL: they come last, so a caller's own parameters
    for them follow the returned ones."""
    clauses, args = [], []
    for column, wanted in where.items():
        if column not in COLUMNS:
            raise ValueError(f"runs cannot be filtered by {column!r}; by one of {COLUMNS}")
        if isinstance(wanted, (list, tuple, set, frozenset)):
            wanted = list(wanted)
            clauses.append(f"{column} IN ({marks(len(wanted))})" if wanted else "0")
            args.extend(wanted)
        elif wanted is None:
            clauses.append(f"{column} IS NULL")
        else:
            clauses.append(f"{column} = ?")
            args.append(wanted)
    clauses += also
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class RunTable:
    """The run records of one store. ``read(key, value, wrong, also)`` (``rows.Rows.check``)
    gives a record, or None for a row that is not one (skipped and reported, never a crash)."""

    def __init__(self, cache: diskcache.Cache, read: Callable[..., Any]):
        self._cache = cache
        self._read = read
        with cache.transact(retry=True):  # (``executescript`` would commit on its own)
            create_tables(self._sql())

    def _sql(self) -> Callable[..., sqlite3.Cursor]:
        """This thread's diskcache connection: inside ``cache.transact()`` our statements
        join its transaction (diskcache keeps one connection per thread)."""
        return self._cache._sql

    def _records(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[RunRecord]:
        """The records of rows selected as ``READ``; a bad row is skipped (one warning)."""
        for task_id, *columns, text in rows:
            key, value, wrong = decode(task_id, text)
            record = self._read(key, value, wrong, partial(disagreement, columns))
            if record is not None:
                yield record

    # ---------------------------------------------------------------- writes

    def write(self, upserts: Sequence[RunRecord], deletes: Sequence[str]) -> None:
        """Call inside ``cache.transact()``. Rows go ``_ROWS_PER_STATEMENT`` to a statement."""
        sql = self._cache._sql
        start = 0
        while start < len(upserts):
            size = min(_ROWS_PER_STATEMENT, 1 << (len(upserts) - start).bit_length() - 1)
            sql(_upsert(size), _parameters(upserts[start : start + size]))
            start += size
        for chunk in batches(deletes):
            sql(f"DELETE FROM capsule_runs WHERE task_id IN ({marks(len(chunk))})", chunk)

    # ----------------------------------------------------------------- reads

    def get(self, task_id: str) -> RunRecord | None:
        rows = self._sql()(f"SELECT {READ} FROM capsule_runs WHERE task_id = ?", (task_id,)).fetchall()
        return next(self._records(rows), None)

    def ids_ending(self, tail: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of runs that end with ``tail`` (no ``*?[`` in it: GLOB's marks)."""
        rows = self._sql()("SELECT task_id FROM capsule_runs WHERE task_id GLOB ? LIMIT ?", ("*" + tail, limit))
        return [task_id for (task_id,) in rows if type(task_id) is str]

    def get_many(self, task_ids: Sequence[str]) -> dict[str, RunRecord]:
        found: dict[str, RunRecord] = {}
        for chunk in batches(task_ids):
            rows = self._sql()(f"SELECT {READ} FROM capsule_runs WHERE task_id IN ({marks(len(chunk))})",
                               chunk).fetchall()
            found.update((r["task_id"], r) for r in self._records(rows))
        return found

    def select(self, where: Mapping[str, Any], *, keep: Callable[[RunRecord], bool] | None = None,
               limit: int | None = None, offset: int = 0, arguments: Mapping[str, Any] | None = None) -> list[RunRecord]:
        """Matching records, newest first; ``keep`` filters further in Python (on arguments).
        With no ``keep`` the page is cut in SQL; with one, rows stream until the page is full.
        ``arguments`` (``{parameter: text or number}``) is tested in SQL first, on the record's
        JSON, so that only rows that may match are decoded: ``keep`` still decides."""
        tests = [(f'$.params."{name}"', value) for name, value in (arguments or {}).items()
                 if type(value) in (str, float, bool) or type(value) is int and -2**63 <= value < 2**63
                 if '"' not in name and "\\" not in name]
        clause, args = _where(where, *["json_extract(record, ?) = ?"] * len(tests))
        args += chain.from_iterable(tests)
        query = f"SELECT {READ} FROM capsule_runs{clause} ORDER BY task_id DESC"
        if keep is None and limit is not None:
            return list(self._records(self._sql()(query + " LIMIT ? OFFSET ?", (*args, limit, offset))))
        chosen: list[RunRecord] = []
        skip = offset
        for record in self._records(self._sql()(query, args)):
            if keep is not None and not keep(record):
                continue
            if skip:
                skip -= 1
                continue
            chosen.append(record)
            if limit is not None and len(chosen) >= limit:
                break
        return chosen

    def unfinished(self) -> list[RunRecord]:
        """Every run not finished: what a store holds in memory (from the status index; the
        counts are not asked, so counts someone tampered with hide no run from recovery)."""
        clause, args = _where({"status": _UNFINISHED})
        return list(self._records(self._sql()(f"SELECT {READ} FROM capsule_runs{clause}", args)))

    def counts(self, where: Mapping[str, Any], by: Sequence[str] = ("status",)) -> dict[tuple[str, ...], int]:
        """``{(values of by): runs}`` from the counts the triggers keep (no scan of the runs)."""
        if "scheduled_for" in where or "scheduled_for" in by:
            raise ValueError("runs are counted by app, task_name, session_id and status")
        where = {k: ("" if v is None else v) for k, v in where.items()}
        clause, args = _where(where)
        group = ", ".join(by)
        rows = self._sql()(f"SELECT {group}, sum(n) FROM capsule_run_counts{clause} GROUP BY {group} "
                           f"HAVING sum(n) > 0", args).fetchall()
        return {tuple(row[:-1]): row[-1] for row in rows}

    def values(self, column: str) -> list[str]:
        """The values ``column`` (app, task_name or session_id) takes in runs that exist."""
        if column not in ("app", "task_name", "session_id"):
            raise ValueError(f"no list of values for {column!r}")
        rows = self._sql()(f"SELECT DISTINCT {column} FROM capsule_run_counts WHERE n > 0 AND {column} != '' "
                           f"ORDER BY {column}").fetchall()
        return [value for (value,) in rows if type(value) is str]  # (not a bad row's NotUTF8)

    def finished(self, app: str | None) -> int:
        """Finished runs of ``app`` (None: of every app), from the kept counts."""
        return sum(self.counts({**({"app": app} if app is not None else {}), "status": _FINISHED}).values())

    def oldest_finished(self, app: str | None, *, keep: int | None = None, before: float | None = None,
                        settled_before: float | None = None) -> list[str]:
        """Ids of finished runs (of ``app``, or all) beyond the ``keep`` newest, of those finished
        before ``settled_before``; or finished before ``before``: what retention and
        ``capsule-nb prune`` delete."""
        where = {"app": app} if app is not None else {}
        doomed: list[str] = []
        if keep is not None:
            total = self.finished(app)
            if total > keep:
                clause, args = _where(where, "finished_at IS NOT NULL" if settled_before is None else "finished_at < ?")
                doomed += [i for (i,) in self._sql()(
                    f"SELECT task_id FROM capsule_runs{clause} ORDER BY finished_at, task_id LIMIT ?",
                    (*args, *(() if settled_before is None else (settled_before,)), total - keep)).fetchall()]
        if before is not None:
            clause, args = _where(where, "finished_at < ?")
            doomed += [i for (i,) in self._sql()(f"SELECT task_id FROM capsule_runs{clause}",
                                                  (*args, before)).fetchall()]
        return list(dict.fromkeys(doomed))

    # ------------------------------------------------------------- migration

    def adopt(self, rows: list[tuple[str, RunRecord]]) -> None:
        """Take in records kept as diskcache rows ``run/<id>`` (stores made before this table;
        ``rows.Rows.move``), keeping any already here. Call inside ``cache.transact()``."""
        width = len(_FIELDS) + 1
        values = _parameters([record for _, record in rows])
        self._cache._con.executemany(_MOVE, [values[i : i + width] for i in range(0, len(values), width)])
