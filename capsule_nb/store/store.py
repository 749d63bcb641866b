"""Every byte on disk: run records, signed payloads, locks, documents, the change feed.

Writes are write-behind: ``put_run`` updates the in-memory mirror at once
(readers in this process see it immediately), publishes the change event,
and queues the record for the writer thread, which commits everything
queued so far in one SQLite transaction. A burst of thousands of status
changes is therefore a handful of transactions, and a run that goes
pending -> running -> completed inside one window is written once.
``flushed(gen)`` lets ``await submit()`` wait until its record is durable.

Each transaction also appends the changed keys to the change feed
(``feed.py``), which other processes poll to keep their own mirror (runs
and collection documents) and widgets current. What is kept on disk, and
how, is ``disk.py``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import cloudpickle

from ..awaitables import resolve
from ..errors import StoreError
from ..record import FINISHED, RunRecord
from . import disk, folder
from .events import EventBus
from .feed import CANCEL, DOC, LOCK, PAYLOAD, RUN, Feed, doc_key, split_doc_key
from .owners import owner_alive
from .rows import Rows

log = logging.getLogger("capsule_nb")

Change = Callable[[RunRecord], "RunRecord | None"]
Claim = Callable[[RunRecord, bool], "RunRecord | None"]


class Store:
    """One store folder. Thread-safe; one instance per folder per process (``open_store``)."""

    def __init__(self, home: str | os.PathLike[str]):
        self.path = Path(home).expanduser().resolve()
        folder.prepare_folder(self.path)
        self._signer = disk.Signer(folder.load_key(self.path), self.path)
        self._cache = disk.open_cache(self.path)
        self._rows = Rows(self._cache, self.path)  # every read of a row goes through it
        self._feed = Feed(self._cache)
        self.events = EventBus()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._runs: dict[str, RunRecord] = {}
        self._unfinished: dict[str, RunRecord] = {}
        self._docs: dict[str, dict[str, dict[str, Any]]] = {}
        self._poll_lock = threading.Lock()
        self._cancel_requests: dict[str, float] = {}  # task id -> when this process first saw it
        self._dirty: dict[str, Any] = {}
        self._inflight: dict[str, Any] = {}  # the batch the writer is committing
        self._gen = 0
        self._flushed = 0
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False
        self.failure: StoreError | None = None  # set while the disk refuses writes
        try:
            self._reload()
        except (sqlite3.DatabaseError, StoreError) as exc:  # a garbage database file, a broken feed counter
            self._cache.close()
            raise StoreError(f"cannot read the capsule_nb store at {self.path}: {exc}") from exc
        self._writer = threading.Thread(target=self._write_loop, name="capsule-store-writer", daemon=True)
        self._writer.start()

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    def _reload(self) -> None:
        """Rebuild the mirror from disk (at open, or after falling behind the feed)."""
        seq = self._feed.head()
        runs: dict[str, RunRecord] = {}
        docs: dict[str, dict[str, dict[str, Any]]] = {}
        requests: list[str] = []
        for key in self._cache.iterkeys():
            if key == disk.REFUSED:
                log.warning("capsule_nb: a row with a pickled key in %s was refused", self.path)
            elif key.startswith(CANCEL):
                requests.append(key[len(CANCEL) :])
            elif key.startswith((RUN, DOC)):
                value = self._rows.read(key)  # a bad row is skipped, with a warning naming it
                if value is None:
                    continue
                if key.startswith(RUN):
                    runs[value["task_id"]] = value
                else:
                    collection, doc_id = split_doc_key(key)
                    docs.setdefault(collection, {})[doc_id] = value
        with self._lock:
            for key in self._dirty:
                if key.startswith(RUN) and key[len(RUN) :] in self._runs:
                    runs[key[len(RUN) :]] = self._runs[key[len(RUN) :]]
            self._runs = runs
            self._unfinished = {k: r for k, r in runs.items() if r["status"] not in FINISHED}
            self._docs = docs
            now = time.monotonic()
            for task_id in requests:
                self._cancel_requests.setdefault(task_id, now)
            self._feed.mark(seq)

    # ---------------------------------------------------------------- records

    def put_run(self, record: RunRecord) -> int:
        """Accept a record snapshot; returns the generation to pass to ``flushed``."""
        with self._lock:
            self._mirror(record["task_id"], record)
            self._dirty[RUN + record["task_id"]] = record
            self._gen += 1
            gen = self._gen
            self._wake.notify()
        self.events.publish(record)
        return gen

    def update_run(self, task_id: str, change: Change) -> RunRecord | None:
        """Read-modify-write one record atomically; ``change`` returns the new snapshot or None.

        ``change`` runs under the store's lock, so it must be quick and must
        not call back into the store.
        """
        with self._lock:
            current = self._runs.get(task_id)
            if current is None:
                return None
            new = change(current)
            if new is None or new is current:
                return current
            self._mirror(task_id, new)
            self._dirty[RUN + task_id] = new
            self._gen += 1
            self._wake.notify()
        self.events.publish(new)
        return new

    def _mirror(self, task_id: str, record: RunRecord | None) -> None:
        """Set (or drop) a run in the mirror; caller holds ``self._lock``."""
        if record is None:
            self._runs.pop(task_id, None)
            self._unfinished.pop(task_id, None)
            return
        self._runs[task_id] = record
        if record["status"] in FINISHED:
            self._unfinished.pop(task_id, None)
        else:
            self._unfinished[task_id] = record

    def finished_count(self) -> int:
        """Finished runs in the mirror, all apps (cheap: two sizes)."""
        with self._lock:
            return len(self._runs) - len(self._unfinished)

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs not finished yet: what recovery and adoption look through (a snapshot)."""
        with self._lock:
            return list(self._unfinished.values())

    def get_run(self, task_id: str) -> RunRecord | None:
        record = self._runs.get(task_id)
        if record is None:
            self.poll()
            record = self._runs.get(task_id)
        return record

    def runs(self) -> list[RunRecord]:
        """A snapshot of every run record in the store (all apps)."""
        with self._lock:
            return list(self._runs.values())

    def delete_runs(self, task_ids: Iterable[str]) -> None:
        with self._lock:
            for task_id in task_ids:
                self._mirror(task_id, None)
                self._dirty[RUN + task_id] = None
                for name in ("result", "args"):
                    self._dirty[f"{PAYLOAD}{task_id}/{name}"] = None
                self._dirty[CANCEL + task_id] = None
                self._cancel_requests.pop(task_id, None)
            self._gen += 1
            self._wake.notify()

    def claim_run(self, task_id: str, change: Claim) -> RunRecord | None:
        """Read-modify-write a record *on disk*, in one transaction: how a process takes over
        a run of a dead owner without a second process taking it too.

        ``change(record, cancel_requested)`` sees the disk's record and whether a cancel
        request for the run is on disk, and returns the new record, or None to leave it.
        A finished record drops the run's cancel request in the same transaction.
        """
        self.flush()
        with self._cache.transact(retry=True):
            current = self._rows.read(RUN + task_id)
            requested = self._rows.read(CANCEL + task_id) is not None
            new = None if current is None else change(current, requested)
            if new is not None:
                self._cache.set(RUN + task_id, new)
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

    def prune(self, app: str, keep: int) -> int:
        """Delete the oldest finished runs of ``app`` beyond ``keep``, payloads included."""
        with self._lock:
            finished = [r for r in self._runs.values() if r["app"] == app and r["status"] in FINISHED]
        if len(finished) <= keep:
            return 0
        finished.sort(key=lambda r: (r.get("completed_at") or 0, r["task_id"]))
        doomed = [r["task_id"] for r in finished[: len(finished) - keep]]
        self.delete_runs(doomed)
        return len(doomed)

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
        """Forget a request that has been answered: its run is finished (or gone)."""
        with self._lock:
            self._cancel_requests.pop(task_id, None)
        self._cache.delete(CANCEL + task_id)

    # --------------------------------------------------------------- payloads

    def put_payload(self, task_id: str, name: str, value: Any, *, limit: int | None = None) -> int:
        """Pickle ``value`` (cloudpickle, so notebook-defined classes work) and sign it; returns its size."""
        return self.put_pickled(task_id, name, cloudpickle.dumps(value), limit=limit)

    def put_pickled(self, task_id: str, name: str, blob: bytes, *, limit: int | None = None) -> int:
        """``put_payload`` for bytes already pickled (a process run's arguments are pickled once)."""
        if limit is not None and len(blob) > limit:
            raise ValueError(f"{len(blob):,} bytes pickled is over the {limit:,}-byte cap")
        with self._lock:
            self._dirty[f"{PAYLOAD}{task_id}/{name}"] = self._signer.sign(blob)
            self._gen += 1
            self._wake.notify()
        return len(blob)

    def get_payload(self, task_id: str, name: str) -> Any:
        key = f"{PAYLOAD}{task_id}/{name}"
        with self._lock:
            signed = self._dirty.get(key, self._inflight.get(key))
        if signed is None:
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
        return self._gen

    def flushed(self, gen: int) -> asyncio.Future[None]:
        """A future (on the running loop) that resolves once ``gen`` is on disk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._flushed >= gen:
                future.set_result(None)
            else:
                self._waiters.append((gen, loop, future))
        return future

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything accepted so far is on disk (``StoreError`` while it cannot be)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            gen = self._gen
            self._wake.notify()
            while self._flushed < gen and self._writer.is_alive():
                if self.failure is not None:
                    raise self.failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"store {self.path} did not flush within {timeout}s")
                self._wake.wait(remaining)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._wake.wait()
                if not self._dirty and self._closed:
                    return
                batch, self._dirty = self._dirty, {}
                self._inflight = batch  # readable until it is on disk
                gen = self._gen
            try:
                self._commit(batch)
            except Exception as exc:  # a full disk, a read-only folder: keep the batch, report, retry
                failure = StoreError(f"cannot write to the capsule_nb store at {self.path}: {exc}")
                if self.failure is None:
                    log.error("%s; keeping changes in memory and retrying", failure)
                with self._lock:
                    self.failure = failure
                    self._inflight = {}
                    for key, value in batch.items():
                        self._dirty.setdefault(key, value)
                    failed, self._waiters = self._waiters, []
                    self._wake.notify_all()
                _settle_waiters(failed, failure)
                time.sleep(0.5)  # back off from a failing disk instead of spinning
                continue
            with self._lock:
                if self.failure is not None:
                    log.warning("capsule_nb: the store at %s is writable again", self.path)
                self.failure = None
                self._inflight = {}
                self._flushed = gen
                ready = [w for w in self._waiters if w[0] <= gen]
                self._waiters = [w for w in self._waiters if w[0] > gen]
                self._wake.notify_all()
            _settle_waiters(ready, None)

    def _commit(self, batch: dict[str, Any]) -> None:
        with self._cache.transact(retry=True):
            for key, value in batch.items():
                if value is None:
                    self._cache.delete(key)
                else:
                    self._cache.set(key, value)
            self._feed.announce([key for key in batch if key.startswith(RUN)])

    # ------------------------------------------------------ other processes

    def poll(self) -> list[RunRecord]:
        """Fold in what other processes wrote since the last poll; returns the run records."""
        with self._poll_lock:
            seq, changed = self._feed.changes()
            if changed is None:  # fell behind the feed's window
                self._reload()
                return []
            if not changed:
                self._feed.mark(seq)
                return []
            values = {key: self._rows.read(key) for key in changed}
            fresh = []
            with self._lock:
                self._feed.mark(seq)
                for key, value in values.items():
                    if key.startswith(DOC):
                        collection, doc_id = split_doc_key(key)
                        _apply(self._docs.setdefault(collection, {}), doc_id, value)
                    elif key.startswith(CANCEL):
                        if value is not None:
                            self._cancel_requests.setdefault(key[len(CANCEL) :], time.monotonic())
                    elif key.startswith(RUN) and key not in self._dirty:  # our own newer write wins
                        self._mirror(key[len(RUN) :], value)
                        if value is not None:
                            fresh.append(value)
        for record in fresh:
            self.events.publish(record)
        return fresh

    # ------------------------------------------------------------ documents

    def docs(self, collection: str) -> list[dict[str, Any]]:
        """The documents of ``collection`` in insertion order (a snapshot)."""
        self.poll()
        with self._lock:
            return list(self._docs.get(collection, {}).values())

    def write_docs(self, collection: str, changes: dict[str, Callable[[dict | None], dict | None]]) -> dict[str, dict | None]:
        """Apply ``{doc_id: change(current) -> new or None (delete)}`` in one transaction.

        Collections are written through, not behind: ``$inc`` from two
        processes at once must add up, so each change reads the document
        from disk inside the transaction that writes it.
        """
        written: dict[str, dict | None] = {}
        with self._cache.transact(retry=True):
            for doc_id, change in changes.items():
                key = doc_key(collection, doc_id)
                new = change(self._rows.read(key))
                if new is None:
                    self._cache.delete(key)
                else:
                    self._cache.set(key, new)
                written[doc_id] = new
            self._feed.announce([doc_key(collection, doc_id) for doc_id in written])
        with self._lock:
            docs = self._docs.setdefault(collection, {})
            for doc_id, new in written.items():
                _apply(docs, doc_id, new)
        return written

    # ------------------------------------------------------------------ locks

    def acquire_lock(self, key: str, task_id: str, owner: str) -> str | None:
        """Take ``key`` for ``task_id`` unless a live, unfinished run holds it.

        Returns ``None`` on success, else the holder's task id. Runs in one
        SQLite transaction so two processes can never both win.
        """
        cache = self._cache
        with cache.transact(retry=True):
            held = self._rows.read(LOCK + key)
            if held is not None and held["task_id"] != task_id and owner_alive(held["owner"]):
                holder = self._runs.get(held["task_id"]) or self._rows.read(RUN + held["task_id"])
                # No record yet: the holder's write is still in its process's buffer.
                if holder is None or holder["status"] not in FINISHED:
                    return held["task_id"]
            cache.set(LOCK + key, {"task_id": task_id, "owner": owner, "at": time.time()})
        return None

    def release_lock(self, key: str, task_id: str) -> None:
        cache = self._cache
        with cache.transact(retry=True):
            held = self._rows.read(LOCK + key)
            if held is not None and held["task_id"] == task_id:
                cache.delete(LOCK + key)

    # --------------------------------------------------------- plain values

    def update_value(self, key: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write a plain value in one transaction (shared state such as a
        schedule's last tick); ``change`` gets the value on disk (or None)."""
        with self._cache.transact(retry=True):
            new = change(self._rows.read(key))
            self._cache.set(key, new)
        return new

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        """Plain values whose key starts with ``prefix`` (a scan: for listings, not hot paths)."""
        found = [(key, self._rows.read(key)) for key in self._cache.iterkeys()
                 if key != disk.REFUSED and key.startswith(prefix)]
        return [(key, value) for key, value in found if value is not None]

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
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._writer.join(timeout=30)
        self._cache.close()


def _settle_waiters(waiters: list, failure: Exception | None) -> None:
    for _, loop, future in waiters:
        try:
            loop.call_soon_threadsafe(resolve, future, failure)
        except RuntimeError:  # that loop is closed; nobody is waiting any more
            pass


def _apply(mirror: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        mirror.pop(key, None)
    else:
        mirror[key] = value
