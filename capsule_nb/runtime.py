"""The runtime: where runs start, retry, time out, get cancelled and finish.

Async task functions run as asyncio tasks on the bound loop (the kernel's
in a notebook); sync ones in a thread pool, so neither blocks the kernel.
Every method here is safe to call from any thread: record changes go
through ``Store.update_run`` (atomic), loop work through
``call_soon_threadsafe``, and deadlines through the timer thread. A thread
run therefore starts, finishes, times out and is recorded even while a
long cell keeps the kernel's loop busy.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import json
import logging
import os
import threading
import time
import traceback
import urllib.request
from typing import TYPE_CHECKING, Any, Callable, Coroutine, NamedTuple

from . import _kernel, capture
from .context import bound_session, current_run
from .errors import LockedError
from .owners import owner_alive, owner_id
from .records import (
    CANCELLED,
    CLAIMED,
    COMPLETED,
    FAILED,
    FINISHED,
    MAX_OUTPUT_CHARS,
    PENDING,
    RETRY,
    RUNNING,
    SCHEDULED,
    TIMEOUT,
    WAITING,
    append_message,
    evolve,
    json_safe,
    new_task_id,
)
from .session import render_message
from .threads import WorkerPool
from .timers import Timers

if TYPE_CHECKING:
    from .app import App
    from .session import Session
    from .tasks import Task

log = logging.getLogger("capsule_nb")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
MAX_RETRY_DELAY = 3600.0  # the cap of exponential backoff
INLINE_RESULT_CHARS = 64_000  # bigger JSON results go to a payload
OUTPUT_FLUSH_SECONDS = 0.05  # how often captured output is folded into the record
MAINTAIN_SECONDS = 0.5  # how often other processes' changes and crashes are looked at


class _Interrupt(BaseException):
    """Raised inside a thread run to stop it (BaseException: ``except Exception`` must not swallow it)."""


class Failure(NamedTuple):
    """Why an attempt failed: the exception (for ``retry_for``) and its text for the record."""

    exception: BaseException
    error: str
    traceback: str | None

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        """The traceback starts at the task's own code: our frames above it are noise."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return cls(exc, f"{type(exc).__name__}: {exc}", text)


class Run:
    """What this process knows of one run while it is live (the record is the durable part)."""

    def __init__(self, runtime: "Runtime", task: "Task", task_id: str, args: tuple, kwargs: dict,
                 session: "Session | None", target: dict | None, lock_key: str | None):
        self.runtime = runtime
        self.task = task
        self.task_id = task_id
        self.args = args
        self.kwargs = kwargs
        self.session = session
        self.target = target if session is not None else None
        self.lock_key = lock_key
        self.lock = threading.Lock()
        self.phase = "waiting"  # waiting -> running -> (waiting for a retry) -> done
        self.stop_reason: str | None = None  # "cancel" or "timeout"
        self.thread_id: int | None = None
        self.in_function = False
        self.interrupt_sent = False
        self.aio_task: asyncio.Task | None = None
        self.job: Any = None  # the worker-process job of a process=True run
        self.start_timer: Any = None
        self.deadline_timer: Any = None
        self._out: list[tuple[str, str]] = []
        self._out_flushed = 0.0

    # Called from task code (any thread) through capture and Session.

    def capture(self, stream: str, text: str) -> None:
        with self.lock:
            self._out.append((stream, text))
            due = time.monotonic() - self._out_flushed > OUTPUT_FLUSH_SECONDS
        if due:
            self.flush_output()

    def flush_output(self) -> None:
        with self.lock:
            chunks, self._out = self._out, []
            self._out_flushed = time.monotonic()
        if chunks:
            self.runtime.update(self.task_id, lambda r: evolve(r, output=_merge_output(r.get("output"), chunks)))

    def message(self, kind: str, text: str, **extra: Any) -> str:
        message_id = new_task_id()
        self.runtime.update(
            self.task_id, lambda r: evolve(r, messages=append_message(r, kind, text, id=message_id, **extra))
        )
        if kind != "log":
            _kernel.emit(self.target, render_message(kind, text, extra))
        return message_id

    def extend_message(self, message_id: str, text: str) -> None:
        def grow(record: dict) -> dict:
            messages = [dict(m, text=m["text"] + text) if m.get("id") == message_id else m
                        for m in record.get("messages") or ()]
            return evolve(record, messages=messages)

        self.runtime.update(self.task_id, grow)

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        value = {"done": done, "total": total, "message": message}
        self.runtime.update(self.task_id, lambda r: evolve(r, progress=value))

    def show(self, card: Any) -> bool:
        """Record a ``show_task`` message and show ``card`` under the submitting cell
        (a widget's mime bundle, whose text form stands in where widgets cannot
        draw); False when the run has no cell to show it in."""
        self.message("show_task", str(getattr(card, "task_id", "")))
        bundle = card._repr_mimebundle_()[0] if hasattr(card, "_repr_mimebundle_") else {"text/plain": repr(card)}
        return _kernel.emit(self.target, bundle)


