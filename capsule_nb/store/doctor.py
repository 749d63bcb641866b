"""``capsule-nb doctor``: find the rows a store skips, and move them aside.

It reads the SQLite tables itself rather than through a ``Store``, so it
works on a store too damaged to open (its change-feed counter broken, say).
Every value is decoded by ``JSONDisk`` exactly as the store would, so
nothing is unpickled and no value file outside the store is opened; a
payload's signature is checked, its bytes never loaded. A row of the run
table (``runs.py``) is judged as the store judges it (``runs.decode``,
``record.validate``, ``runs.disagreement``) and named ``run/<task_id>``, as
runs were named before they had a table. The run counts that triggers keep
beside it are compared with a count of the table itself: counts that lie
would hide runs from boards and from recovery at open.

First it asks SQLite to check the database's pages: a damaged page is no
bad row that can be moved, so doctor then says how to recover what can be
read, and moves nothing.

"Moved aside" means copied, whole and unchanged, into ``quarantine.db`` in
the store folder (which nothing in capsule_nb reads), then deleted from the
store by row id in one transaction, which also rebuilds counts that are
wrong. A row whose value file is outside the store loses only its row: that
file is never touched.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import StoreError
from .disk import SIGNATURE_BYTES, JSONDisk, NotUTF8, Signer, lenient, marks
from .feed import PAYLOAD
from .folder import check_database_kept, load_key, prepare_folder
from .rows import problem
from .runs import READ, create_tables, decode, disagreement

QUARANTINE = "quarantine.db"
CACHE, RUNS, COUNTS = "Cache", "capsule_runs", "capsule_run_counts"  # the tables doctor looks at
_COLUMNS = "key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value"
_MOVED = {CACHE: "moved", RUNS: "moved_runs"}  # where quarantine.db keeps the rows of each table
_READ = {CACHE: "rowid, key, raw, mode, filename, value", RUNS: f"rowid, {READ}"}
_GROUPS = "app, task_name, coalesce(session_id, ''), status"  # how the triggers count runs
_REAL_COUNTS = f"SELECT {_GROUPS}, count(*) FROM {RUNS} GROUP BY {_GROUPS}"


class BadRow(NamedTuple):
    row: int  # SQLite row id in ``table`` (0 for the counts, judged as a whole)
    key: str | None  # None: the key itself is a pickle, not text
    problem: str
    value: Any  # what could be read of it (None when nothing could)
    table: str = CACHE

    @property
    def name(self) -> str:
        return self.key if self.key is not None else f"<pickled key, row {self.row}>"


class Fixed(NamedTuple):
    quarantine: Path
    moved: int  # rows moved aside
    recounted: bool  # the run counts were wrong and are rebuilt


def examine(path: Path) -> list[BadRow]:
    """Every row of the store at ``path`` that the store would skip, and why; then the
    run counts, when they disagree with the runs."""
    with _Doctor(path) as doctor:
        doctor.check_pages()
        tables = [CACHE, RUNS] if doctor.has(RUNS) else [CACHE]  # (no run table: a store made before it)
        bad = [doctor.verdict(table, row) for table in tables
               for row in doctor.sql(f"SELECT {_READ[table]} FROM {table} ORDER BY rowid")]
        if RUNS in tables:
            wrong = doctor.miscounted()
            if wrong is not None:
                bad.append(BadRow(0, COUNTS, wrong, None, COUNTS))
        return [row for row in bad if row is not None]


def move_aside(path: Path, rows: list[BadRow]) -> Fixed:
    """Move ``rows`` (still bad when looked at again, inside the transaction) to
    ``quarantine.db``, and rebuild the run counts if they are (still) wrong."""
    target = path / QUARANTINE
    with _Doctor(path) as doctor:
        doctor.sql("BEGIN IMMEDIATE")
        try:
            moving: dict[str, list[tuple]] = {CACHE: [], RUNS: []}
            for row in rows:
                if row.table not in moving:
                    continue
                found = doctor.sql(f"SELECT {_READ[row.table]} FROM {row.table} WHERE rowid = ?",
                                   (row.row,)).fetchone()
                bad = found and doctor.verdict(row.table, found)
                if bad:
                    moving[row.table].append((time.time(), bad.problem, row.row, *doctor.whole(row.table, row.row)))
            if any(moving.values()):
                _keep(target, {table: (doctor.columns(table), found) for table, found in moving.items() if found})
                for table, found in moving.items():  # (kept there, committed, before anything is deleted here)
                    doctor.connection.executemany(f"DELETE FROM {table} WHERE rowid = ?", [(m[2],) for m in found])
            recounted = doctor.has(RUNS) and doctor.miscounted() is not None
            if recounted:
                doctor.recount()
            doctor.sql("COMMIT")
        except BaseException:
            doctor.sql("ROLLBACK")
            raise
    return Fixed(target, sum(map(len, moving.values())), recounted)


def _keep(target: Path, moving: dict[str, tuple[list[str], list[tuple]]]) -> None:
    """Write ``{table: (its columns, rows)}`` to quarantine.db, each table's rows to its own table there."""
    try:
        _write_kept(target, moving)
    except (OSError, sqlite3.Error) as exc:  # its own fault, not the store's: said so, nothing deleted
        raise StoreError(f"cannot keep the bad rows in {target}: {exc}; nothing was moved. Move {target} "
                         f"aside (it holds rows moved before) and run `capsule-nb doctor --fix` again") from None


