"""Every byte on disk: run records, signed payloads, locks, documents, the change feed.

Writes to runs and payloads are write-behind (``writer.py``): a change is
in memory at once, published as an event, and durable a moment later.

Memory holds what is live: the runs not finished yet (what recovery,
adoption and waiters look at), the runs this process changed lately, and
what is not on disk yet. Finished runs are read from their indexed table
(``runs.py``) when asked for, so a store with a million runs of history
opens, lists and counts like an empty one.

Collection documents are written through and read from their own table
(``documents.py``), never held in memory. Each transaction also appends
the changed keys to the change feed (``feed.py``), which other processes
poll to keep their live runs and their widgets current. What is kept on
disk, and how, is ``disk.py``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import cloudpickle

from ..errors import StoreError
from ..record import FINISHED, RunRecord
from . import disk, folder
from .documents import Condition, Documents
from .events import EventBus
from .feed import CANCEL, DOC, PAYLOAD, RUN, Feed
from .locks import KeyLocks
from .rows import Rows, run_keys, same_run
from .runs import RunTable
from .writer import NOT_QUEUED, WriteBehind, fresh

log = logging.getLogger("capsule_nb")

Change = Callable[[RunRecord], "RunRecord | None"]
Claim = Callable[[RunRecord, bool], "RunRecord | None"]

RECENT = 1024  # finished runs kept in memory after this process touched them (handles read them back)
RETENTION_GRACE = 10.0  # a finished run outlives retention this long: kernels waiting on it see how it ended
_NOT_HELD = object()


class Store:
    """One store folder. Thread-safe; one instance per folder per process (``open_store``)."""

    def __init__(self, home: str | os.PathLike[str]):
        self.path = Path(home).expanduser().resolve()
        folder.prepare_folder(self.path)
        self._signer = disk.Signer(folder.load_key(self.path), self.path)
        self._cache = disk.open_cache(self.path)
        self._opened = folder.database_id(self.path)  # (the file, so that a replaced one is noticed)
        self._replaced: StoreError | None = None
        self._rows = Rows(self._cache, self.path)  # every read of a row goes through it
        self._feed = Feed(self._cache)
        self.events = EventBus()
        self._lock = threading.Lock()
        self._unfinished: dict[str, RunRecord] = {}
        self._recent: OrderedDict[str, RunRecord] = OrderedDict()
        self._poll_lock = threading.Lock()
        self._cancel_requests: dict[str, float] = {}  # task id -> when this process first saw it
        self._writes = WriteBehind(self._lock, self._commit, self.path,  # idle until something is queued
                                   connect=lambda: self._cache._con, checkpoint=lambda: disk.checkpoint(self._cache),
                                   together=same_run)
        try:
            self._runs = RunTable(self._cache, self._rows.check)
            self._documents = Documents(self._cache, self._rows.check, self._feed)
            self.locks = KeyLocks(self._cache, self._rows, self.get_run)
            for prefix, table, what in ((RUN, self._runs, "run records"), (DOC, self._documents, "documents")):
                moved = self._rows.move(prefix, table.adopt)
                if moved:
                    log.info("capsule_nb: moved %d %s of %s into their table", moved, what, self.path)
            self._reload()
        except (sqlite3.DatabaseError, StoreError) as exc:  # a garbage database file, a broken feed counter
            self._writes.close()
            self._cache.close()
            raise StoreError(f"cannot read the capsule_nb store at {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    def _reload(self) -> None:
        """Read what is live from disk (at open, or after falling behind the feed). Runs that
        ended meanwhile are published, so their waiters and widgets learn of it."""
        seq = self._feed.head()
        unfinished = {r["task_id"]: r for r in self._runs.unfinished()}
        with self._lock:
            gone = [task_id for task_id in self._unfinished if task_id not in unfinished]  # ended, or deleted
        requests = [key[len(CANCEL) :] for key, value in self._rows.scan(CANCEL) if value is not None]
        with self._lock:
            requests = [task_id for task_id in requests if self._writes.held(CANCEL + task_id) is not None]
            for key, record in self._writes.queued():  # our own unwritten changes are newer
                if key.startswith(RUN):
                    unfinished.pop(key[len(RUN) :], None)
                    if record is not None and record["status"] not in FINISHED:
                        unfinished[record["task_id"]] = record
            self._unfinished = unfinished
            now = time.monotonic()
            for task_id in requests:
                self._cancel_requests.setdefault(task_id, now)
            self._feed.mark(seq)
        ended = self._runs.get_many(gone)
        for record in ended.values():
            self.events.publish(record)
        for task_id in gone:
            if task_id not in ended:
                self.events.vanish(task_id)

    # ---------------------------------------------------------------- records

    def put_run(self, record: RunRecord) -> int:
        """Accept a record snapshot; returns the generation to pass to ``flushed``."""
        with self._lock:
            self._mirror(record["task_id"], record)
            gen = self._writes.put(RUN + record["task_id"], record)
        self.events.publish(record)
        return gen

    def update_run(self, task_id: str, change: Change) -> RunRecord | None:
        """Read-modify-write one record atomically; ``change`` returns the new snapshot or None.

        ``change`` runs under the store's lock, so it must be quick and must
        not call back into the store.
        """
        with self._lock:
            live = self._unfinished.get(task_id)
            current = live or self._held(task_id)  # (a live run: the first place looked)
            if current is _NOT_HELD:  # a finished run this process has not seen lately
                current = self._runs.get(task_id)
            if current is None:
                return None
            new = change(current)
            if new is None or new is current:
                return current
            self._mirror(task_id, new)
            self._writes.put(RUN + task_id, new)
        self.events.publish(new)
        return new

    def _held(self, task_id: str) -> Any:
        """This process's newest copy of a run: live, not written yet, or touched lately;
        None when it is deleted, ``_NOT_HELD`` when only the disk knows. Caller holds the lock."""
        record = self._unfinished.get(task_id)
        if record is not None:
            return record
        record = self._writes.held(RUN + task_id)
        return self._recent.get(task_id, _NOT_HELD) if record is NOT_QUEUED else record

    def _mirror(self, task_id: str, record: RunRecord | None) -> None:
        """Set (or drop) a run in memory; caller holds ``self._lock``."""
        if record is None:
            self._unfinished.pop(task_id, None)
            self._recent.pop(task_id, None)
        elif record["status"] in FINISHED:
            self._unfinished.pop(task_id, None)
            self._recent[task_id] = record
            self._recent.move_to_end(task_id)
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        else:
            self._unfinished[task_id] = record
            self._recent.pop(task_id, None)

    def finished_run(self, task_id: str) -> RunRecord | None:
        """The run's record once it has finished, else None: one dict lookup, without the
        lock, while it is live in this process (a submit asks this of every run)."""
        if task_id in self._unfinished:
            return None
        record = self.get_run(task_id)
        return record if record is not None and record["status"] in FINISHED else None

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs not finished yet: what recovery and adoption look through (a snapshot)."""
        with self._lock:
            return list(self._unfinished.values())

    def get_run(self, task_id: str) -> RunRecord | None:
        """A live run's record is one dict read, without the lock (every wait, card and snapshot
        asks, while a burst's writers hold the lock): records are immutable, and a read racing a
        change gets the record as it was just before."""
        record = self._unfinished.get(task_id)
        return record if record is not None else self._run_at_rest(task_id)

    @disk.says_which_store
    def _run_at_rest(self, task_id: str) -> RunRecord | None:
        """A run not live here: not written yet, touched lately, or only on disk."""
        with self._lock:
            record = self._held(task_id)
        if record is not _NOT_HELD:
            return record
        record = self._runs.get(task_id)
        if record is not None and record["status"] in FINISHED:
            with self._lock:
                if self._held(task_id) is _NOT_HELD:
                    self._mirror(task_id, record)
        return record

    def delete_runs(self, task_ids: Iterable[str]) -> None:
        gone: dict[str, None] = {}
        with self._lock:
            for task_id in task_ids:
                self._mirror(task_id, None)
                self._cancel_requests.pop(task_id, None)
                gone.update(dict.fromkeys(run_keys(task_id)))
            self._writes.queue(gone)

    def claim_run(self, task_id: str, change: Claim) -> RunRecord | None:
        """Read-modify-write a record *on disk*, in one transaction: how a process takes over
        a run of a dead owner without a second process taking it too.

        ``change(record, cancel_requested)`` sees the disk's record and whether a cancel
        request for the run is on disk, and returns the new record, or None to leave it.
        A finished record drops the run's cancel request in the same transaction.
        """
        self.flush()
        with self._cache.transact(retry=True):
            current = self._runs.get(task_id)
            requested = self._rows.read(CANCEL + task_id) is not None
            new = None if current is None else change(current, requested)
            if new is not None:
                self._runs.write([new], [])
                if requested and new["status"] in FINISHED:
                    self._cache.delete(CANCEL + task_id)
                self._feed.announce([RUN + task_id])
        if new is None:
            return None
        with self._lock:
            self._mirror(task_id, new)
            if new["status"] in FINISHED:
                self._cancel_requests.pop(task_id, None)
        self.events.publish(new)
        return new

    def prune(self, app: str | None, *, keep: int | None = None, before: float | None = None,
              grace: float = RETENTION_GRACE) -> int:
        """Delete the finished runs of ``app`` (None: of every app) beyond the ``keep`` newest
        that finished over ``grace`` seconds ago, or finished before the Unix time ``before``,
        payloads included. The grace is for other processes waiting on a run: they learn how
        it ended from its record, which they poll for, and a run pruned first never ends there."""
        doomed = self._runs.oldest_finished(app, keep=keep, before=before,
                                            settled_before=time.time() - grace if grace else None)
        self.delete_runs(doomed)
        return len(doomed)

    # ---------------------------------------------------------------- queries
    # They read the table, after this process's own writes have reached it.

    @disk.says_which_store
    def runs(self, where: Mapping[str, Any] | None = None, *, keep: Callable[[RunRecord], bool] | None = None,
             limit: int | None = None, offset: int = 0, arguments: Mapping[str, Any] | None = None) -> list[RunRecord]:
        """Runs whose columns match ``where`` (``{app, task_name, status, session_id,
        scheduled_for: a value or a list}``) and ``keep`` (a test in Python), newest first;
        ``arguments``: what ``keep`` tests of the runs' arguments, which SQL tests first."""
        self._settle()
        return self._runs.select(where or {}, keep=keep, limit=limit, offset=offset, arguments=arguments)

    @disk.says_which_store
    def count_runs(self, where: Mapping[str, Any] | None = None, *,
                   keep: Callable[[RunRecord], bool] | None = None, arguments: Mapping[str, Any] | None = None) -> int:
        """How many runs ``runs(where, keep=keep)`` would give; without ``keep``, from the counts
        kept beside the table, so as cheap for a million runs as for ten."""
        where = where or {}
        if keep is not None or "scheduled_for" in where:
            return len(self.runs(where, keep=keep, arguments=arguments))
        self._settle()
        return sum(self._runs.counts(where).values())

    @disk.says_which_store
    def run_counts(self, where: Mapping[str, Any] | None = None, by: Sequence[str] = ("status",)) -> dict[tuple[str, ...], int]:
        """``{(values of the columns by): how many runs}`` among the runs matching ``where``."""
        self._settle()
        return self._runs.counts(where or {}, by)

    @disk.says_which_store
    def run_values(self, column: str) -> list[str]:
        """Every app, task name or session id (``column``) that has runs."""
        self._settle()
        return self._runs.values(column)

    @disk.says_which_store
    def run_ids_ending(self, tail: str, limit: int) -> list[str]:
        self._settle()
        return self._runs.ids_ending(tail, limit)

    def finished_count(self, app: str) -> int:
        """Finished runs of ``app`` on disk (retention's trigger)."""
        return self._runs.finished(app)

    def _settle(self) -> None:
        """Let a query see this process's own writes: wait for the writer, unless the disk
        refuses them (then the query answers from what is on disk)."""
        if not self._writes.idle:
            try:
                self.flush()
            except (StoreError, TimeoutError):
                pass

    # ---------------------------------------------------------------- intents

    def request_cancel(self, task_id: str) -> None:
        """Ask the process that owns a run to cancel it. The request is a row on disk that
        every process learns of from the feed (or at open), and only the owner (once the run
        has stopped) or a process that finds the owner dead may drop it."""
        with self._cache.transact(retry=True):
            self._cache.set(CANCEL + task_id, {"at": time.time()})
            self._feed.announce([CANCEL + task_id])
        with self._lock:
            self._cancel_requests.setdefault(task_id, time.monotonic())

    def cancel_requests(self) -> dict[str, float]:
        """Outstanding cancel requests: ``{task_id: when this process first saw it}``
        (``time.monotonic``). Reading them consumes nothing."""
        with self._lock:
            return dict(self._cancel_requests)

    def drop_cancel_request(self, task_id: str) -> None:
        """Forget a request that has been answered: its run is finished (or gone). The row
        leaves the disk with the run's end (``same_run``), never before it: a process killed
        in between leaves the request, so recovery still records the run cancelled."""
        with self._lock:
            self._cancel_requests.pop(task_id, None)
            self._writes.put(CANCEL + task_id, None)

    # --------------------------------------------------------------- payloads

    def put_payload(self, task_id: str, name: str, value: Any, *, limit: int | None = None) -> int:
        """Pickle ``value`` (cloudpickle, so notebook-defined classes work) and sign it; returns its size."""
        return self.put_pickled(task_id, name, cloudpickle.dumps(value), limit=limit)

    def put_pickled(self, task_id: str, name: str, blob: bytes, *, limit: int | None = None) -> int:
        """``put_payload`` for bytes already pickled (a process run's arguments are pickled once)."""
        if limit is not None and len(blob) > limit:
            raise ValueError(f"{len(blob):,} bytes pickled is over the {limit:,}-byte cap")
        key = f"{PAYLOAD}{task_id}/{name}"
        with self._lock:
            self._writes.queue({key: self._signer.sign(key, blob)})
        return len(blob)

    def get_payload(self, task_id: str, name: str) -> Any:
        key = f"{PAYLOAD}{task_id}/{name}"
        with self._lock:
            signed = self._writes.held(key)
        if signed is NOT_QUEUED or signed is None:
            try:
                signed = self._cache.get(key)
            except StoreError as exc:
                raise StoreError(f"payload {key} in {self.path}: {exc}") from None
        if signed is None:
            raise KeyError(key)
        return self._signer.load(key, signed)

    # ------------------------------------------------------------ durability

    @property
    def generation(self) -> int:
        return self._writes.generation

    @property
    def replaced(self) -> StoreError | None:
        """Why this store's database is not the store's any more (deleted or replaced since it
        was opened), once that is seen; looked at on each poll, a stat."""
        if self._replaced is None and (gone := folder.replaced(self.path, self._opened)) is not None:
            self._replaced = gone
            log.error("capsule_nb: %s", gone)
        return self._replaced

    @property
    def failure(self) -> StoreError | None:
        """Why the disk refuses writes, while it does (changes stay queued meanwhile): a new
        error on each read, so raising it keeps no tracebacks of earlier raises."""
        failure = self._replaced or self._writes.failure
        return failure and fresh(failure)

    def flushed(self, gen: int) -> asyncio.Future[None]:
        """A future (on the running loop) that resolves once ``gen`` is on disk."""
        return self._writes.flushed(gen)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything accepted so far is on disk (``StoreError`` while it cannot be)."""
        self._writes.flush(timeout)

    def _commit(self, batch: dict[str, Any]) -> None:
        runs = [key for key in batch if key.startswith(RUN)]
        with self._cache.transact(retry=True):
            self._runs.write([batch[key] for key in runs if batch[key] is not None],
                             [key[len(RUN) :] for key in runs if batch[key] is None])
            gone = [key for key, value in batch.items() if value is None and not key.startswith(RUN)]
            for key in self._rows.present(gone):  # a pruned run rarely has payloads: ask once, not per key
                self._cache.delete(key)
            for key, value in batch.items():
                if value is not None and not key.startswith(RUN):
                    self._cache.set(key, value)
            self._feed.announce(runs)

    # ------------------------------------------------------ other processes

    def poll(self) -> list[RunRecord]:
        """Fold in what other processes wrote since the last poll; returns the run records."""
        if self.replaced is not None:
            return []  # (what the file it has open says is nobody's any more)
        with self._poll_lock:
            seq, changed = self._feed.changes()
            if changed is None:  # fell behind the feed's window
                self._reload()
                return []
            if not changed:
                self._feed.mark(seq)
                return []
            run_ids = [key[len(RUN) :] for key in changed if key.startswith(RUN)]
            records = self._runs.get_many(run_ids)
            requests = [key[len(CANCEL) :] for key in changed
                        if key.startswith(CANCEL) and self._rows.read(key) is not None]
            fresh, vanished = [], []
            with self._lock:
                self._feed.mark(seq)
                now = time.monotonic()
                for task_id in requests:
                    self._cancel_requests.setdefault(task_id, now)
                for task_id in run_ids:
                    if self._writes.held(RUN + task_id) is not NOT_QUEUED:  # our own newer write wins
                        continue
                    record = records.get(task_id)
                    if record is None and task_id in self._unfinished:
                        vanished.append(task_id)  # ended and was deleted between two polls
                    self._mirror(task_id, record)
                    if record is not None:
                        fresh.append(record)
        for record in fresh:
            self.events.publish(record)
        for task_id in vanished:
            self.events.vanish(task_id)
        return fresh

    # ------------------------------------------------------------ documents

    @disk.says_which_store
    def docs(self, collection: str) -> list[dict[str, Any]]:
        """Every document of ``collection``, in insertion order (read from disk)."""
        return self._documents.select(collection)

    @disk.says_which_store
    def find_docs(self, collection: str, where: Sequence[Condition] = (), order: Sequence[tuple[str, int]] = (), *,
                  keep: Callable[[dict], bool] | None = None, limit: int | None = None,
                  offset: int = 0) -> list[dict[str, Any]]:
        """Documents matching the conditions ``where`` (SQL tests them: a superset of what the
        caller wants) and ``keep`` (Python), sorted by ``order`` then insertion (``documents.py``)."""
        return self._documents.select(collection, where, order, keep=keep, limit=limit, offset=offset)

    @disk.says_which_store
    def count_docs(self, collection: str, where: Sequence[Condition] = (), *, keep: Callable[[dict], bool],
                   exact: bool) -> int:
        """How many ``find_docs(collection, where, keep=keep)`` gives; counted in SQL when the
        conditions are ``exact`` (say all that ``keep`` does)."""
        return self._documents.count(collection, where, keep=keep, exact=exact)

    def index_docs(self, collection: str, fields: Sequence[str]) -> None:
        """Index ``collection`` by each of ``fields`` (its declared sortable or filterable columns)."""
        self._documents.index(collection, fields)

    @disk.says_which_store
    def write_docs(self, collection: str, changes: dict[str, Callable[[dict | None], dict | None]]) -> dict[str, dict | None]:
        """Apply ``{doc_id: change(current) -> new or None (delete)}`` in one transaction,
        each change reading the document on disk (``$inc`` from two processes adds up)."""
        return self._documents.write(collection, changes)

    # --------------------------------------------------------- plain values

    def update_value(self, key: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write a plain value in one transaction (shared state such as a
        schedule's last tick); ``change`` gets the value on disk (or None)."""
        with self._cache.transact(retry=True):
            new = change(self._rows.read(key))
            self._cache.set(key, new)
        return new

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        """Plain values whose key starts with ``prefix``, in key order."""
        return [(key, value) for key, value in self._rows.scan(prefix) if value is not None]

    def get(self, key: str, default: Any = None) -> Any:
        value = self._rows.read(key)
        return default if value is None else value

    def problem(self, key: str) -> str | None:
        """Why the row ``key`` was skipped in this process (None: it was not)."""
        return self._rows.bad.get(key)

    def set(self, key: str, value: Any) -> None:
        self._cache.set(key, value)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        self._writes.close()
        self._cache.close()

