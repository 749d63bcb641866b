"""Change feed: every run record the store accepts becomes an event.

Publishing happens in the thread that wrote (a task thread, the loop, the
store's poller), so subscribers must be quick and thread-safe: waiters hop
to their own loop with ``call_soon_threadsafe``; widgets coalesce and push
at their own rate. Nothing here knows about widgets or the runtime.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Callable

from ..record import FINISHED

Record = dict[str, Any]
Listener = Callable[[Record], None]

log = logging.getLogger("capsule_nb")


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: tuple[Listener, ...] = ()
        self._ends: tuple[Listener, ...] = ()  # told only of finished records
        self._by_run: dict[str, tuple[Listener, ...]] = defaultdict(tuple)
        self._vanished: tuple[Callable[[str], None], ...] = ()

    def subscribe(self, listener: Listener, task_id: str | None = None, *,
                  ends: bool = False) -> Callable[[], None]:
        """Call ``listener(record)`` on every change (or those of one run, or with ``ends`` only
        the changes that finish a run); returns an unsubscribe."""
        if ends and task_id is not None:
            raise ValueError("subscribe to one run's changes or to every run's ends, not both")
        with self._lock:
            if ends:
                self._ends += (listener,)
            elif task_id is None:
                self._all += (listener,)
            else:
                self._by_run[task_id] += (listener,)

        def unsubscribe() -> None:
            with self._lock:
                if ends:
                    self._ends = tuple(x for x in self._ends if x is not listener)
                elif task_id is None:
                    self._all = tuple(x for x in self._all if x is not listener)
                else:
                    rest = tuple(x for x in self._by_run.get(task_id, ()) if x is not listener)
                    if rest:
                        self._by_run[task_id] = rest
                    else:
                        self._by_run.pop(task_id, None)

        return unsubscribe

    def on_vanished(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(task_id)`` when a run this process knew unfinished is gone from the
        disk before its end was seen here (another process pruned or deleted it meanwhile):
        nothing will ever publish its end, so whoever waits for it must be told."""
        with self._lock:
            self._vanished += (listener,)

        def off() -> None:
            with self._lock:
                self._vanished = tuple(x for x in self._vanished if x is not listener)

        return off

    def vanish(self, task_id: str) -> None:
        for listener in self._vanished:
            try:
                listener(task_id)
            except Exception:
                log.exception("capsule_nb event listener failed")

    def publish(self, record: Record) -> None:
        """Each change of a run goes by (the store publishes every one), so a change nobody
        listens to (a run starting, with only waiters for ends about) costs two lookups."""
        listeners = self._all
        if self._by_run:
            listeners += self._by_run.get(record["task_id"], ())
        if self._ends and record["status"] in FINISHED:
            listeners += self._ends
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # one bad subscriber must not stop the feed
                log.exception("capsule_nb event listener failed")
