"""One thread that reads every worker of a pool.

Why one for all, not one per worker: the parent of a burst of process runs is bound by
the GIL, and each blocking call (a ``poll``, a read) gives the GIL away and waits to
get it back behind the submitting thread, the event loop and the other readers. One
thread waits once for whatever any worker sent and handles all of it; a worker that
finished is handed its next job at once. The done callbacks of the jobs that ended wait
until nothing more has arrived (or for at most ``_HOLD_ROUNDS`` such rounds), then run
back to back: runs ending together are told to their waiters together, so the event
loop wakes once for a batch of them, not once for each (in a burst of no-op task runs,
that was a sixth of the parent's CPU per run).

A worker's death is seen on its sentinel (the forkserver's status pipe), which tells of
it even when the worker's own children keep its pipe open; it is handled once everything
the worker sent before dying has been read, and after the process is reaped. A sentinel
that closes because the forkserver died first (ipykernel ends it at a shutdown) is no
death: the worker is watched through a pidfd from then on.

The price: a done callback or an ``on_message`` that blocks holds up every worker's
news, not only its own worker's (the runtime's are quick: a store change, a hand-over);
and while workers keep sending, a job's done callback runs a few rounds after ``wait()``
returns (which the settling itself wakes).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import threading
from typing import TYPE_CHECKING

from .worker import Worker

if TYPE_CHECKING:
    from .pool import ProcessPool

log = logging.getLogger("capsule_nb")
_HOLD_ROUNDS = 32  # rounds the done callbacks may wait for while more keeps arriving


class _Watched:
    """The listener's own state of one worker."""

    __slots__ = ("worker", "fd", "reading", "orphan")

    def __init__(self, worker: Worker):
        self.worker = worker
        self.fd = worker.conn.fileno()  # its pipe's
        self.reading = True  # its pipe has not ended
        self.orphan: int | None = None  # a pidfd on the worker, once its forkserver died before it


class Listener:
    """The thread that reads a pool's workers: started with the first worker it is given,
    ended once the pool is shut down and its last worker reaped."""

    def __init__(self, pool: "ProcessPool"):
        self._pool = pool
        self._lock = threading.Lock()
        self._joining: list[Worker] = []  # given, not yet watched by the thread
        self._thread: threading.Thread | None = None
        self._wake_fd = -1  # written to when a worker is given to a running thread

    def watch(self, worker: Worker) -> None:
        """Read ``worker`` from now on; its death settles its job through ``pool._died``."""
        with self._lock:
            self._joining.append(worker)
            if self._thread is None:
                wake_read, self._wake_fd = os.pipe()
                os.set_blocking(wake_read, False)
                os.set_blocking(self._wake_fd, False)
                self._thread = threading.Thread(target=self._serve, args=(wake_read,),
                                                name="capsule-process-listener", daemon=True)
                self._thread.start()
            try:
                os.write(self._wake_fd, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _serve(self, wake_read: int) -> None:
        pool = self._pool
        fds = _Fds()
        fds.add(wake_read, None)
        watched = 0
        block, held = True, 0
        while True:
            events = fds.ready(block)
            reading: list[_Watched] = []
            ending: list[_Watched] = []
            for fd, watch in events:
                if watch is None:
                    watched += self._take_new(fds, wake_read)
                elif fd == watch.fd:
                    reading.append(watch)
                else:
                    ending.append(watch)
            for watch in reading:
                self._read(fds, watch)
            for watch in ending:
                if self._ended(fds, watch):
                    watched -= 1
            if events and pool._ended and held < _HOLD_ROUNDS:  # first, see whether more has come meanwhile
                block, held = False, held + 1
                continue
            pool._notify()  # the jobs ended meanwhile, back to back
            block, held = True, 0
            if watched == 0 and pool._closed:
                with self._lock:
                    if not self._joining:
                        self._thread = None
                        os.close(self._wake_fd)
                        os.close(wake_read)
                        return

    def _take_new(self, fds: "_Fds", wake_read: int) -> int:
        try:
            while os.read(wake_read, 512):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            joining, self._joining = self._joining, []
        for worker in joining:
            watch = _Watched(worker)
            fds.add(watch.fd, watch)
            fds.add(worker.process.sentinel, watch)
        return len(joining)

    def _read(self, fds: "_Fds", watch: _Watched) -> None:
        worker = watch.worker
        try:
            messages = worker.frames.read()
        except (EOFError, OSError):  # its end: the sentinel (or pidfd) tells when it is gone
            fds.remove(watch.fd)
            watch.reading = False
            return
        for data in messages:
            try:
                self._pool._handle(worker, pickle.loads(data))
            except Exception:
                log.exception("capsule_nb: bad message from process worker %s", worker.pid)

    def _ended(self, fds: "_Fds", watch: _Watched) -> bool:
        """The sentinel (or pidfd) of ``watch``'s worker is ready: True once it is buried."""
        worker = watch.worker
        if watch.reading and worker.conn.poll(0):
            return False  # what it sent before it died is read first (the next round)
        if watch.orphan is None:
            orphan = worker.outlived_forkserver()
            if orphan is not None:
                fds.remove(worker.process.sentinel)
                watch.orphan = orphan
                fds.add(orphan, watch)
                return False
        if watch.reading:
            fds.remove(watch.fd)
        fds.remove(worker.process.sentinel if watch.orphan is None else watch.orphan)
        worker.process.join()  # reaped (by the forkserver) before anyone hears the job ended
        try:
            self._pool._died(worker, worker.process.exitcode if watch.orphan is None else None,  # an orphan's is unknown
                             worker.crash_dump())
        except Exception:
            log.exception("capsule_nb: could not settle the end of process worker %s", worker.pid)
        if watch.orphan is not None:
            os.close(watch.orphan)
        worker.close()
        worker.gone.set()
        return True


class _Fds:
    """The file descriptors the listener waits on, each with its worker's ``_Watched`` (None:
    the wake-up pipe). ``poll`` itself, not a ``selectors`` selector, whose Python layer cost
    more than the system call in a burst of runs; a few descriptors per worker, so the
    scan ``poll`` makes of them all is no matter."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._owners: dict[int, _Watched | None] = {}

    def add(self, fd: int, owner: _Watched | None) -> None:
        self._poll.register(fd, select.POLLIN)
        self._owners[fd] = owner

    def remove(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._owners[fd]

    def ready(self, block: bool) -> list[tuple[int, _Watched | None]]:
        """What is ready (to read, or at its end), waiting for it if ``block``."""
        owners = self._owners
        return [(fd, owners[fd]) for fd, _ in self._poll.poll(None if block else 0)]