class Runtime:
    """Owns the loop, the thread pool and the timers of one App."""

    def __init__(self, app: "App", *, max_threads: int = 32):
        self.app = app
        self.store = app.store
        self.owner = owner_id()
        self.timers = Timers()
        self._pool = WorkerPool(max_threads)
        self._callbacks = WorkerPool(1, name="capsule-callback")  # one sender keeps posts in order
        self._live: dict[str, Run] = {}
        self._live_lock = threading.Lock()
        self._queued: dict[str, list[Run]] = {}
        self._queue_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._own_loop_thread: threading.Thread | None = None
        self._results: dict[str, Any] = {}  # recent results of this process, by identity
        self._maintenance: object | None = None  # the live maintenance loop's token
        self._processes: Any = None
        self._cluster: Any = None
        self._last_prune = time.monotonic()

    # -------------------------------------------------------------- the loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop async runs use: the running one where there is one, else our own thread's."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return loop
        try:
            loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                self._loop_thread = threading.get_ident()
                loop.call_soon(ready.set)
                loop.run_forever()

            self._own_loop_thread = threading.Thread(target=serve, name="capsule-loop", daemon=True)
            self._own_loop_thread.start()
            ready.wait()
        self._loop = loop
        return loop

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the kernel's) from now on; called by ``%load_ext``."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self.loop
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def run_coroutine(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the runtime loop from another thread and wait for it."""
        if threading.get_ident() == self._loop_thread:
            coro.close()
            raise RuntimeError("cannot block the runtime's own loop; await this instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # --------------------------------------------------------------- records

    @property
    def max_threads(self) -> int:
        return self._pool.max_workers

    @max_threads.setter
    def max_threads(self, value: int) -> None:
        self._pool.max_workers = value  # the pool grows (or stops growing) from the next submit

    def update(self, task_id: str, change: Callable[[dict], dict | None]) -> dict | None:
        return self.store.update_run(task_id, change)

    # ---------------------------------------------------------------- submit

    def submit(self, task: "Task", args: tuple, kwargs: dict, params: dict[str, Any], *,
               session: "Session | None", target: dict | None, start_at: float | None = None,
               every: float | None = None, series: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[dict, int]:
        """Record a new run and start it (or arm its start); returns ``(record, generation)``."""
        if self.store.failure is not None:
            raise self.store.failure  # refuse new work while the disk refuses writes
        if task.process:
            from .processes import check_picklable

            check_picklable(args, kwargs, task.fn)  # a TypeError naming the value, before any record
        capture.install()
        now = time.time()
        task_id = new_task_id()
        lock_key = task.lock_key(params)
        stored_args, args_ok = _storable(dict(enumerate(args)))
        stored_kwargs, kwargs_ok = _storable(kwargs)
        stored_params, _ = _storable(params)
        record = {
            "task_id": task_id,
            "app": self.app.name,
            "task_name": task.name,
            "display_name": task.display_name,
            "status": SCHEDULED if start_at is not None else PENDING,
            "args": list(stored_args.values()),
            "kwargs": stored_kwargs,
            "params": stored_params,
            "created_at": now,
            "scheduled_for": start_at,
            "started_at": None,
            "completed_at": None,
            "updated_at": now,
            "attempt": 0,
            "max_attempts": task.retries + 1,
            "error": None,
            "traceback": None,
            "result": None,
            "result_repr": None,
            "result_kind": None,
            "owner": self.owner,
            "session_id": session.id if session is not None else None,
            "lock_key": lock_key,
            "every": every,
            "series": series or (task_id if every else None),
            "messages": [],
            "output": [],
            "progress": None,
            "process": task.process,
            **(extra or {}),
        }
        if lock_key is not None:
            holder = self.store.acquire_lock(lock_key, task_id, self.owner)
            if holder is not None:
                if task.on_lock == "reject":
                    raise LockedError(lock_key, holder)
                if task.on_lock == "join":
                    return self._await_record(holder), self.store.generation
                record["queued"] = True
        if not (args_ok and kwargs_ok):
            try:  # kept so another kernel can resume the run; in-kernel runs go ahead without
                self.store.put_payload(task_id, "args", (args, kwargs))
                record["args_payload"] = True
            except Exception:
                record["args_payload"] = False
        run = Run(self, task, task_id, args, kwargs, session, target, lock_key)
        gen = self.store.put_run(record)
        if record.get("queued"):
            with self._live_lock:
                self._live[task_id] = run
                self._queued.setdefault(lock_key, []).append(run)  # type: ignore[arg-type]
            self._wake_queue(lock_key)  # the holder may have finished meanwhile
        else:
            self._launch(run, start_at)
        return record, gen

    def _launch(self, run: Run, start_at: float | None) -> None:
        with self._live_lock:
            self._live[run.task_id] = run
        if start_at is not None and start_at > time.time():
            run.start_timer = self.timers.call_at(start_at, lambda: self._start(run))
        else:
            self._start(run)

    def _await_record(self, task_id: str, timeout: float = 10.0) -> dict:
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
        with run.lock:
            if run.phase != "waiting":
                return
            run.phase = "running"
        if run.task.process:  # a pool thread waits on the child, so the loop never does
            self._pool.submit(self._context(run).run, self._process_body, run)
        elif run.task.is_async:
            ctx = self._context(run)
            self.call_soon(self._spawn, run, ctx)
        else:
            self._pool.submit(self._context(run).run, self._thread_body, run)

    def _context(self, run: Run) -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(current_run.set, run)
        ctx.run(bound_session.set, run.session or self.app.owner_session)
        return ctx

    def _mark_running(self, run: Run) -> None:
        now = time.time()

        def start(record: dict) -> dict:
            return evolve(record, status=RUNNING, attempt=record["attempt"] + 1, started_at=now,
                          owner=self.owner, error=None)

        self.update(run.task_id, start)
        if run.task.timeout:
            self._arm_deadline(run, now + run.task.timeout)

    def _arm_deadline(self, run: Run, deadline: float) -> None:
        old, run.deadline_timer = run.deadline_timer, self.timers.call_at(deadline, lambda: self._expire(run))
        if old is not None:
            old.cancel()
        self.update(run.task_id, lambda r: evolve(r, deadline=deadline))

    def _spawn(self, run: Run, ctx: contextvars.Context) -> None:
        run.aio_task = self.loop.create_task(self._async_body(run), context=ctx)

    async def _async_body(self, run: Run) -> None:
        self._mark_running(run)
        outcome: tuple[str, Any]
        try:
            if run.stop_reason:
                raise asyncio.CancelledError
            value = await run.task.invoke(run.args, run.kwargs, run.session or self.app.owner_session)
        except asyncio.CancelledError:
            outcome = ("stop", run.stop_reason or "cancel")
        except BaseException as exc:  # the run's failure is data, not our crash
            outcome = ("stop", run.stop_reason) if run.stop_reason else ("error", Failure.of(exc))
        else:
            outcome = ("stop", run.stop_reason) if run.stop_reason else ("ok", self._result_fields(run, value))
        self._finish(run, outcome)

    def _thread_body(self, run: Run) -> None:
        self._mark_running(run)
        outcome: tuple[str, Any]
        try:
            try:
                with run.lock:
                    run.thread_id = threading.get_ident()
                    run.in_function = True
                if run.stop_reason:
                    raise _Interrupt
                value = run.task.invoke(run.args, run.kwargs, run.session or self.app.owner_session)
            finally:
                with run.lock:
                    run.in_function = False
                    if run.interrupt_sent:  # drop an interrupt that has not landed yet
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread_id), None)
        except _Interrupt:
            outcome = ("stop", run.stop_reason or "cancel")
        except BaseException as exc:
            outcome = ("stop", run.stop_reason) if run.stop_reason else ("error", Failure.of(exc))
        else:
            outcome = ("stop", run.stop_reason) if run.stop_reason else ("ok", self._result_fields(run, value))
        self._finish(run, outcome)

    def _process_body(self, run: Run) -> None:
        """Run in a worker process (or on the Dask cluster) and wait for it, in a pool thread."""
        from .processes import forward_to, portable_session

        task = run.task
        session = portable_session(run.session or self.app.owner_session)
        kwargs = {**run.kwargs, task.session_param: session} if task.session_param else run.kwargs
        forward = forward_to(run)

        def on_message(kind: str, data: dict) -> None:
            if kind == "started":  # a worker took it: the run (and its timeout) starts now
                self._mark_running(run)
            else:
                forward(kind, data)

        try:
            job = (self.cluster or self.processes).run(task.fn, run.args, kwargs, on_message=on_message,
                                                       memory_limit=task.memory_limit, session=session)
        except Exception as exc:
            self._finish(run, ("error", Failure.of(exc)))
            return
        with run.lock:
            run.job = job
            stop = run.stop_reason
        if stop:
            job.kill(stop)
        outcome = job.wait()
        if run.stop_reason:
            self._finish(run, ("stop", run.stop_reason))
        elif outcome.ok:
            self._finish(run, ("ok", self._result_fields(run, outcome.value)))
        else:
            self._finish(run, ("error", Failure(outcome.exception, outcome.error, outcome.traceback)))

    @property
    def processes(self) -> Any:
        """The local worker processes of ``process=True`` runs (started on first use)."""
        with self._live_lock:
            if self._processes is None:
                from .processes import ProcessPool

                self._processes = ProcessPool()
            return self._processes

    @property
    def cluster(self) -> Any:
        return self._cluster

    @cluster.setter
    def cluster(self, client: Any) -> None:
        """Send ``process=True`` runs to a ``distributed.Client`` (None: back to local workers)."""
        from .dask_backend import DaskBackend

        old, self._cluster = self._cluster, (DaskBackend(client) if client is not None else None)
        if old is not None:
            old.shutdown()

    # ------------------------------------------------------------ finishing

    def _result_fields(self, run: Run, value: Any) -> dict[str, Any]:
        """How a return value is kept: inline JSON, a signed payload, or only its repr."""
        from .records import _short_repr

        self._remember_result(run.task_id, value)
        preview = _short_repr(value, 500)
        inline, ok = json_safe(value)
        if ok and len(json.dumps(inline)) <= INLINE_RESULT_CHARS:
            return {"result": inline, "result_repr": preview, "result_kind": "json"}
        try:
            size = self.store.put_payload(run.task_id, "result", value, limit=self.app.max_result_bytes)
        except Exception as exc:
            return {"result": None, "result_repr": preview, "result_kind": "repr",
                    "result_note": f"result not kept: {exc}"}
        return {"result": None, "result_repr": preview, "result_kind": "payload", "result_bytes": size}

    def _remember_result(self, task_id: str, value: Any) -> None:
        with self._live_lock:  # worker threads finish concurrently
            self._results[task_id] = value
            if len(self._results) > 1000:
                self._results.pop(next(iter(self._results)))

    def recent_result(self, task_id: str) -> tuple[bool, Any]:
        try:
            return True, self._results[task_id]
        except KeyError:
            return False, None

    def _finish(self, run: Run, outcome: tuple[str, Any]) -> None:
        run.flush_output()
        if run.deadline_timer is not None:
            run.deadline_timer.cancel()
        kind, detail = outcome
        now = time.time()
        retry_in: float | None = None
        if kind == "ok":
            changes = dict(status=COMPLETED, completed_at=now, **detail)
        elif kind == "stop":
            if detail == "timeout":
                changes = dict(status=TIMEOUT, completed_at=now, error=f"timed out after {run.task.timeout:g}s")
            else:
                changes = dict(status=CANCELLED, completed_at=now, error="cancelled")
        else:
            failure: Failure = detail
            record = self.store.get_run(run.task_id) or {}
            if record.get("attempt", 0) < run.task.retries + 1 and run.task.should_retry(failure.exception):
                retry_in = run.task.retry_wait(record.get("attempt", 1))
                changes = dict(status=RETRY, error=failure.error, traceback=failure.traceback,
                               scheduled_for=now + retry_in if retry_in else None)
            else:
                changes = dict(status=FAILED, completed_at=now, error=failure.error, traceback=failure.traceback)
        with run.lock:
            if run.phase == "done":
                return  # shutdown already recorded how it ended; the late outcome is dropped
            run.phase = "waiting" if retry_in is not None else "done"
            run.aio_task = None
        record = self.update(run.task_id, lambda r: None if r["status"] in FINISHED else evolve(r, **changes))
        if retry_in is not None:
            run.start_timer = self.timers.call_later(retry_in, lambda: self._start(run))
            self._callback(run, record)
            return
        self._settle(run, record)

    def _settle(self, run: Run, record: dict | None) -> None:
        """After a final status: free the lock, call back, arm the next repeat."""
        with self._live_lock:
            self._live.pop(run.task_id, None)
        if run.lock_key is not None:
            self.store.release_lock(run.lock_key, run.task_id)
            self._wake_queue(run.lock_key)
        if record is None:
            return
        self._callback(run, record)
        if record.get("every") and record["status"] != CANCELLED:
            self._repeat(run, record)

    def _repeat(self, run: Run, record: dict) -> None:
        every = record["every"]
        due = record.get("scheduled_for") or record["created_at"]
        now = time.time()
        due += every * max(1, int((now - due) // every) + 1)  # skip slots missed while busy
        self.submit(run.task, run.args, run.kwargs, record.get("params") or {}, session=run.session,
                    target=run.target, start_at=due, every=every, series=record.get("series"))

    def _callback(self, run: Run, record: dict | None) -> None:
        url = run.task.callback_url
        if not url or record is None:
            return
        started = record.get("started_at")
        body = {
            "task_id": record["task_id"],
            "status": record["status"],
            "duration": (time.time() - started) if started else None,
            "error": record.get("error"),
        }
        self._callbacks.submit(_post_json, url, body)

    # --------------------------------------------------------------- locks

    def _wake_queue(self, key: str) -> None:
        """Start the first run queued on ``key`` if the key is free now.

        Serialized by ``_queue_lock``: a run settling in a task thread and the
        maintenance pass may both try, and only one may take the key's next run.
        """
        with self._queue_lock:
            with self._live_lock:
                waiting = self._queued.get(key) or []
                run = waiting[0] if waiting else None
            if run is None or self.store.acquire_lock(key, run.task_id, self.owner) is not None:
                return
            with self._live_lock:
                if run in waiting:  # a cancel may have taken it out meanwhile
                    waiting.remove(run)
                if not waiting:
                    self._queued.pop(key, None)
        self._start(run)

    # ------------------------------------------------------- cancel/refresh

    def cancel(self, task_id: str) -> bool:
        """Stop a run in any state; True if something was cancelled."""
        with self._live_lock:
            run = self._live.get(task_id)
        if run is None:
            record = self.store.get_run(task_id)
            if record is None:
                return False
            if record["status"] in FINISHED:
                return self._cancel_series(record)
            if record.get("owner") != self.owner and owner_alive(record.get("owner", "")):
                return self._request_cancel(record)
            # a run nobody is working on (its owner died): just record the end
            return self.update(task_id, lambda r: _cancelled(r)) is not None
        with run.lock:
            phase = run.phase
            if phase == "waiting":
                run.phase = "done"
                run.stop_reason = "cancel"
            elif phase == "running" and not run.stop_reason:
                run.stop_reason = "cancel"
                self._interrupt(run)
            else:
                return False
        if phase == "waiting":
            if run.start_timer is not None:
                run.start_timer.cancel()
            with self._live_lock:
                queue = self._queued.get(run.lock_key or "", [])
                if run in queue:
                    queue.remove(run)
            record = self.update(task_id, _cancelled)
            if record is not None and not record.get("queued"):
                self._settle(run, record)
            else:
                with self._live_lock:
                    self._live.pop(task_id, None)
        return True

    def _cancel_series(self, record: dict) -> bool:
        series = record.get("series")
        if not series:
            return False
        live = [r for r in self.store.unfinished_runs() if r.get("series") == series]
        return any([self.cancel(r["task_id"]) for r in live])

    def _request_cancel(self, record: dict) -> bool:
        self.store.request_cancel(record["task_id"])  # its owner acts on it at its next poll
        return True

    def _expire(self, run: Run) -> None:
        with run.lock:
            if run.phase != "running" or run.stop_reason:
                return
            run.stop_reason = "timeout"
            self._interrupt(run)

    def _interrupt(self, run: Run) -> None:
        """Stop a running run; caller holds ``run.lock``."""
        if run.task.process:
            if run.job is not None:  # else the body sees stop_reason before it starts the job
                run.job.kill(run.stop_reason or "cancel")
        elif run.task.is_async:
            if run.aio_task is not None:
                self.loop.call_soon_threadsafe(run.aio_task.cancel)
        elif run.in_function and run.thread_id is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread_id), ctypes.py_object(_Interrupt))
            run.interrupt_sent = True

    def refresh(self, task_id: str) -> bool:
        """Push a running run's deadline to now + timeout (a heartbeat for long work)."""
        with self._live_lock:
            run = self._live.get(task_id)
        if run is None or not run.task.timeout or run.phase != "running":
            return False
        self._arm_deadline(run, time.time() + run.task.timeout)
        return True

    # ------------------------------------------------- other processes, crashes

    def start_maintenance(self) -> None:
        """Arm the periodic pass that notices other processes (see ``_maintain``)."""
        if self._maintenance is None:
            self._maintenance = generation = object()
            self.timers.call_later(0, lambda: self._maintain(generation))

    def _maintain(self, generation: object) -> None:
        """Every ``MAINTAIN_SECONDS``: fold in other processes' writes, act on cancel requests
        sent to our runs, free queued runs whose lock another process released, recover runs
        of dead processes, and keep the store under its retention cap."""
        try:
            self.store.poll()
            for task_id in self.store.take_cancel_requests():
                if task_id in self._live:
                    self.cancel(task_id)
            for key in list(self._queued):
                self._wake_queue(key)
            self.recover()
            now = time.monotonic()
            over = self.store.finished_count() > self.app.keep_finished * 1.1  # a burst: prune now
            if over or now - self._last_prune > 60:
                self._last_prune = now
                self.store.prune(self.app.name, self.app.keep_finished)
        except Exception:
            log.exception("capsule_nb maintenance pass failed")
        finally:
            if self._maintenance is generation:  # not stopped (or restarted) meanwhile
                self.timers.call_later(MAINTAIN_SECONDS, lambda: self._maintain(generation))

    def recover(self) -> int:
        """Runs left ``running`` by a dead process: ``retry`` if attempts remain, else
        ``failed`` with error ``interrupted``; then adopt waiting runs of dead owners."""
        recovered = 0
        for record in self.store.unfinished_runs():
            if record["app"] != self.app.name or record["status"] not in (RUNNING, CLAIMED):
                continue
            owner = record.get("owner", "")
            if owner == self.owner or owner_alive(owner):
                continue

            def take(disk: dict, owner: str = owner) -> dict | None:
                if disk.get("owner") != owner or disk["status"] not in (RUNNING, CLAIMED):
                    return None  # somebody else recovered it first
                return _interrupted(dict(disk, status=RUNNING)) if disk["status"] == CLAIMED else _interrupted(disk)

            if self.store.claim_run(record["task_id"], take) is not None:
                recovered += 1
                if record.get("lock_key"):
                    self.store.release_lock(record["lock_key"], record["task_id"])
        for task in list(self.app.tasks_defined()):
            self.adopt(task)
        return recovered

    def adopt(self, task: "Task") -> int:
        """Take over the waiting runs of ``task`` whose owner died, and arm them (once, even
        when several kernels define the task at the same moment)."""
        adopted = 0
        for record in self.store.unfinished_runs():
            if (record["app"] != self.app.name or record["task_name"] != task.name
                    or record["status"] not in WAITING or record.get("owner") == self.owner
                    or owner_alive(record.get("owner", ""))):
                continue
            old = record.get("owner")

            def take(disk: dict, old: str | None = old) -> dict | None:
                if disk.get("owner") != old or disk["status"] not in WAITING:
                    return None
                return evolve(disk, owner=self.owner)

            claimed = self.store.claim_run(record["task_id"], take)
            if claimed is None:
                continue
            try:
                args, kwargs = self.stored_arguments(claimed)
            except Exception as exc:
                error = f"cannot resume: {exc}"
                self.update(claimed["task_id"], lambda r: evolve(r, status=FAILED, completed_at=time.time(), error=error))
                continue
            session = self.app.session if claimed.get("session_id") == self.app.session.id else None
            run = Run(self, task, claimed["task_id"], args, kwargs, session, None, claimed.get("lock_key"))
            if run.lock_key is not None and self.store.acquire_lock(run.lock_key, run.task_id, self.owner):
                with self._live_lock:
                    self._live[run.task_id] = run
                    self._queued.setdefault(run.lock_key, []).append(run)
            else:
                self._launch(run, claimed.get("scheduled_for"))
            adopted += 1
        return adopted

    def stored_arguments(self, record: dict) -> tuple[tuple, dict]:
        """A run's call arguments from its record (JSON) or its signed payload."""
        if record.get("args_payload"):
            args, kwargs = self.store.get_payload(record["task_id"], "args")
            return tuple(args), dict(kwargs)
        if record.get("args_payload") is False:
            raise ValueError("its arguments could not be stored (not picklable)")
        return tuple(record.get("args") or ()), dict(record.get("kwargs") or {})

    # -------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Record what is still running as interrupted, then make it all durable."""
        self._maintenance = None
        with self._live_lock:
            live = list(self._live.values())
            self._live.clear()
        for run in live:
            with run.lock:
                run.phase = "done"
            self.update(run.task_id, _interrupted)
            if run.lock_key is not None:
                self.store.release_lock(run.lock_key, run.task_id)
            if run.job is not None:
                run.job.kill("interrupted")
        processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown(wait=False)
        self.cluster = None
        self.store.flush()


def _storable(values: dict) -> tuple[dict, bool]:
    """Each value as JSON where it can be, else its repr; and whether all were JSON."""
    stored, exact = {}, True
    for key, value in values.items():
        stored[key], ok = json_safe(value)
        exact = exact and ok
    return stored, exact


def _cancelled(record: dict) -> dict | None:
    if record["status"] in FINISHED:
        return None
    return evolve(record, status=CANCELLED, completed_at=time.time(), error="cancelled")


def _interrupted(record: dict) -> dict | None:
    if record["status"] in FINISHED:
        return None
    if record["status"] == RUNNING and record["attempt"] < record["max_attempts"]:
        return evolve(record, status=RETRY, error="interrupted")
    if record["status"] == RUNNING:
        return evolve(record, status=FAILED, error="interrupted", completed_at=time.time())
    return None  # waiting runs stay as they are: the next kernel resumes them


def _merge_output(output: list | None, chunks: list[tuple[str, str]]) -> list[dict]:
    merged = [dict(x) for x in output or ()]
    for stream, text in chunks:
        if merged and merged[-1]["stream"] == stream:
            merged[-1]["text"] += text
        else:
            merged.append({"stream": stream, "text": text})
    total = sum(len(x["text"]) for x in merged)
    while total > MAX_OUTPUT_CHARS and merged:
        cut = min(len(merged[0]["text"]), total - MAX_OUTPUT_CHARS)
        merged[0]["text"] = "…" + merged[0]["text"][cut + 1 :] if cut < len(merged[0]["text"]) else ""
        total -= cut
        if not merged[0]["text"]:
            merged.pop(0)
    return merged


def _post_json(url: str, body: dict) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read(0)
    except Exception as exc:  # a callback is a courtesy: log and carry on
        log.warning("capsule_nb callback to %s for run %s failed: %s", url, body["task_id"], exc)
