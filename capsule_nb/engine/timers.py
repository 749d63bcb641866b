"""One timer thread for every deadline: scheduled starts, retry delays, timeouts.

Why not ``loop.call_later``: a blocking cell stops the kernel's loop, and a
thread task's timeout or a sync task's start must not wait for the cell.
Why re-check every 30 s: the monotonic clock stops while a laptop sleeps,
so a long wait is cut into short ones against the wall clock, and a tick
due during a suspend fires once, promptly, on wake-up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("capsule_nb")

MAX_WAIT = 30.0


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` in the timer thread at wall-clock time ``when`` (keep it quick)."""
        timer = Timer(when, callback)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._counter), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="capsule-timers", daemon=True)
                self._thread.start()
            self._cond.notify()
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.time() + delay, callback)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    now = time.time()
                    if self._heap and self._heap[0][0] <= now:
                        timer = heapq.heappop(self._heap)[2]
                        break
                    wait = MAX_WAIT if not self._heap else min(MAX_WAIT, self._heap[0][0] - now)
                    self._cond.wait(wait)
            if timer.cancelled:
                continue
            try:
                timer.callback()
            except Exception:
                log.exception("capsule_nb timer callback failed")
