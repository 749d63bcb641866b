"""``capsule-nb doctor``: find the rows a store skips, and move them aside.

It reads the SQLite table itself rather than through a ``Store``, so it
works on a store too damaged to open (its change-feed counter broken, say).
Every value is decoded by ``JSONDisk`` exactly as the store would, so
nothing is unpickled and no value file outside the store is opened; a
payload's signature is checked, its bytes never loaded.

"Moved aside" means copied, whole and unchanged, into ``quarantine.db`` in
the store folder (which nothing in capsule_nb reads), then deleted from the
store by row id in one transaction. A row whose value file is outside the
store loses only its row: that file is never touched.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import StoreError
from .disk import SIGNATURE_BYTES, JSONDisk, Signer
from .feed import PAYLOAD
from .folder import load_key, prepare_folder
from .rows import problem

QUARANTINE = "quarantine.db"
_COLUMNS = "key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value"


class BadRow(NamedTuple):
    row: int  # SQLite row id
    key: str | None  # None: the key itself is a pickle, not text
    problem: str
    value: Any  # what could be read of it (None when nothing could)

    @property
    def name(self) -> str:
        return self.key if self.key is not None else f"<pickled key, row {self.row}>"


def examine(path: Path) -> list[BadRow]:
    """Every row of the store at ``path`` that the store would skip, and why."""
    with _Doctor(path) as doctor:
        rows = doctor.sql("SELECT rowid, key, raw, mode, filename, value FROM Cache ORDER BY rowid").fetchall()
        return [bad for bad in map(doctor.verdict, rows) if bad is not None]


def move_aside(path: Path, rows: list[BadRow]) -> tuple[Path, int]:
    """Move ``rows`` (still bad when looked at again, inside the transaction) to
    ``quarantine.db``; returns its path and how many rows were moved."""
    target = path / QUARANTINE
    with _Doctor(path) as doctor:
        doctor.sql("BEGIN IMMEDIATE")
        try:
            moving = []
            for row in rows:
                found = doctor.sql("SELECT rowid, key, raw, mode, filename, value FROM Cache WHERE rowid = ?",
                                   (row.row,)).fetchone()
                bad = found and doctor.verdict(found)
                if bad:
                    whole = doctor.sql(f"SELECT {_COLUMNS} FROM Cache WHERE rowid = ?", (row.row,)).fetchone()
                    moving.append((time.time(), bad.problem, row.row, *whole))
            if moving:
                _keep(target, moving)  # committed there before anything is deleted here
                doctor.connection.executemany("DELETE FROM Cache WHERE rowid = ?", [(m[2],) for m in moving])
            doctor.sql("COMMIT")
        except BaseException:
            doctor.sql("ROLLBACK")
            raise
    return target, len(moving)


def _keep(target: Path, moving: list[tuple]) -> None:
    if not target.exists():
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    with sqlite3.connect(target, timeout=60) as quarantine:
        quarantine.execute(f"CREATE TABLE IF NOT EXISTS moved (moved_at REAL, problem TEXT, rowid_was INTEGER, "
                           f"{_COLUMNS})")
        marks = ", ".join("?" * len(moving[0]))
        quarantine.executemany(f"INSERT INTO moved VALUES ({marks})", moving)
    quarantine.close()


class _Doctor:
    """The store's table, its disk (to decode values as the store does) and its key."""

    def __init__(self, path: Path):
        if not (path / "db" / "cache.db").is_file():
            raise StoreError(f"{path} is not a capsule_nb store (no db/cache.db)")
        prepare_folder(path)
        self._signer = Signer(load_key(path), path)
        self._disk = JSONDisk(str(path / "db"))
        self.connection = sqlite3.connect(path / "db" / "cache.db", timeout=60, isolation_level=None)
        self.sql = self.connection.execute

    def __enter__(self) -> "_Doctor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.connection.close()

    def verdict(self, found: tuple) -> BadRow | None:
        rowid, key, raw, mode, filename, value = found
        if not raw:
            return BadRow(rowid, None, "its key is a pickle (not written by capsule_nb)", None)
        if type(key) is not str:
            return BadRow(rowid, None, f"its key is {type(key).__name__}, not text", None)
        try:
            decoded = self._disk.fetch(mode, filename, value, False)
        except StoreError as exc:
            return BadRow(rowid, key, str(exc), None)
        wrong = problem(key, decoded)
        if wrong is None and key.startswith(PAYLOAD) and not self._signer.signed_by_us(decoded):
            wrong = f"its signature is not this store's ({SIGNATURE_BYTES}-byte HMAC of its key)"
        return None if wrong is None else BadRow(rowid, key, wrong, decoded)
