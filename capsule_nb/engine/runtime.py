"""The runtime: where runs start, retry, time out, get cancelled and finish.

Async task functions run as asyncio tasks on the bound loop (the kernel's
in a notebook); sync ones in a thread pool, so neither blocks the kernel.
Every method here is safe to call from any thread: record changes go
through ``Store.update_run`` (atomic), loop work through
``call_soon_threadsafe``, and deadlines through the timer thread. A thread
run therefore starts, finishes, times out and is recorded even while a
long cell keeps the kernel's loop busy.

The runtime takes what it needs and nothing more: a store, its
``Settings``, a way to list the tasks defined (``tasks``), the sessions a
run may be bound to, and a ``Display`` for messages. It never sees the App.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import LockedError, StoreError
from ..record import (CANCELLED, COMPLETED, FAILED, FINISHED, PENDING, RETRY, RUNNING, SCHEDULED, TIMEOUT,
                      RunRecord, evolve, new_record, new_task_id, storable, submitted_record)
from ..store import Store, refreshes
from ..store.owners import owner_id
from ..workers.pickling import Call, CallPickler
from . import capture, elsewhere
from .callbacks import Callbacks
from .executors import AsyncExecutor, Executor, ImmediateExecutor, Outcome, ProcessExecutor, ThreadExecutor
from .key_queues import KeyQueues
from .loop import LoopBinding
from .results import Results
from .run import Display, Failure, NoDisplay, Run
from .threads import WorkerPool
from .timers import Timers
from .upkeep import Upkeep, cancelled, interrupted

log = logging.getLogger("capsule_nb")
_LET_GO_KILL_SECONDS = 1.0  # how long a process going away waits for a worker it killed to be gone

if TYPE_CHECKING:
    from ..tasks import Task


# Every runtime of this process. Apps on one home share a store and an owner id, so a run
# live in one app's runtime is cancelled through that runtime, whichever app is asked.
_runtimes: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


def _takes_key_when_due(lock_key: str | None, every: float | None, start_at: float | None) -> bool:
    """A repeat's next run takes its key when it is due, not while it waits: held from one
    run to the next, the key would make every other submit with it join a run an hour away
    (and a repeat scheduled while the key was held join that run, and never repeat)."""
    return lock_key is not None and every is not None and start_at is not None and start_at > time.time()


@dataclass(slots=True)  # (a setting that is not one is an error, not an attribute nobody reads)
class Settings:
    """An app's tunables, read by the runtime at the moment it needs them."""

    app: str
    max_threads: int = 32
    max_result_bytes: int = 64 * 2**20  # the largest pickled result kept
    immediate: bool = False  # run each submit to its end in the caller (tests)


