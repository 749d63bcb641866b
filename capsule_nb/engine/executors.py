"""The four ways a run executes, each with its way to stop.

| executor    | runs on                                   | a cancel or timeout               |
|-------------|-------------------------------------------|-----------------------------------|
| async       | an asyncio task on the runtime's loop     | ``task.cancel()``, at once        |
| thread      | a daemon worker thread                    | an exception raised in the thread |
| process     | a worker process (or Dask)                | ``SIGKILL`` of the worker         |
| immediate   | the caller, to its end, inside ``submit`` | only asked (``session.cancelled``) |

Each ends an attempt with one ``Outcome`` for ``Runtime.finish``:
``("ok", result fields)``, ``("stop", "cancel" | "timeout")`` or
``("error", Failure)``. The immediate executor is for tests: no threads,
no timers, so a retry follows at once and a timeout is not enforced.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import threading
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from ..store.owners import process_owner
from ..workers.outcome import SHUT_DOWN
from .context import bound_session, current_run
from .run import Failure, Run

if TYPE_CHECKING:
    from .runtime import Runtime

Outcome = tuple[str, Any]


class _Interrupt(BaseException):
    """Raised inside a thread run to stop it (BaseException: ``except Exception`` must not swallow it)."""


class LoopClosed(Exception):
    """An async run's event loop cancelled it on its way out (a script's ``asyncio.run`` that
    returned before the run ended): the attempt was interrupted, as by a dying process,
    and is retried if attempts remain. Nobody asked for a cancel."""


class Executor:
    def __init__(self, runtime: "Runtime"):
        self.runtime = runtime

    def start(self, run: Run) -> None:
        raise NotImplementedError

    def interrupt(self, run: Run) -> bool:
        """Stop a running run; caller holds ``run.lock`` and has set ``run.stop_reason``.
        True: the attempt never began and never will, so the caller settles the run now."""
        return False

    # An attempt handed to a loop or a thread pool may wait there; whichever comes first,
    # its body or a stop, claims it: a cancel before the body settles the run at once, as
    # never started, and the body, coming later, does nothing.

    @staticmethod
    def _begins(run: Run) -> bool:
        """The body's claim (False: a stop came first and settled the run)."""
        with run.lock:
            began, run.claimed = not run.claimed, True
        return began

    @staticmethod
    def _unbegun(run: Run) -> bool:
        """A stop's claim, under ``run.lock``: True if the body has not begun, and now never will."""
        unbegun, run.claimed = not run.claimed, True
        return unbegun

    def context(self, run: Run) -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(current_run.set, run)
        ctx.run(bound_session.set, self.session(run))
        return ctx

    def session(self, run: Run) -> Any:
        """The session the run's code sees, the same object each time: for a function that
        takes one, bound to the run (``Session.bound_to``), so that threads the function
        starts, which do not carry the run's context, still report to the run through it."""
        view = run.session_view
        if view is None:
            view = run.session or self.runtime.default_session
            if run.task.session_param and hasattr(view, "bound_to"):
                view = view.bound_to(run)
            run.session_view = view
        return view

    def outcome(self, run: Run, call: Callable[[], Any]) -> Outcome:
        """Call the task (after marking it running) and say how the attempt ended."""
        self.runtime.mark_running(run)
        try:
            if run.stop_reason:
                raise _Interrupt
            value = call()
        except (_Interrupt, asyncio.CancelledError):
            return "stop", run.stop_reason or "cancel"
        except BaseException as exc:  # the run's failure is data, not our crash
            return self.ended(run, error=exc)
        return self.ended(run, value)

    def ended(self, run: Run, value: Any = None, *, error: BaseException | None = None) -> Outcome:
        """How an attempt that returned ``value`` (or raised ``error``) ended: a stop asked
        for meanwhile wins over what the function did."""
        if run.stop_reason:
            return "stop", run.stop_reason
        if error is not None:
            return "error", Failure.of(error)
        return "ok", self.runtime.results.keep(run.task_id, value)


