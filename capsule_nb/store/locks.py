"""The keys of ``lock=`` tasks: which run holds each, kept in rows of the store's database.

A key is taken in one SQLite transaction, so two processes can never both win it.
A key whose holder has ended, or whose holding process died, is free; one held by a
run whose process died but whose worker process still runs its body stays held
until the worker has gone, so a queued run never overlaps the body.
"""

from __future__ import annotations

import time
from typing import Callable

import diskcache

from ..record import FINISHED, RunRecord
from .feed import LOCK
from .owners import owner_alive, worker_alive
from .rows import Rows

UNWRITTEN_SECONDS = 10.0  # a key's holder with no record for longer than this is gone (pruned, deleted)


class KeyLocks:
    def __init__(self, cache: diskcache.Cache, rows: Rows, get_run: Callable[[str], RunRecord | None]):
        self._cache = cache
        self._rows = rows
        self._get_run = get_run

    def acquire(self, key: str, task_id: str, owner: str) -> str | None:
        """Take ``key`` for ``task_id`` unless a live, unfinished run holds it: None on
        success, else the holder's task id."""
        with self._cache.transact(retry=True):
            held = self._rows.read(LOCK + key)
            if held is not None and held["task_id"] != task_id:
                if owner_alive(held["owner"]):
                    holder = self._get_run(held["task_id"])
                    if holder is not None and holder["status"] not in FINISHED:
                        return held["task_id"]
                    if holder is None and time.time() - held["at"] < UNWRITTEN_SECONDS:
                        return held["task_id"]  # its write is still in its process's buffer
                elif worker_alive(held):  # its kernel died; the worker running its body dies in a moment
                    return held["task_id"]
            self._cache.set(LOCK + key, {"task_id": task_id, "owner": owner, "at": time.time()})
        return None

    def note_worker(self, key: str, task_id: str, worker: str) -> None:
        """Note that ``task_id``, holding ``key``, runs in the process ``worker``, a worker that
        dies with its owner: if the owner dies first, the key stays held until the worker has."""
        with self._cache.transact(retry=True):
            held = self._rows.read(LOCK + key)
            if held is not None and held["task_id"] == task_id:
                self._cache.set(LOCK + key, {**held, "worker": worker})

    def release(self, key: str, task_id: str) -> None:
        with self._cache.transact(retry=True):
            held = self._rows.read(LOCK + key)
            if held is not None and held["task_id"] == task_id and not (
                    worker_alive(held) and not owner_alive(held["owner"])):
                self._cache.delete(LOCK + key)  # (recovery settling a dead kernel's run leaves a live body's key held)
