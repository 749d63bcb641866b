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

Record = dict[str, Any]
Listener = Callable[[Record], None]

log = logging.getLogger("capsule_nb")


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: tuple[Listener, ...] = ()
        self._by_run: dict[str, tuple[Listener, ...]] = defaultdict(tuple)

    def subscribe(self, listener: Listener, task_id: str | None = None) -> Callable[[], None]:
        """Call ``listener(record)`` on every change (or those of one run); returns an unsubscribe."""
        with self._lock:
            if task_id is None:
                self._all += (listener,)
            else:
                self._by_run[task_id] += (listener,)

        def unsubscribe() -> None:
            with self._lock:
                if task_id is None:
                    self._all = tuple(x for x in self._all if x is not listener)
                else:
                    rest = tuple(x for x in self._by_run.get(task_id, ()) if x is not listener)
                    if rest:
                        self._by_run[task_id] = rest
                    else:
                        self._by_run.pop(task_id, None)

        return unsubscribe

    def publish(self, record: Record) -> None:
        listeners = self._all + self._by_run.get(record["task_id"], ())
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # one bad subscriber must not stop the feed
                log.exception("capsule_nb event listener failed")
