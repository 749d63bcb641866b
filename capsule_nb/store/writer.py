"""The write-behind queue: changes accepted in memory, made durable by one thread.

``queue`` takes changes at once (readers in this process see them through
``held`` until they are on disk) and wakes the writer thread, which commits
what is queued in one transaction (``BATCH_KEYS`` at most, unless someone
awaits them). A burst of thousands of status changes is therefore a handful
of transactions, and a run that goes pending -> running -> completed inside
one window is written once.
``flushed(gen)`` lets ``await submit()`` wait until its record is durable.
A disk that refuses writes keeps the changes queued, sets ``failure`` and
is retried; nothing accepted is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..awaitables import resolve
from ..errors import StoreError

log = logging.getLogger("capsule_nb")

NOT_QUEUED = object()  # what ``held`` gives for a key with no change waiting
# Group commit: a small batch nobody awaits waits this long for more changes, so a trickle of
# runs ending one by one is a commit every few milliseconds, not one per run (a commit costs
# about a millisecond of the writer's time whatever its size). ``await submit()`` never waits.
GATHER_SECONDS = 0.003
GATHER_KEYS = 1000
# A batch nobody awaits takes about this many keys, those queued longest ago (``_take``), so the
# writer comes back sooner for what changed meanwhile: in a burst, runs end while their submits'
# records are written, and their ends reach the disk as they come, not all after the last run
# (a fifth of a 20,000-run burst's time). A batch someone awaits takes everything.
BATCH_KEYS = 4096
# Changes written between two of the writer's checkpoints (``disk.checkpoint``): it makes one
# when its queue runs empty after this many, so a burst's log is copied once, after the burst.
CHECKPOINT_AFTER = 2000


class WriteBehind:
    """Shares the store's lock: the store changes its memory and queues the change
    under one lock, so a reader never sees one without the other."""

    def __init__(self, lock: threading.Lock, commit: Callable[[dict[str, Any]], None], where: Path,
                 connect: Callable[[], object] = lambda: None, checkpoint: Callable[[], None] = lambda: None,
                 together: Callable[[str], Sequence[str]] = lambda key: ()):
        self._connect = connect
        self._together = together  # the keys whose changes go in the batch that takes ``key``'s
        self._checkpoint = checkpoint
        self._unchecked = 0  # changes written since the last checkpoint (the writer's thread only)
        self._wake = threading.Condition(lock)
        self._lock = lock
        self._commit = commit
        self._where = where
        self._dirty: dict[str, Any] = {}  # in the order keys were queued (a key changed again keeps its place)
        self._inflight: dict[str, Any] = {}  # the batch being committed: readable until it is on disk
        self.generation = 0
        self._flushed = 0
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False
        self._asleep = False  # the writer waits for changes (set and read under the lock)
        self._gathering = False  # the writer lets a few changes gather before it commits
        self._flushers = 0  # threads blocked in ``flush``
        self.failure: StoreError | None = None  # set while the disk refuses writes
        self._thread = threading.Thread(target=self._loop, name="capsule-store-writer", daemon=True)
        self._thread.start()

    # The caller holds the store's lock for these three.

    def queue(self, changes: dict[str, Any]) -> int:
        """Accept ``{key: value, or None to delete}``; returns the generation to pass to ``flushed``.
        No changes make no generation: one the writer never commits would stall every flush."""
        if not changes:
            return self.generation
        self._dirty.update(changes)
        return self._added()

    def put(self, key: str, value: Any) -> int:
        """``queue({key: value})`` without the dict: each run's change takes this way."""
        self._dirty[key] = value
        return self._added()

    def _added(self) -> int:
        self.generation += 1
        if self._asleep:  # a busy writer takes these with its next batch: no wake-up to pay for
            self._wake.notify_all()  # all: ``flush`` callers wait on this condition too
        return self.generation

    def held(self, key: str) -> Any:
        """The newest value queued for ``key`` and not yet on disk, else ``NOT_QUEUED``."""
        for pending in (self._dirty, self._inflight):
            if key in pending:
                return pending[key]
        return NOT_QUEUED

    def queued(self) -> Iterator[tuple[str, Any]]:
        """Every change not on disk yet, oldest first."""
        yield from self._inflight.items()
        yield from self._dirty.items()

    @property
    def idle(self) -> bool:
        return not self._dirty and not self._inflight

    def flushed(self, gen: int) -> asyncio.Future[None]:
        """A future (on the running loop) that resolves once ``gen`` is on disk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._flushed >= gen:
                future.set_result(None)
            else:
                self._waiters.append((gen, loop, future))
                if self._gathering:
                    self._wake.notify_all()
        return future

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything accepted so far is on disk (``StoreError`` while it cannot be)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            gen = self.generation
            self._flushers += 1  # the writer does not gather while someone waits here
            self._wake.notify_all()
            try:
                while self._flushed < gen and self._thread.is_alive():
                    if self.failure is not None:
                        raise fresh(self.failure)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"store {self._where} did not flush within {timeout}s")
                    self._wake.wait(remaining)
            finally:
                self._flushers -= 1

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> tuple[dict[str, Any], int]:
        """The next batch, and the generation on disk once it is written; the caller holds the
        lock. Someone awaiting, or few changes: everything queued. Else the keys queued longest
        ago, each with every key ``together`` names (a run's record, payloads and requests), so
        one run's changes reach the disk together: its completed record never before the result
        payload it names, its payloads never deleted before its record is."""
        dirty = self._dirty
        if len(dirty) <= BATCH_KEYS or self._waiters or self._flushers or self._closed:
            self._dirty = {}
            return dirty, self.generation
        batch: dict[str, Any] = {}
        for key in list(itertools.islice(dirty, BATCH_KEYS)):
            if key in dirty:
                batch[key] = dirty.pop(key)
                for other in self._together(key):
                    if other in dirty:
                        batch[other] = dirty.pop(other)
        # What is on disk after it: everything, if the runs it took left nothing queued (w68);
        # else what was before (the keys left may hold older changes), until a batch takes all.
        return batch, self._flushed if dirty else self.generation

    def _loop(self) -> None:
        # The thread opens its connection now, while the store opens: the first commit of a
        # burst opened it before, a dozen statements that each waited behind the busy loop
        # for the GIL, up to a switch interval each (0.3-0.7 s in a 20,000-run burst).
        try:
            self._connect()
        except Exception:  # the first commit opens it then, and reports what fails
            pass
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._asleep = True
                    self._wake.wait()
                    self._asleep = False
                if not (self._waiters or self._flushers or self._closed) and len(self._dirty) < GATHER_KEYS:
                    # Nobody awaits these yet: let a trickle gather for one commit (a flush cuts it short).
                    self._gathering = True
                    self._wake.wait(GATHER_SECONDS)
                    self._gathering = False
                if not self._dirty and self._closed:
                    return
                batch, gen = self._take()
                self._inflight = batch
            try:
                self._commit(batch)
            except Exception as exc:  # a full disk, a read-only folder: keep the batch, report, retry
                failure = StoreError(f"cannot write to the capsule_nb store at {self._where}: {exc}")
                if self.failure is None:
                    log.error("%s; keeping changes in memory and retrying", failure)
                with self._lock:
                    self.failure = failure
                    self._inflight = {}
                    back = {key: value for key, value in batch.items() if key not in self._dirty}  # (else newer)
                    self._dirty = {**back, **self._dirty}  # first again
                    failed, self._waiters = self._waiters, []
                    self._wake.notify_all()
                _settle(failed, failure)
                time.sleep(0.5)  # back off from a failing disk instead of spinning
                continue
            with self._lock:
                if self.failure is not None:
                    log.warning("capsule_nb: the store at %s is writable again", self._where)
                self.failure = None
                self._inflight = {}
                self._flushed = gen
                ready = [w for w in self._waiters if w[0] <= gen]
                self._waiters = [w for w in self._waiters if w[0] > gen]
                self._wake.notify_all()
                idle = not self._dirty
            _settle(ready, None)
            self._unchecked += len(batch)
            if idle and self._unchecked >= CHECKPOINT_AFTER:
                self._unchecked = 0
                try:
                    self._checkpoint()
                except Exception as exc:  # (housekeeping: the commit that takes the log past its limit does it)
                    log.debug("capsule_nb: no checkpoint of the store at %s: %s", self._where, exc)


def fresh(failure: StoreError) -> StoreError:
    """``failure`` as a new error to raise: raising the one object again and again (each
    refused submit, flush and waiter while the disk stays full) grows its traceback with
    every raise and keeps every frame on it alive."""
    return StoreError(*failure.args)


def _settle(waiters: list, failure: StoreError | None) -> None:
    for _, loop, future in waiters:
        try:
            loop.call_soon_threadsafe(resolve, future, failure and fresh(failure))
        except RuntimeError:  # that loop is closed; nobody is waiting any more
            pass