class AsyncExecutor(Executor):
    def start(self, run: Run) -> None:
        """On the loop's thread the task is made at once, so it runs before what the caller
        schedules next (``gather`` of waits finds noop runs already done)."""
        run.claimed = False
        loops = self.runtime.loops
        if loops.on_loop_thread():  # the task copies this context, as asyncio.create_task does
            run.aio_task = loops.loop.create_task(self._async_body(run))
        else:
            loops.call_soon(self._spawn, run, contextvars.copy_context())

    def _spawn(self, run: Run, ctx: contextvars.Context) -> None:
        run.aio_task = self.runtime.loops.loop.create_task(self._async_body(run), context=ctx)

    async def _async_body(self, run: Run) -> None:
        if not self._begins(run):
            return
        current_run.set(run)  # in the task's own context: no copy of its own made at submit
        bound_session.set(self.session(run))
        self.runtime.mark_running(run)
        outcome: Outcome
        try:
            if run.stop_reason:
                raise asyncio.CancelledError
            value = await run.task.invoke(run.args, run.kwargs, self.session(run))
        except asyncio.CancelledError:
            if run.stop_reason or not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                outcome = ("stop", run.stop_reason or "cancel")
            else:  # cancelled from outside: only a closing loop (asyncio.run's end) cancels every task
                self.runtime.loops.forget(asyncio.get_running_loop())
                outcome = ("error", Failure(LoopClosed(), _LOOP_CLOSED, ""))
        except BaseException as exc:
            outcome = self.ended(run, error=exc)
        else:
            outcome = self.ended(run, value)
        self.runtime.finish(run, outcome)

    def interrupt(self, run: Run) -> bool:
        if self._unbegun(run):
            return True
        if run.aio_task is not None:
            self.runtime.loops.loop.call_soon_threadsafe(run.aio_task.cancel)
        return False


_LOOP_CLOSED = ("interrupted: the event loop it ran on closed first (asyncio.run returned before the run "
                "ended; await it there)")


class ThreadExecutor(Executor):
    def start(self, run: Run) -> None:
        run.claimed = False
        self.runtime.threads.submit(self.context(run).run, self._body, run)

    def _body(self, run: Run) -> None:
        if self._begins(run):  # (else cancelled while it waited for a free thread)
            self.runtime.finish(run, self.outcome(run, lambda: self._call(run)))

    def _call(self, run: Run) -> Any:
        try:
            with run.lock:
                run.thread_id = threading.get_ident()
                run.in_function = True
            if run.stop_reason:
                raise _Interrupt
            return run.task.invoke(run.args, run.kwargs, self.session(run))
        finally:
            with run.lock:
                run.in_function = False
                if run.interrupt_sent:  # drop an interrupt that has not landed yet
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread_id), None)

    def interrupt(self, run: Run) -> bool:
        if self._unbegun(run):  # still queued for a thread (all of them are busy)
            return True
        if run.in_function and run.thread_id is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread_id), ctypes.py_object(_Interrupt))
            run.interrupt_sent = True
        return False


class ProcessExecutor(Executor):
    """A worker process (or the Dask cluster) runs it. No thread waits for it: the job's
    done callback finishes the run on the back end's delivery thread."""

    def start(self, run: Run) -> None:
        link = _ProcessLink(self, run, self.runtime.cluster)  # where this run goes, whatever configure() says later
        try:
            job = (link.cluster or self.runtime.processes).submit(run.call, on_message=link,
                                                                  memory_limit=run.task.memory_limit)
        except Exception as exc:
            self.runtime.finish(run, ("error", Failure.of(exc)))
            return
        with run.lock:
            run.job = job
            stop = run.stop_reason
        if stop:
            job.kill(stop)
        job.add_done_callback(link.ended)

    def _started(self, run: Run, cluster: Any, data: dict) -> None:
        """A worker took the run: the run (and its timeout) starts now."""
        if run.lock_key is not None and "pid" in data and cluster is None:  # a local worker
            self.runtime.store.locks.note_worker(run.lock_key, run.task_id, process_owner(data["pid"]))
        self.runtime.mark_running(run)

    def _show_task(self, run: Run, task_id: str, message: str | None) -> None:
        """What would fail the call in a thread run (an unknown id) cannot reach the worker,
        which has moved on: it goes to the run's log."""
        try:
            self.session(run).show_task(task_id, message=message)
        except Exception as exc:
            run.message("log", f"{type(exc).__name__}: {exc}")

    def _job_ended(self, run: Run, outcome: Any) -> None:
        if outcome.reason == SHUT_DOWN and not run.stop_reason:  # this process is exiting
            self.runtime.let_go(run)
        elif run.stop_reason:
            self.runtime.finish(run, ("stop", run.stop_reason))
        elif outcome.ok:
            self.runtime.finish(run, ("ok", self.runtime.results.keep(run.task_id, outcome.value)))
        else:
            failure = Failure.from_worker(outcome.exception, outcome.error, outcome.traceback)
            self.runtime.finish(run, ("error", failure))

    def interrupt(self, run: Run) -> bool:
        if run.job is not None:  # else start() sees stop_reason once it has the job
            run.job.kill(run.stop_reason or "cancel")  # (a queued job ends at once, unstarted)
        return False


