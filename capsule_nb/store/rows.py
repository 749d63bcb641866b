"""Rows as they are found on disk: what the store may use, and what it sets aside.

A store is shared by processes, versions and people, so a row can be
anything: a pickle, broken JSON, a list where a record belongs, a record
without a status. One such row must not lock out the store. ``Rows.read``
gives a row's value only when it has the shape its key promises; any other
row reads as missing, with one warning per key naming it, and is listed by
``capsule-nb doctor`` (``doctor.py``), which can move it aside.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import diskcache

from ..errors import StoreError
from ..record import short_repr, validate
from .disk import SIGNATURE_BYTES, batches, marks
from .feed import CANCEL, DOC, ENTRY, LOCK, PAYLOAD, RUN, SEQ_LIMIT, good_seq, past, split_doc_key

log = logging.getLogger("capsule_nb")

SCHEDULE = "sched/"
CELL_REPEATS = "cell/"  # the repeats a notebook cell's last run started (``tasks.Task.schedule``)
APP_SETTINGS = "app/"  # an app's settings that hold for every process opening it (``App._retention``)
REFRESH = "refresh/"  # when another process last asked to push a run's deadline on (``refreshes``)
SESSION_DATA = "session/"  # a session's ``data``, a JSON object (``session_data.SessionData``)
ALIVE = "alive"  # when each process with runs running was last seen alive (``heartbeats``)


def run_keys(task_id: str) -> tuple[str, ...]:
    """Every row a run may have: its record, its payloads, the requests about it."""
    return (RUN + task_id, f"{PAYLOAD}{task_id}/result", f"{PAYLOAD}{task_id}/args", CANCEL + task_id,
            REFRESH + task_id)


def same_run(key: str) -> tuple[str, ...]:
    """The rows of the run whose row ``key`` is (none for a row of no run): what the writer
    commits together with ``key`` (``WriteBehind._take``)."""
    if key.startswith(PAYLOAD):
        return run_keys(key[len(PAYLOAD):].rpartition("/")[0])
    for prefix in (RUN, CANCEL, REFRESH):
        if key.startswith(prefix):
            return run_keys(key[len(prefix):])
    return ()


def problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the row ``key``, or None."""
    if key.startswith(RUN):
        return validate(value, key[len(RUN):])
    if key.startswith(DOC):
        doc_id = split_doc_key(key)[1]
        if type(value) is not dict or value.get("_id") != doc_id:
            return f"a document is a JSON object whose _id is {doc_id!r}, not {short_repr(value, 60)}"
    elif key.startswith(LOCK):
        if type(value) is not dict or not all(type(value.get(k)) is str for k in ("task_id", "owner")):
            return f"a lock is {{task_id, owner}}, not {short_repr(value, 60)}"
    elif key.startswith((CANCEL, SCHEDULE, CELL_REPEATS, APP_SETTINGS, REFRESH, SESSION_DATA)):
        if type(value) is not dict:
            return f"expected a JSON object, not {short_repr(value, 60)}"
    elif key.startswith(ENTRY):
        if type(value) is not list or not all(type(k) is str for k in value):
            return f"a change-feed entry is a list of keys, not {short_repr(value, 60)}"
    elif key.startswith(PAYLOAD):
        if type(value) is not bytes or len(value) < SIGNATURE_BYTES:
            return f"a payload is signed bytes, not {short_repr(value, 60)}"
    elif key == "seq" and not good_seq(value):
        return f"the change-feed counter is a whole number from 0 to {SEQ_LIMIT - 1}, not {short_repr(value, 60)}"
    return None


class Rows:
    """Reads rows for one store; a bad row reads as None and is remembered in ``bad``."""

    def __init__(self, cache: diskcache.Cache, where: Path):
        self._cache = cache
        self._where = where
        self.bad: dict[str, str] = {}  # key -> what is wrong with it (rows skipped in this process)

    def read(self, key: str) -> Any:
        try:
            value = self._cache.get(key)
        except StoreError as exc:  # a pickle, broken JSON, a value file outside the store
            return self._skip(key, str(exc))
        return None if value is None else self.check(key, value)

    def check(self, key: str, value: Any, wrong: str | None = None,
              also: Callable[[Any], str | None] | None = None) -> Any:
        """``value`` if it has the shape ``key`` promises, nothing else is ``wrong``, and
        ``also`` (a further test of a value of that shape) finds nothing; else None."""
        wrong = wrong or problem(key, value) or (also(value) if also is not None else None)
        if wrong is not None:
            return self._skip(key, wrong)
        self.bad.pop(key, None)
        return value

    def present(self, keys: list[str]) -> list[str]:
        """Those of ``keys`` that have a row (one query per 500 keys, on diskcache's key index)."""
        found: list[str] = []
        for chunk in batches(keys):
            found += [key for (key,) in self._cache._sql(
                f"SELECT key FROM Cache WHERE raw = 1 AND key IN ({marks(len(chunk))})", chunk)]
        return found

    def scan(self, prefix: str, *, after: str | None = None, limit: int = -1) -> list[tuple[str, Any]]:
        """``[(key, value)]`` of the rows whose key starts with ``prefix`` (after the key
        ``after``), in key order, in one query on diskcache's key index; a bad row reads
        as None. Listings use it instead of walking every key in the store."""
        rows = self._cache._sql(
            "SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key > ? AND key < ? ORDER BY key LIMIT ?",
            (after or prefix, past(prefix), limit)).fetchall()  # (the bare prefix is no key of ours)
        found = []
        for key, mode, filename, raw in rows:
            if type(key) is not str:  # a key that is not UTF-8 text (``disk.NotUTF8``): doctor lists it
                continue
            try:
                value = self._cache.disk.fetch(mode, filename, raw, False)
            except StoreError as exc:
                found.append((key, self._skip(key, str(exc))))
                continue
            found.append((key, self.check(key, value)))
        return found

    def move(self, prefix: str, take: Callable[[list[tuple[str, Any]]], None]) -> int:
        """Hand the good rows under ``prefix`` to ``take`` (which writes them into their own
        table) and delete them, a batch per transaction, so two processes doing it at once
        move each row once; a bad row stays, for ``capsule-nb doctor``. Returns how many moved.
        How stores made before a table of runs or documents are brought to it, at open."""
        moved, after = 0, None
        while True:
            with self._cache.transact(retry=True):
                batch = self.scan(prefix, after=after, limit=2000)
                if not batch:
                    return moved
                after = batch[-1][0]
                good = [(key, value) for key, value in batch if value is not None]
                take(good)
                for key, _ in good:
                    self._cache.delete(key)
                moved += len(good)

    def _skip(self, key: str, wrong: str) -> None:
        if self.bad.get(key) != wrong:  # one warning per key (and per new problem), not one per poll
            log.warning("capsule_nb: row %r in %s skipped: %s (`capsule-nb doctor` lists bad rows "
                        "and can move them aside)", key, self._where, wrong)
        self.bad[key] = wrong
        return None
