"""The life of a worker process: take a job, run it, report, wait for the next.

Inside the worker, ``engine.context.current_run`` is a ``ChildRun`` whose
``capture``/``message``/``extend_message``/``progress``/``show_task`` go to
the parent over the job's pipe, so ``session.reply`` and ``print`` work
unchanged and ``session.show_task`` draws its card in the parent.
Output is routed by ``engine.capture`` (the same streams as in a kernel)
to the job the worker is running, from whatever thread prints, and sent in
whole lines. ``faulthandler`` writes to a pipe the parent reads after a
crash, so a segfault's outcome carries the Python stack where it happened.

The forkserver preloads this module, so it imports little: no widgets, no
kernel.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import logging
import multiprocessing.connection
import os
import pickle
import select
import signal
import threading
import time
import traceback
import uuid
from typing import Any

import cloudpickle

from ..engine import capture
from ..engine.context import bound_session, current_run
from ..store import flush_all
from .outcome import ERROR, OK, PayloadError, size
from .pickling import pickle_value, unpicklable

log = logging.getLogger("capsule_nb")

_LINE_BUFFER = 8192  # characters a ChildRun keeps before sending a line that has not ended


class ChildRun:
    """``current_run`` inside a worker: what ``Session`` and the output capture call, sent to the parent."""

    stop_reason: str | None = None  # a process job is stopped by SIGKILL, never asked

    def __init__(self, worker: "_ChildWorker", job_id: str):
        self._worker = worker
        self._job_id = job_id
        self._lock = threading.Lock()
        self._out: dict[str, list[str]] = {}

    def _send(self, kind: str, data: dict) -> None:
        self._worker.send(("msg", self._job_id, kind, data))

    def capture(self, stream: str, text: str) -> None:
        """Buffered to whole lines: a print is one message, not three."""
        with self._lock:
            buffer = self._out.setdefault(stream, [])
            buffer.append(text)
            due = "\n" in text or sum(map(len, buffer)) > _LINE_BUFFER
        if due:
            self.flush_output()

    def flush_output(self) -> None:
        with self._lock:
            chunks = [(stream, "".join(parts)) for stream, parts in self._out.items() if parts]
            self._out = {}
        for stream, text in chunks:
            self._send("capture", {"stream": stream, "text": text})

    def message(self, kind: str, text: str, **extra: Any) -> str:
        self.flush_output()  # a print before a reply shows before it
        message_id = uuid.uuid4().hex[:16]
        self._send("message", {"id": message_id, "kind": kind, "text": str(text), "extra": extra})
        return message_id

    def extend_message(self, message_id: str, text: str) -> None:
        self._send("extend", {"id": message_id, "text": str(text)})

    def end_message(self, message_id: str) -> None:
        self._send("end", {"id": message_id})

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        self._send("progress", {"done": done, "total": total, "message": message})

    def show_task(self, task_id: str, message: str | None) -> None:
        """Ask the parent to draw the run's card and record the ``show_task`` message, as it
        does for a run of its own: a worker knows no widgets."""
        self.flush_output()  # a print before the card shows before it
        self._send("show", {"task_id": task_id, "message": message})


class _ChildWorker:
    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn
        self.job: ChildRun | None = None
        self._send_lock = threading.Lock()
        self._kept: tuple[bytes, tuple] | None = None  # a kept function's bytes and what they unpickled to
        capture.install(route=lambda: self.job)  # prints from any thread go to the running job

    def send(self, message: tuple) -> None:
        try:
            data = pickle.dumps(message, protocol=5)
        except Exception:  # an odd ``extra`` in a session message: send its text instead
            data = pickle.dumps(_textified(message), protocol=5)
        with self._send_lock:
            self.conn.send_bytes(data)

    def serve(self) -> None:
        try:
            self.send(("ready", os.getpid()))
        except (BrokenPipeError, EOFError):  # the parent exited while this worker started: nothing to say
            return
        while True:
            try:
                tag, job_id, function, arguments, memory_limit, kept = pickle.loads(self.conn.recv_bytes())
            except EOFError:
                return
            if tag != "job":
                return
            if not self.run_job(job_id, function, arguments, memory_limit, kept):
                return  # recycle: the parent starts a fresh worker when one is needed

    def _function(self, function: bytes, kept: bool) -> tuple:
        """``(fn, session, session_param)`` from ``function``; what the last kept bytes gave, when
        these are the same (``pickling.Call``)."""
        if kept and self._kept is not None and self._kept[0] == function:
            return self._kept[1]
        loaded = cloudpickle.loads(function)
        if kept:
            self._kept = (function, loaded)
        return loaded

    def run_job(self, job_id: str, function: bytes, arguments: bytes, memory_limit: int | None,
                kept: bool = False) -> bool:
        """Run one job and send its ``done``; False if this worker should exit afterwards."""
        run = self.job = ChildRun(self, job_id)
        run_token = current_run.set(run)
        session_token = None
        keep = True
        try:
            try:
                fn, session, session_param = self._function(function, kept)
                args, kwargs = cloudpickle.loads(arguments)
            except BaseException as exc:
                raise PayloadError(f"the call could not be unpickled in the worker: {type(exc).__name__}: {exc}") from exc
            del function, arguments
            if session_param and hasattr(session, "bound_to"):  # its own threads report to this run through it
                session = session.bound_to(run)
            if session is not None:
                session_token = bound_session.set(session)
            if session_param:
                kwargs[session_param] = session
            with _address_space_limit(memory_limit):
                value = fn(*args, **kwargs)
                if inspect.iscoroutine(value):
                    value = asyncio.run(value)
            try:
                kind, data = OK, {"value": pickle_value(value)}
            except Exception:
                problem = unpicklable("the return value", value) or "the return value cannot be pickled"
                message = f"cannot send the result back from the worker process: {problem}"
                kind, data = ERROR, _error_data(TypeError(message), skip=0)
            del value
        except BaseException as exc:  # the task's failure is its outcome, not the worker's end
            kind, data = ERROR, _error_data(exc, skip=1)
            if memory_limit and isinstance(exc, MemoryError):
                data["message"] = (f"memory limit of {size(memory_limit)} exceeded"
                                   + (f" ({data['message']})" if data["message"] else ""))
                keep = False  # a worker that ran out of memory may be left in a poor state
        finally:
            run.flush_output()
            flush_all()  # the job's store writes are durable before the parent hears it ended
            if session_token is not None:
                bound_session.reset(session_token)
            current_run.reset(run_token)
            self.job = None
        self.send(("done", job_id, kind, data, not keep))
        return keep


def _textified(message: tuple) -> tuple:
    tag, job_id, kind, data = message
    return tag, job_id, kind, {k: (v if k != "extra" else {x: str(y) for x, y in v.items()}) for k, v in data.items()}


def _error_data(exc: BaseException, skip: int) -> dict:
    """The ``done`` data of a failed job: type, message, the child's traceback, the exception if it pickles."""
    tb = exc.__traceback__
    for _ in range(skip):  # drop run_job's own frame
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        exc_bytes: bytes | None = cloudpickle.dumps(exc)
        pickle.loads(exc_bytes)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        exc_bytes = None
    try:
        message = str(exc)
    except Exception:
        message = f"<str() of the {type(exc).__name__} failed>"
    return {"type": type(exc).__name__, "message": message, "traceback": text, "exc": exc_bytes}


class _address_space_limit:
    """``RLIMIT_AS`` = the worker's current address space + ``limit`` while a job runs."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.saved: tuple[int, int] | None = None

    def __enter__(self) -> None:
        if not self.limit:
            return
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        wanted = used + self.limit
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        if soft != resource.RLIM_INFINITY:
            wanted = min(wanted, soft)
        self.saved = (soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self.saved)


def _watch_parent(parent_pid: int) -> None:
    """Kill this worker (and its process group) when the process that started it dies."""
    try:
        fd = os.pidfd_open(parent_pid)
        select.select([fd], [], [])
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                continue
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


def worker_main(conn: multiprocessing.connection.Connection, faults: multiprocessing.connection.Connection,
                 parent_pid: int) -> None:
    """A worker process's life: its own process group, a crash dump pipe, a parent watch, then jobs."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel interrupt is not for us
    faulthandler.enable(file=faults.fileno(), all_threads=False)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="capsule-parent-watch", daemon=True).start()
    _ChildWorker(conn).serve()
    faults.close()
