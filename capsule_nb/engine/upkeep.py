"""Keeping a store healthy among several processes: the periodic maintenance pass,
recovery of runs whose process died, adoption of their waiting runs, retention.

Every ``MAINTAIN_SECONDS`` (in the timer thread): fold in other processes'
writes, answer cancel requests, start queued runs whose lock another process
released, recover runs of dead processes, and keep finished runs under the
retention cap.

A cancel request (``Store.request_cancel``) is seen by every process on the
store and consumed by none but the one that can answer it: the run's owner
stops the run and drops the request once the run has finished; a process that
finds the owner dead records the run ``cancelled``. Recovery and adoption read
the request too, so a run asked to stop is never retried or resumed. A repeat's
run that finished before its owner saw the request had armed its next run:
the request then stops the series.

While somebody here waits on a run another process owns, a faster *watch*
polls the store every ``WATCH_SECONDS``: one poll per tick however many
runs are waited on, and the poll's change events wake the waiters.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

from ..record import CANCELLED, CLAIMED, FAILED, FINISHED, RETRY, RUNNING, TIMEOUT, WAITING, RunRecord, evolve
from ..store import Store, heartbeats, retention
from ..store.owners import owner_alive
from .run import Run

if TYPE_CHECKING:
    from ..tasks import Task
    from .runtime import Runtime

log = logging.getLogger("capsule_nb")

MAINTAIN_SECONDS = 0.5  # how often other processes' changes and crashes are looked at
PRUNE_SECONDS = 60.0  # how often retention is applied when no burst forces it
WATCH_SECONDS = 0.05  # how often the store is polled while a run owned elsewhere is waited on
# A run this process owns but no runtime of it works on is, for a moment, one being submitted
# or adopted; past this it is one this process let go (its app closed), and a request settles it.
LET_GO_SECONDS = 5.0
_NOTHING = contextlib.nullcontext()  # what watching a run of this process takes


class Upkeep:
    def __init__(self, runtime: "Runtime"):
        self.runtime = runtime
        self.store = runtime.store
        self._generation: object | None = None  # the live pass's token
        self._last_prune = time.monotonic()
        self._last_beat = -heartbeats.BEAT_SECONDS
        self._beaten = False
        self._watch_lock = threading.Lock()
        self._watchers = 0  # waits on runs owned by other processes
        self._watch_armed = False

    def start(self) -> None:
        """Arm the periodic pass (again after ``stop``); nothing in immediate mode."""
        if self._generation is None and not self.runtime.settings.immediate:
            self._generation = generation = object()
            self.runtime.timers.call_later(0, lambda: self._maintain(generation))

    def stop(self) -> None:
        self._generation = None
        if self._beaten:  # nothing of ours runs any more: our entry goes
            self._beaten = False
            with contextlib.suppress(Exception):  # (a store refusing writes: it goes in FORGET_SECONDS)
                heartbeats.forget(self.store, {self.runtime.owner})

    def _beat(self) -> None:
        """Say this process is alive, while it has runs running (``store.heartbeats``)."""
        now = time.monotonic()
        if now - self._last_beat >= heartbeats.BEAT_SECONDS and self.runtime.working():
            self._last_beat = now
            self._beaten = True
            heartbeats.beat(self.store, self.runtime.owner)

    def _maintain(self, generation: object) -> None:
        if self._generation is not generation:
            return  # stopped (or restarted) since this pass was armed: a stopped upkeep answers nothing
        runtime = self.runtime
        try:
            self.store.poll()
            self._beat()
            self.answer_cancel_requests()
            runtime.queues.wake_all()
            self.recover()
            now = time.monotonic()
            keep = retention.kept(self.store, runtime.settings.app)  # (another process may have set it since)
            app = runtime.settings.app
            over = self.store.finished_count(app) > keep * 1.1  # a burst: prune now
            if over or now - self._last_prune > PRUNE_SECONDS:
                self._last_prune = now
                self.store.prune(app, keep=keep)
        except Exception:
            log.exception("capsule_nb maintenance pass failed")
        finally:
            if self._generation is generation:  # not stopped (or restarted) meanwhile
                runtime.timers.call_later(MAINTAIN_SECONDS, lambda: self._maintain(generation))

    def watch(self, record: RunRecord) -> ContextManager[None]:
        """While in the block, changes other processes make reach this store's events
        within ``WATCH_SECONDS``. A run of this process needs nothing: its changes are
        published as they are made."""
        return _NOTHING if record.get("owner") == self.runtime.owner else self._watching()

    @contextlib.contextmanager
    def _watching(self) -> Iterator[None]:
        with self._watch_lock:
            self._watchers += 1
            arm = not self._watch_armed
            self._watch_armed = True
        if arm:
            self.runtime.timers.call_later(WATCH_SECONDS, self._watch_tick)
        try:
            yield
        finally:
            with self._watch_lock:
                self._watchers -= 1

    def _watch_tick(self) -> None:
        with self._watch_lock:
            if not self._watchers:
                self._watch_armed = False
                return
        try:
            self.store.poll()
        except Exception:
            log.exception("capsule_nb: watching the store at %s failed", self.store.path)
        self.runtime.timers.call_later(WATCH_SECONDS, self._watch_tick)

    def answer_cancel_requests(self) -> None:
        """Act on the cancel requests this process can answer; leave the others on disk."""
        runtime = self.runtime
        for task_id, seen in self.store.cancel_requests().items():
            record = self.store.get_run(task_id)
            holder = runtime.holder(task_id)
            if record is None or record["status"] in FINISHED:
                if holder is None:  # (one settling here may be arming its next repeat)
                    self._answered(task_id, record)
                continue
            owner = record.get("owner", "")
            if holder is runtime:
                runtime.cancel(task_id)  # the request stays until the run has stopped: a kill meanwhile still finds it
            elif holder is None and (owner == runtime.owner and time.monotonic() - seen > LET_GO_SECONDS
                                     or owner != runtime.owner and not owner_alive(owner)):
                runtime.cancel(task_id)  # nobody works on it: recorded cancelled on disk

    def _answered(self, task_id: str, record: RunRecord | None) -> None:
        """Drop the request of a run that has finished (or was pruned): the run's owner does,
        or anyone once the owner died. A repeat's run may have finished before its owner saw
        the request, its next run already armed: the request then stops the series."""
        owner = record.get("owner", "") if record is not None else ""
        if record is not None and owner != self.runtime.owner and owner_alive(owner):
            return  # its owner answers it
        if record is not None and record.get("series"):
            self.runtime.cancel_series(record)
        self.store.drop_cancel_request(task_id)

    def recover(self) -> int:
        """Record the runs of dead processes (``recover_dead``); then adopt waiting runs of dead
        owners. Adopting a waiting run needs its task, so only a process that defines it does that."""
        others = self._not_ours()
        recovered = recover_dead(self.store, others)
        if recovered:  # (a run just recovered for a retry is adopted in this same pass)
            others = self._not_ours()
        for task in list(self.runtime.tasks()):
            self.adopt(task, others)
        return recovered

    def _not_ours(self) -> list[RunRecord]:
        """The unfinished runs other processes own: one pass for recovery and every task's
        adoption (a burst of thousands of this process's runs is looked at once, not per task)."""
        me = self.runtime.owner
        return [record for record in self.store.unfinished_runs() if record.get("owner", "") != me]

    def adopt(self, task: "Task", records: list[RunRecord] | None = None) -> int:
        """Take over the waiting runs of ``task`` whose owner died, and arm them (once, even
        when several kernels define the task at the same moment). ``records``: the unfinished
        runs to look through, when the caller has them (else all of them)."""
        runtime = self.runtime
        adopted = 0
        orphans = [record for record in (self.store.unfinished_runs() if records is None else records)
                   if record["app"] == runtime.settings.app and record["task_name"] == task.name
                   and record["status"] in WAITING and record.get("owner") != runtime.owner
                   and not owner_alive(record.get("owner", ""))]
        for record in sorted(orphans, key=lambda r: r["task_id"]):  # oldest first: a lock's queue keeps its order
            old = record.get("owner")

            def take(disk: RunRecord, requested: bool, old: str | None = old) -> RunRecord | None:
                if disk.get("owner") != old or disk["status"] not in WAITING:
                    return None
                return cancelled(disk) if requested else evolve(disk, owner=runtime.owner)

            claimed = self.store.claim_run(record["task_id"], take)
            if claimed is None:
                continue
            if claimed["status"] == CANCELLED:
                if claimed.get("lock_key"):
                    self.store.locks.release(claimed["lock_key"], claimed["task_id"])
                continue
            try:
                args, kwargs = stored_arguments(self.store, claimed)
                session = runtime.session_for(claimed.get("session_id"))
                call = runtime.pickle_call(task, args, kwargs, session) if task.process else None
            except Exception as exc:
                error = f"cannot resume: {exc}"
                runtime.update(claimed["task_id"], lambda r: evolve(r, status=FAILED, completed_at=time.time(), error=error))
                continue
            run = Run(runtime, task, claimed["task_id"], args, kwargs, session, None, claimed.get("lock_key"), call)
            runtime.resume(run, claimed.get("scheduled_for"), claimed.get("every"))
            adopted += 1
        return adopted


def recover_dead(store: Store, records: list[RunRecord]) -> int:
    """Record those of ``records`` left ``running`` by a dead process: ``retry`` if attempts
    remain, else ``failed`` with error ``interrupted``; returns how many.

    Any process on the store does it for runs of every app: that needs no task code, and a
    card, a board or a wait must not show "running" for a run nobody runs until someone
    defines its app again. The Jupyter server does it too, for views whose kernel is gone."""
    recovered = 0
    alive: dict[str, bool] = {}  # owner -> whether it runs (asked once per owner: a read of /proc)
    dead: dict[str, float] = {}  # owner -> when it was last seen alive
    for record in records:
        if record["status"] not in (RUNNING, CLAIMED):
            continue
        owner = record.get("owner", "")
        if owner not in alive:
            alive[owner] = owner_alive(owner)
        if alive[owner]:
            continue
        if owner not in dead:
            dead[owner] = last_seen(store, owner)

        def take(disk: RunRecord, requested: bool, owner: str = owner) -> RunRecord | None:
            if disk.get("owner") != owner or disk["status"] not in (RUNNING, CLAIMED):
                return None  # somebody else recovered it first
            if requested:  # it was asked to stop: stopped it is
                return cancelled(disk, dead[owner])
            return interrupted(evolve(disk, status=RUNNING) if disk["status"] == CLAIMED else disk, dead[owner])

        if store.claim_run(record["task_id"], take) is not None:
            recovered += 1
            if record.get("lock_key"):
                store.locks.release(record["lock_key"], record["task_id"])
    if dead:
        heartbeats.forget(store, set(dead))
    return recovered


def stored_arguments(store: Any, record: RunRecord) -> tuple[tuple, dict]:
    """A run's call arguments from its record (JSON) or its signed payload."""
    if record.get("args_payload"):
        args, kwargs = store.get_payload(record["task_id"], "args")
        return tuple(args), dict(kwargs)
    if record.get("args_payload") is False:
        raise ValueError("its arguments could not be stored (not picklable)")
    return tuple(record.get("args") or ()), dict(record.get("kwargs") or {})


def interrupted(record: RunRecord, last_seen: float | None = None) -> RunRecord | None:
    """How a run its process left behind is recorded: a running one is retried if it has
    attempts left, else failed; a waiting one stays as it is, for the next kernel. A failed
    one ended when its dead process was ``last_seen`` alive (its beat, or its own last write
    of the record); None: it is this process, ending it now. One its process was stopping
    ends as that stop would have ended it: cancelled, or timed out (never retried)."""
    if record["status"] in FINISHED:
        return None
    if record["status"] == RUNNING and record.get("stopping") == "cancel":
        return cancelled(record, last_seen)
    if record["status"] == RUNNING and record.get("stopping") == "timeout":
        return evolve(record, status=TIMEOUT, error="timed out", completed_at=_ended(record, last_seen),
                      stopping=None)
    if record["status"] == RUNNING and record["attempt"] < record["max_attempts"]:
        return evolve(record, status=RETRY, error="interrupted")
    if record["status"] == RUNNING:
        return evolve(record, status=FAILED, error="interrupted", completed_at=_ended(record, last_seen))
    return None


def cancelled(record: RunRecord, last_seen: float | None = None) -> RunRecord | None:
    """How a run that was asked to stop, and has stopped (or never started), is recorded;
    ``last_seen`` as for ``interrupted``."""
    if record["status"] in FINISHED:
        return None
    return evolve(record, status=CANCELLED, completed_at=_ended(record, last_seen), error="cancelled", stopping=None)


def last_seen(store: Store, owner: str) -> float:
    """When the dead ``owner`` was last seen alive: its last beat (``store.heartbeats``), or 0.0
    if it never beat, and then its runs ended at their own last write (``_ended``)."""
    return heartbeats.last_seen(store, owner) or 0.0


def _ended(record: RunRecord, last_seen: float | None) -> float:
    """When a run its process left ended: now, or when that dead process was last seen alive."""
    now = time.time()
    return now if last_seen is None else min(now, max(last_seen, record.get("updated_at") or 0.0))
