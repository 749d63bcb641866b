"""Runs waiting for their lock key (``on_lock="queue"``), per key in submit order.

A queued run does not hold its key: the key's holder does, until it finishes and
the first run queued behind it takes the key and starts. So whether a run is in a
queue says whether it holds its key, which a cancel must know (the record's
``queued`` says only how its submit found the key).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..store.store import Store
    from .run import Run


class KeyQueues:
    def __init__(self, store: "Store", owner: str, start: Callable[["Run"], None]):
        self._store = store
        self._owner = owner
        self._start = start
        self._lock = threading.Lock()  # the lists
        self._waking = threading.Lock()  # a settling run and the maintenance pass must not both take a key's next run
        self._queued: dict[str, list[Run]] = {}

    def add(self, run: "Run") -> None:
        """Queue a run on its key, unless a cancel came first (and settled it)."""
        with self._lock:  # (a cancel sets the phase, then takes this lock to look in the queue)
            if run.phase == "waiting":
                self._queued.setdefault(run.lock_key, []).append(run)  # type: ignore[arg-type]

    def take_out(self, run: "Run") -> bool:
        """Take a cancelled run out of its queue: True if it was there, waiting for its key."""
        with self._lock:
            queue = self._queued.get(run.lock_key or "", [])
            if run not in queue:
                return False
            queue.remove(run)
            return True

    def wake_all(self) -> None:
        for key in list(self._queued):
            self.wake(key)

    def wake(self, key: str) -> None:
        """Start the first run queued on ``key`` if the key is free now."""
        with self._waking:
            while True:
                with self._lock:
                    waiting = self._queued.get(key) or []
                    run = waiting[0] if waiting else None
                if run is None or self._store.locks.acquire(key, run.task_id, self._owner) is not None:
                    return
                with self._lock:
                    taken = run in waiting
                    if taken:
                        waiting.remove(run)
                    if not waiting:
                        self._queued.pop(key, None)
                if taken:
                    break
                self._store.locks.release(key, run.task_id)  # a cancel took it out meanwhile: the next one
        self._start(run)