class Runtime:
    """Owns the loop binding, the thread pool, the timers and the live runs of one app."""

    def __init__(self, store: Store, settings: Settings, *, tasks: Callable[[], Iterable["Task"]],
                 default_session: Any = None, session_for: Callable[[str | None], Any] = lambda _: None,
                 display: Display | None = None):
        self.store = store
        self.settings = settings
        self.tasks = tasks
        self.default_session = default_session  # the session of a run submitted without one
        self.session_for = session_for  # the session to bind a resumed run to, by id
        self.display: Display = display or NoDisplay()
        self.owner = owner_id()
        self.timers = Timers()
        self.loops = LoopBinding()
        self.threads = WorkerPool(settings.max_threads)
        self.results = Results(store, lambda: self.settings.max_result_bytes)
        self.upkeep = Upkeep(self)
        _runtimes.add(self)
        self._callbacks = Callbacks()
        self._live: dict[str, Run] = {}
        self._live_lock = threading.Lock()
        self.queues = KeyQueues(store, self.owner, self._start)
        self._processes: Any = None
        self._cluster: Any = None
        self._calls = CallPickler(default_session)
        immediate = ImmediateExecutor(self)
        self._executors: dict[str, Executor] = {
            "async": immediate if settings.immediate else AsyncExecutor(self),
            "thread": immediate if settings.immediate else ThreadExecutor(self),
            "process": immediate if settings.immediate else ProcessExecutor(self),
        }

    # ----------------------------------------------------------- plumbing

    @property
    def loop(self) -> Any:
        return self.loops.loop

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.loops.call_soon(callback, *args)

    def update(self, task_id: str, change: Callable[[RunRecord], RunRecord | None]) -> RunRecord | None:
        return self.store.update_run(task_id, change)

    @property
    def max_threads(self) -> int:
        return self.threads.max_workers

    @max_threads.setter
    def max_threads(self, value: int) -> None:
        self.settings.max_threads = value
        self.threads.resize(value)

    def is_live(self, task_id: str) -> bool:
        return task_id in self._live

    def working(self) -> bool:
        """Whether a run of this runtime is running now (its process beats: ``store.heartbeats``)."""
        return any(run.phase == "running" for run in list(self._live.values()))

    def holder(self, task_id: str) -> "Runtime | None":
        """The runtime of this process working on ``task_id`` (this one first), if any."""
        if self.is_live(task_id):
            return self
        return next((r for r in list(_runtimes) if r.store is self.store and r.is_live(task_id)), None)

    def _executor(self, task: "Task") -> Executor:
        return self._executors["process" if task.process else "async" if task.is_async else "thread"]

    def pickle_call(self, task: "Task", args: tuple, kwargs: dict, session: Any) -> Call:
        """A process run's call, pickled once: a ``TypeError`` names what cannot go to a worker."""
        return self._calls.pickle(task.fn, args, kwargs, session or self.default_session, task.session_param)

    # ---------------------------------------------------------------- submit

    def submit(self, task: "Task", args: tuple, kwargs: dict, params: dict[str, Any], *,
               session: Any, target: Any, start_at: float | None = None,
               every: float | None = None, series: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[RunRecord, int]:
        """Record a new run and start it (or arm its start); returns ``(record, generation)``."""
        if self.store.failure is not None:
            raise self.store.failure  # refuse new work while the disk refuses writes
        call = self.pickle_call(task, args, kwargs, session) if task.process else None  # before any record
        capture.install()
        now = time.time()
        task_id = new_task_id()
        lock_key = task.lock_key(params) if task.lock is not None else None
        stored_args, args_ok = storable(dict(enumerate(args))) if args else ({}, True)
        stored_kwargs, kwargs_ok = storable(kwargs)
        stored_params, _ = storable(params)
        record = submitted_record(
            task_id, self.settings.app, task.name, task.display_name, SCHEDULED if start_at is not None else PENDING,
            list(stored_args.values()), stored_kwargs, stored_params, now, start_at, task.retries + 1, self.owner,
            session.id if session is not None else None, lock_key, every, series or (task_id if every else None),
            task.process)
        if extra:
            record = new_record(**{**record, **extra})  # (which checks their names)
        later_repeat = _takes_key_when_due(lock_key, every, start_at)
        if lock_key is not None and not later_repeat:
            holder = self.store.locks.acquire(lock_key, task_id, self.owner)
            if holder is not None:
                if task.on_lock == "reject":
                    raise LockedError(lock_key, holder)
                if task.on_lock == "join":
                    held = self._await_record(holder)
                    same_task = (held["app"], held["task_name"]) == (self.settings.app, task.name)
                    if same_task and not self._stopped_or_stopping(held):
                        return held, self.store.generation
                    # another task holds the key, or its run is being stopped: never hand that
                    # run out (a submit just after a cancel means new work); wait for the key
                record["queued"] = True
        if not (args_ok and kwargs_ok):
            try:  # kept so another kernel can resume the run; in-kernel runs go ahead without
                if call is not None:
                    self.store.put_pickled(task_id, "args", call.arguments)
                else:
                    self.store.put_payload(task_id, "args", (args, kwargs))
                record["args_payload"] = True
            except Exception:
                record["args_payload"] = False
        run = Run(self, task, task_id, args, kwargs, session, target, lock_key, call)
        run.takes_key_when_due = later_repeat
        with self._live_lock:  # live before its record is seen: a cancel from now on finds it here
            self._live[task_id] = run
        gen = self.store.put_run(record)
        if record.get("queued"):
            self.queues.add(run)
            self.queues.wake(run.lock_key)  # the holder may have finished meanwhile
        else:
            self._launch(run, start_at)
        return record, gen

    def _stopped_or_stopping(self, record: RunRecord) -> bool:
        """Whether ``record``'s run is asked to stop (here or by another process) or has ended."""
        if record["status"] in FINISHED or record.get("stopping"):
            return True
        self.store.poll()  # a cancel another process asked for a moment ago: the owner may not know yet
        return record["task_id"] in self.store.cancel_requests()

    def resume(self, run: Run, start_at: float | None, every: float | None = None) -> None:
        """Arm a run adopted from a dead process (queued again if its lock is taken)."""
        with self._live_lock:
            self._live[run.task_id] = run
        run.takes_key_when_due = _takes_key_when_due(run.lock_key, every, start_at)
        if run.takes_key_when_due:
            self._launch(run, start_at)
        elif run.lock_key is not None and self.store.locks.acquire(run.lock_key, run.task_id, self.owner):
            self.queues.add(run)
        else:
            self._launch(run, start_at)

    def _launch(self, run: Run, start_at: float | None) -> None:
        if start_at is not None and start_at > time.time():
            if not self.settings.immediate:  # immediate mode has no timers: it stays scheduled
                run.start_timer = self.timers.call_at(start_at, lambda: self._start(run))
        else:
            self._start(run)

    def _await_record(self, task_id: str, timeout: float = 10.0) -> RunRecord:
        """The record of a run another process has just locked (its write may still be in flight)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while (record := self.store.get_run(task_id)) is None:
            if time.monotonic() > deadline:
                raise LockedError(f"{task_id} (its holder never recorded the run)", task_id)
            time.sleep(delay)  # another process's write-behind lands within milliseconds
            delay = min(delay * 2, 0.05)
        return record

    # ----------------------------------------------------------------- start

    def _start(self, run: Run) -> None:
        if run.takes_key_when_due:  # due now: it waits for its key if another run has it
            run.takes_key_when_due = False
            if self.store.locks.acquire(run.lock_key, run.task_id, self.owner) is not None:  # type: ignore[arg-type]
                self.queues.add(run)
                self.queues.wake(run.lock_key)  # type: ignore[arg-type]
                return
        with run.lock:
            if run.phase != "waiting":
                return
            run.phase = "running"
        if run.task.replaced_by is not None:
            run.follow_redefinition()
        self._executor(run.task).start(run)

    def mark_running(self, run: Run) -> None:
        now = time.time()

        def start(record: RunRecord) -> RunRecord:
            return evolve(record, status=RUNNING, attempt=record["attempt"] + 1, started_at=now,
                          owner=self.owner, error=None, traceback=None)

        self.store.update_run(run.task_id, start)
        if run.task.timeout and not self.settings.immediate:
            self._arm_deadline(run, now + run.task.timeout)

    def _arm_deadline(self, run: Run, deadline: float) -> None:
        old, run.deadline_timer = run.deadline_timer, self.timers.call_at(deadline, lambda: self._expire(run))
        if old is not None:
            old.cancel()
        self.update(run.task_id, lambda r: evolve(r, deadline=deadline))

    # ------------------------------------------------------------ finishing

    def finish(self, run: Run, outcome: Outcome) -> None:
        """Record how an attempt ended: done, or (for a failure with attempts left) a retry."""
        run.settle_output()
        if run.deadline_timer is not None:
            run.deadline_timer.cancel()
        now = time.time()
        changes, retry_in = self._ending(run, outcome, now)
        with run.lock:
            if run.phase == "done":
                return  # shutdown already recorded how it ended; the late outcome is dropped
            if run.stop_reason and outcome[0] != "stop":  # asked for after the attempt ended, and
                changes, retry_in = self._ending(run, ("stop", run.stop_reason), now)  # told True: it wins
            run.phase = "waiting" if retry_in is not None else "done"
            run.aio_task = None
        record = self.store.update_run(run.task_id, lambda r: None if r["status"] in FINISHED else evolve(r, **changes))
        if retry_in is not None:
            self._callback(run, record)
            if self.settings.immediate:
                self._start(run)
            else:
                run.start_timer = self.timers.call_later(retry_in, lambda: self._start(run))
            return
        self._settle(run, record)

    def _ending(self, run: Run, outcome: Outcome, now: float) -> tuple[dict[str, Any], float | None]:
        """The record's changes for how an attempt ended, and the wait before a retry (None: final)."""
        kind, detail = outcome
        if kind == "ok":
            return {"status": COMPLETED, "completed_at": now, **detail}, None
        if kind == "stop":  # (and it has stopped: a reader of the record is told so)
            if detail == "timeout":
                return dict(status=TIMEOUT, completed_at=now, error=f"timed out after {run.task.timeout:g}s",
                            stopping=None), None
            return dict(status=CANCELLED, completed_at=now, error="cancelled", stopping=None), None
        failure: Failure = detail
        record = self.store.get_run(run.task_id) or {}
        if record.get("status") == RUNNING and record["attempt"] < run.task.retries + 1 \
                and run.task.should_retry(failure.exception):  # a run that never started is no attempt
            retry_in = 0.0 if self.settings.immediate else run.task.retry_wait(record.get("attempt", 1))
            return dict(status=RETRY, error=failure.error, traceback=failure.traceback,
                        scheduled_for=now + retry_in if retry_in else None), retry_in
        return dict(status=FAILED, completed_at=now, error=failure.error, traceback=failure.traceback), None

    def _settle(self, run: Run, record: RunRecord | None) -> None:
        """After a final status: free the lock, call back, arm the next repeat. The run stays
        live here until then, so a cancel request for it waits until its next run is armed."""
        try:
            if run.lock_key is not None:
                self.store.locks.release(run.lock_key, run.task_id)
                self.queues.wake(run.lock_key)
            if record is None:
                return
            self._callback(run, record)
            if record.get("every") and record["status"] != CANCELLED:
                self._repeat(run, record)
        finally:
            with self._live_lock:
                self._live.pop(run.task_id, None)

    def _repeat(self, run: Run, record: RunRecord) -> None:
        every = record["every"]
        due = record.get("scheduled_for") or record["created_at"]
        due += every * max(1, int((time.time() - due) // every) + 1)  # skip slots missed while busy
        try:
            self.submit(run.task.newest(), run.args, run.kwargs, record.get("params") or {}, session=run.session,
                        target=run.target, start_at=due, every=every, series=record.get("series"),
                        extra={"display_name": record.get("display_name")})
        except StoreError as exc:  # the store takes no new runs: the series ends here, and says why
            log.error("capsule_nb: the repeat of %s ends after run %s: %s", run.task.name, run.task_id, exc)

    def _callback(self, run: Run, record: RunRecord | None) -> None:
        if run.task.callback_url and record is not None:
            self._callbacks.send(run.task.callback_url, record)

    # ------------------------------------------------------- cancel/refresh

    def cancel(self, task_id: str) -> bool:
        """Stop a run in any state; True if it was stopped, or if its owner (another live
        process) was asked to stop it: the owner does at its next maintenance pass, and a
        request its owner dies before answering settles the run as ``cancelled``."""
        with self._live_lock:
            run = self._live.get(task_id)
        if run is None:
            holder = self.holder(task_id)
            return holder.cancel(task_id) if holder is not None else elsewhere.cancel(self, task_id)
        with run.lock:
            phase = run.phase
            if phase == "waiting":
                run.phase = "done"
                run.stop_reason = "cancel"
            elif phase == "running" and not run.stop_reason:
                run.stop_reason = "cancel"
                unbegun = self._executor(run.task).interrupt(run)
            else:
                return phase == "running"  # (a stop is under way)
        if phase == "running":
            if unbegun:
                self.finish(run, ("stop", "cancel"))
            else:
                self._stopping(run)
            return True
        if run.start_timer is not None:
            run.start_timer.cancel()
        queued = self.queues.take_out(run)  # waiting for its key: it does not hold it
        record = self.update(task_id, cancelled)
        if record is not None and not queued:
            self._settle(run, record)
        else:
            with self._live_lock:
                self._live.pop(task_id, None)
        return True

    def _stopping(self, run: Run) -> None:
        """Say on the record that a running run was asked to stop: a thread run stops only
        between two Python steps, so one blocked in a call (a sleep, a socket read) runs on
        until the call returns, and its card says it is stopping, not just running."""
        reason = run.stop_reason
        self.store.update_run(run.task_id, lambda r: None if r["status"] in FINISHED or r.get("stopping")
                              else evolve(r, stopping=reason))

    def cancel_series(self, record: RunRecord) -> bool:
        """Stop what is left of the repeat ``record`` belongs to (its unfinished runs)."""
        series = record.get("series")
        if not series:
            return False
        live = [r for r in self.store.unfinished_runs() if r.get("series") == series]
        return any([self.cancel(r["task_id"]) for r in live])

    def _expire(self, run: Run) -> None:
        asked = refreshes.asked_at(self.store, run.task_id)  # by another process, meanwhile
        if asked is not None and asked + run.task.timeout > time.time():
            self._arm_deadline(run, asked + run.task.timeout)
            return
        with run.lock:
            if run.phase != "running" or run.stop_reason:
                return
            run.stop_reason = "timeout"
            self._executor(run.task).interrupt(run)
        self._stopping(run)

    def refresh(self, task_id: str) -> bool:
        """Push a running run's deadline to now + timeout (a heartbeat for long work); a run
        another live process owns is asked through the store (``store.refreshes``)."""
        with self._live_lock:
            run = self._live.get(task_id)
        if run is None:
            holder = self.holder(task_id)
            return holder.refresh(task_id) if holder is not None else elsewhere.refresh(self, task_id)
        if not run.task.timeout or run.phase != "running":
            return False
        self._arm_deadline(run, time.time() + run.task.timeout)
        return True

    # ------------------------------------------------------ maintenance

    def start_maintenance(self) -> None:
        self.upkeep.start()

    def recover(self) -> int:
        return self.upkeep.recover()

    def adopt(self, task: "Task") -> int:
        return self.upkeep.adopt(task)

    def watch(self, record: RunRecord) -> Any:
        """A context in which another process's changes to ``record``'s run reach the events."""
        return self.upkeep.watch(record)

    # --------------------------------------------------------- process runs

    @property
    def processes(self) -> Any:
        """The local worker processes of ``process=True`` runs (started on first use; the lock
        only then, since every process submit asks)."""
        if self._processes is not None:
            return self._processes
        with self._live_lock:
            if self._processes is None:
                from ..workers.pool import ProcessPool

                self._processes = ProcessPool()
            return self._processes

    @property
    def cluster(self) -> Any:
        """Where ``process=True`` runs go: a ``DaskBackend``, or None for the local workers."""
        return self._cluster

    @cluster.setter
    def cluster(self, client: Any) -> None:
        """Send ``process=True`` runs to a ``distributed.Client`` (None: back to local workers).
        Runs in flight end where they run; the same client again (a cell run again) changes nothing."""
        old = self._cluster
        if client is not None and old is not None and old.client is client:
            return
        if client is None:
            self._cluster = None
        else:  # (imported only then: an app without a cluster never loads it)
            from ..workers.dask import DaskBackend

            self._cluster = DaskBackend(client)
        if old is not None:
            old.retire()

    # -------------------------------------------------------------- shutdown

    def let_go(self, run: Run) -> None:
        """Leave ``run`` to a later kernel as this process goes away: a waiting run stays as
        it is, a running one is retried or failed (``interrupted``)."""
        with self._live_lock:
            self._live.pop(run.task_id, None)
        with run.lock:
            run.phase = "done"
        self.update(run.task_id, interrupted)
        if run.job is not None and run.job.kill("interrupted"):
            try:  # the key is free only once the body has stopped, or a queued run could overlap it
                run.job.wait(_LET_GO_KILL_SECONDS)
            except TimeoutError:
                pass
        if run.lock_key is not None:
            self.store.locks.release(run.lock_key, run.task_id)

    def shutdown(self) -> None:
        """Record what is still running as interrupted, then make it all durable."""
        self.upkeep.stop()
        with self._live_lock:
            live = list(self._live.values())
            self._live.clear()
        for run in live:
            self.let_go(run)
        processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown(wait=False)
        self.cluster = None  # its jobs were let go (killed) just above: it stops as they end
        self.store.flush()