class ImmediateExecutor(Executor):
    """Runs the attempt in the caller, to its end (``App(executor="immediate")``)."""

    def start(self, run: Run) -> None:
        session = self.session(run)
        if run.task.is_async:
            outcome = self.context(run).run(self.outcome, run, lambda: _run_to_end(
                run.task.invoke(run.args, run.kwargs, session)))
        else:
            outcome = self.context(run).run(self.outcome, run, lambda: run.task.invoke(run.args, run.kwargs, session))
        self.runtime.finish(run, outcome)


def _run_to_end(coro: Coroutine) -> Any:
    """The coroutine's value, in the calling thread. Outside a loop it gets a private loop;
    inside one (a cell, an async test) it is stepped by hand and must not wait on the loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    try:
        while True:
            if coro.send(None) is not None:
                coro.close()
                raise RuntimeError("an immediate-mode async task cannot wait on the event loop it was "
                                   "submitted from; submit it from sync code, or use the default executor")
    except StopIteration as stop:
        return stop.value


class _Forward:
    """An ``on_message`` that replays a worker's calls on ``run``.

    The child makes its own message ids (it needs one at once, for
    ``extend_message``); this maps them to the ids ``run.message`` returns.
    An object with slots, not a closure: a burst keeps thousands alive, and
    each cell and function of a closure is scanned by every garbage collection.
    """

    __slots__ = ("run", "ids")

    def __init__(self, run: Any):
        self.run = run
        self.ids: dict[str, str] | None = None  # made by the first message: most runs send none

    def __call__(self, kind: str, data: dict) -> None:
        run = self.run
        if kind == "capture":
            run.capture(data["stream"], data["text"])
        elif kind == "message":
            if self.ids is None:
                self.ids = {}
            self.ids[data["id"]] = run.message(data["kind"], data["text"], **data.get("extra", {}))
        elif kind == "extend":
            run.extend_message(self._id(data["id"]), data["text"])
        elif kind == "end":
            run.end_message(self._id(data["id"]))
        elif kind == "progress":
            run.progress(data["done"], data["total"], data["message"])

    def _id(self, child_id: str) -> str:
        return child_id if self.ids is None else self.ids.get(child_id, child_id)


def forward_to(run: Any) -> Callable[[str, dict], None]:
    """An ``on_message`` that replays a worker's calls on ``run`` (``_Forward``)."""
    return _Forward(run)


class _ProcessLink(_Forward):
    """A process run's ``on_message`` and done callback, for its job's back end."""

    __slots__ = ("executor", "cluster")

    def __init__(self, executor: ProcessExecutor, run: Run, cluster: Any):
        self.run = run  # (as ``_Forward.__init__``, without the call: one of these per submit)
        self.ids = None
        self.executor = executor
        self.cluster = cluster

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "started":
            self.executor._started(self.run, self.cluster, data)
        elif kind == "show":  # the worker's show_task: the run's session here draws the card
            executor = self.executor
            executor.context(self.run).run(executor._show_task, self.run, data["task_id"], data["message"])
        else:
            super().__call__(kind, data)

    def ended(self, outcome: Any) -> None:
        self.executor._job_ended(self.run, outcome)
