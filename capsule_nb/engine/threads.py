"""The thread pool that sync runs use.

Why not ``concurrent.futures.ThreadPoolExecutor``: it joins its threads when
the interpreter exits, so one task stuck in a call would keep a script or a
shutting-down kernel alive for ever, and the exit hook that records the run
as interrupted would never get to run. These workers are daemon threads;
they start on demand up to ``max_workers`` and leave after idling a while.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("capsule_nb")

IDLE_SECONDS = 60.0
_WAKE = (None, ())  # wakes an idle thread to see whether it is one too many


class WorkerPool:
    def __init__(self, max_workers: int, name: str = "capsule-task"):
        if max_workers < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_workers!r}")
        self.max_workers = max_workers
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers = 0  # live threads
        self._idle = 0  # threads waiting for a job
        self._pending = 0  # jobs queued and not yet taken
        self._leaving = 0  # threads one too many since ``resize``: the next ones free leave
        self._count = 0

    def resize(self, max_workers: int) -> None:
        """Allow ``max_workers`` threads. A smaller number holds from the next job a thread
        takes, each thread one too many leaving instead of taking it; a bigger one starts
        threads for the jobs already waiting (threads about to leave stay instead)."""
        if max_workers < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_workers!r}")
        with self._lock:
            self.max_workers = max_workers
            staying = self._workers - self._leaving
            excess = max(0, staying - max_workers)
            self._leaving += excess
            kept = min(self._leaving, max(0, max_workers - staying))
            self._leaving -= kept
            spawn = max(0, min(max_workers - self._workers, self._pending - self._idle))
            self._workers += spawn
            names = [f"{self._name}-{self._count + n + 1}" for n in range(spawn)]
            self._count += spawn
            idle = min(excess, self._idle)
        for _ in range(idle):  # (busy ones see it when their job ends)
            self._jobs.put(_WAKE)
        for name in names:
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker; exceptions are logged (runs record their own)."""
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle and self._workers < self.max_workers
            if spawn:
                self._workers += 1
                self._count += 1
                name = f"{self._name}-{self._count}"
        self._jobs.put((fn, args))
        if spawn:
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._leaving:  # one too many since ``resize``: leave before the next job
                    self._leaving -= 1
                    self._workers -= 1
                    return
                self._idle += 1
            try:
                fn, args = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._pending <= self._idle:  # nobody needs this thread
                        self._workers -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                if fn is None:  # ``_WAKE``: back to the top, which says whether to leave
                    continue
                self._pending -= 1
            try:
                fn(*args)
            except BaseException:  # a worker must survive whatever a job does
                log.exception("capsule_nb worker job failed")