def _write_kept(target: Path, moving: dict[str, tuple[list[str], list[tuple]]]) -> None:
    if not target.exists():
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    with sqlite3.connect(target, timeout=60) as quarantine:
        for table, (columns, rows) in moving.items():
            moved = _MOVED[table]
            quarantine.execute(f"CREATE TABLE IF NOT EXISTS {moved} (moved_at REAL, problem TEXT, rowid_was INTEGER, "
                               f"{', '.join(columns)})")
            there = {info[1] for info in quarantine.execute(f"PRAGMA table_info({moved})")}
            for column in columns:  # a table that gained a column since quarantine.db was made
                if column not in there:
                    quarantine.execute(f"ALTER TABLE {moved} ADD COLUMN {column}")
            quarantine.executemany(f"INSERT INTO {moved} (moved_at, problem, rowid_was, {', '.join(columns)}) "
                                   f"VALUES ({marks(3 + len(columns))})", rows)
    quarantine.close()


class _Doctor:
    """The store's tables, its disk (to decode values as the store does) and its key."""

    def __init__(self, path: Path):
        if not (path / "db" / "cache.db").is_file():
            check_database_kept(path)  # (a store that lost it says so)
            raise StoreError(f"{path} is not a capsule_nb store (no db/cache.db)")
        prepare_folder(path)
        self._path = path
        self._signer = Signer(load_key(path), path)
        self._disk = JSONDisk(str(path / "db"))
        self._columns: dict[str, list[str]] = {}
        self.connection = lenient(sqlite3.connect(path / "db" / "cache.db", timeout=60, isolation_level=None))
        self.sql = self.connection.execute

    def __enter__(self) -> "_Doctor":
        return self

    def __exit__(self, kind: Any, exc: Any, trace: Any) -> None:
        self.connection.close()
        if isinstance(exc, sqlite3.DatabaseError):  # a garbage file, a table not as we made it
            raise StoreError(f"cannot read the capsule_nb store at {self._path}: {exc}") from exc

    def check_pages(self) -> None:
        """Refuse a database whose pages SQLite cannot read (a torn write, a bad sector): no row
        there can be judged or moved, and "no bad rows" would be a false all-clear."""
        try:
            found = [" ".join(message.split()) for (message,) in self.sql("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as exc:
            found = [str(exc)]
        if found != ["ok"]:
            db = self._path / "db" / "cache.db"
            raise StoreError(
                f"the database {db} is damaged beyond bad rows (SQLite: {'; '.join(found)}), so doctor moves "
                f"nothing. Stop the processes using the store, keep a copy of {self._path}, then copy what can "
                f"be read into a new database (`sqlite3 {db} .recover | sqlite3 recovered.db`, then put "
                f"recovered.db in its place) or restore a backup")

    def has(self, table: str) -> bool:
        found = self.sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return found is not None

    def columns(self, table: str) -> list[str]:
        if table not in self._columns:
            self._columns[table] = (_COLUMNS.split(", ") if table == CACHE
                                    else [info[1] for info in self.sql(f"PRAGMA table_info({table})")])
        return self._columns[table]

    def whole(self, table: str, rowid: int) -> tuple:
        """Every column of one row, as it is."""
        return self.sql(f"SELECT {', '.join(self.columns(table))} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()

    def verdict(self, table: str, found: tuple) -> BadRow | None:
        return self._run_verdict(found) if table == RUNS else self._cache_verdict(found)

    def _cache_verdict(self, found: tuple) -> BadRow | None:
        rowid, key, raw, mode, filename, value = found
        if not raw:
            return BadRow(rowid, None, "its key is a pickle (not written by capsule_nb)", None)
        if type(key) is NotUTF8:
            return BadRow(rowid, bytes(key).decode(errors="backslashreplace"), "its key is not UTF-8 text", None)
        if type(key) is not str:
            return BadRow(rowid, None, f"its key is {type(key).__name__}, not text", None)
        try:
            decoded = self._disk.fetch(mode, filename, value, False)
        except StoreError as exc:
            return BadRow(rowid, key, str(exc), None)
        wrong = problem(key, decoded)
        if wrong is None and key.startswith(PAYLOAD) and not self._signer.signed_by_us(key, decoded):
            wrong = (f"its signature is not this store's for this row ({SIGNATURE_BYTES}-byte HMAC with "
                     f"its key): forged, or moved here from another row")
        return None if wrong is None else BadRow(rowid, key, wrong, decoded)

    @staticmethod
    def _run_verdict(found: tuple) -> BadRow | None:
        rowid, task_id, *columns, text = found
        key, value, wrong = decode(task_id, text)
        wrong = wrong or problem(key, value) or disagreement(columns, value)
        return None if wrong is None else BadRow(rowid, key, wrong, value, RUNS)

    def miscounted(self) -> str | None:
        """How the kept run counts differ from the runs in the table (None: they agree)."""
        if not self.has(COUNTS):
            return "the table is missing: the store would count no runs (`--fix` makes it again)"
        real = {tuple(row[:-1]): row[-1] for row in self.sql(_REAL_COUNTS)}
        kept = {tuple(row[:-1]): row[-1] for row in self.sql(f"SELECT app, task_name, session_id, status, n "
                                                               f"FROM {COUNTS}") if row[-1] != 0}
        wrong = sorted((group for group in real.keys() | kept.keys() if real.get(group) != kept.get(group)
                        or type(real.get(group)) is not type(kept.get(group))), key=repr)
        if not wrong:
            return None
        app, task_name, session, status = wrong[0]
        return (f"it disagrees with the runs in {len(wrong)} place(s), e.g. it counts {kept.get(wrong[0], 0)!r} "
                f"{status!r} runs of {app!r}/{task_name!r}" + (f" in session {session!r}" if session else "")
                + f" where there are {real.get(wrong[0], 0)}: counts, boards and recovery at open read it "
                f"(`--fix` counts again)")

    def recount(self) -> None:
        """Count the runs again (making the table first, and its triggers, if they are gone)."""
        create_tables(self.sql)
        self.sql(f"DELETE FROM {COUNTS}")
        self.sql(f"INSERT INTO {COUNTS} (app, task_name, session_id, status, n) {_REAL_COUNTS}")
