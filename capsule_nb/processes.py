"""Worker processes for ``process=True`` runs: crash-isolated, killable, reused.

Why our own small supervisor, over ``multiprocessing``'s forkserver context:

* **Functions from notebook cells.** The call ``(fn, args, kwargs)`` travels
  as cloudpickle bytes, so a function defined in a cell (``__main__``), its
  closures and the notebook globals it uses go by value. The standard
  pools pickle ``fn`` by reference, which cannot find a notebook function.
* **Not fork.** A kernel runs threads (ours, ipykernel's, the store
  writer); forking it copies locks held by other threads and can deadlock
  the child. ``forkserver`` forks workers from a small, single-threaded
  server started once (with ``capsule_nb.processes`` preloaded), so a
  worker starts in milliseconds without inheriting the kernel's state.
* **Kill one task.** ``ProcessPoolExecutor`` and ``multiprocessing.Pool``
  cannot stop one running call: a timeout or cancel must kill exactly the
  process running it, and a crash must fail exactly that run while the
  pool carries on. Here each worker runs one job at a time, so
  ``ProcessJob.kill`` is a ``SIGKILL`` to that worker's process group
  (each worker calls ``setsid``, so whatever it started dies with it and a
  kernel interrupt, sent to the kernel's group, never reaches it).
* **Reuse.** Workers start lazily, up to ``max_workers``, and stay for the
  next job; a worker that died or was killed is replaced when needed.

One job per worker: the parent sends ``("job", id, payload, memory_limit)``
over a ``Pipe``; the worker answers with ``("msg", id, kind, data)`` for
prints and session calls, then ``("done", id, kind, data)``. A reader thread
per worker (in the parent) forwards messages to the job's ``on_message``
and settles the job; the worker's death (its pipe or its forkserver status
sentinel closing) settles a job still in flight as crashed or killed.

Inside the worker, ``capsule_nb.context.current_run`` is a ``ChildRun``
whose ``capture``/``message``/``extend_message``/``progress`` forward over
the pipe, so ``session.reply`` and ``print`` work unchanged. Prints from any
thread of the worker go to the running job (a worker runs one job at a
time). ``faulthandler`` writes to a pipe the parent reads after a crash, so
a segfault's outcome carries the Python stack where it happened.

Limits, on purpose: worker state persists between jobs (module globals, a
``sys.path`` change, leftover threads), as in any reused worker; the memory
limit is on address space (``RLIMIT_AS``), counted on top of the idle
worker's; a worker whose parent dies kills itself (``pidfd`` watch). The
first worker of a process pays the forkserver's start and its import of
capsule_nb (a few hundred ms, mostly the UI's imports): ``warm()`` hides it.
"""

from __future__ import annotations

import asyncio
import copyreg
import faulthandler
import functools
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import types
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import cloudpickle

from .capture import ProxyStream
from .session import Session

log = logging.getLogger("capsule_nb")

OK, ERROR, CRASHED, KILLED = "ok", "error", "crashed", "killed"

OnMessage = Callable[[str, dict], None]

_CONTEXT = multiprocessing.get_context("forkserver")
_preload_set = False
_SEARCH_DEPTH = 4  # how deep an unpicklable value is looked for inside containers
_SEARCH_WIDTH = 200  # items looked at per container


# --------------------------------------------------------------------------- #
# Outcomes and errors
# --------------------------------------------------------------------------- #


class ProcessError(Exception):
    """Base class of what a process job ends with when it did not return."""


class WorkerCrashed(ProcessError):
    """The worker process died while running the job (segfault, ``os._exit``, OOM kill)."""


class JobKilled(ProcessError):
    """``ProcessJob.kill`` stopped the job (a timeout or a cancel)."""


class PayloadError(ProcessError):
    """The call could not be unpickled in the worker (a module the kernel has and the worker lacks)."""


class RemoteError(ProcessError):
    """The task raised an exception that could not be brought back as itself."""

    def __init__(self, type_name: str, message: str):
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


@dataclass(frozen=True)
class Outcome:
    """How a job ended.

    ``kind`` is ``"ok"`` (``value`` is the return value), ``"error"`` (the task
    raised: ``error_type``, ``message`` and the child's ``traceback``),
    ``"crashed"`` (the worker died: ``message`` says how, ``traceback`` is the
    faulthandler dump when there is one) or ``"killed"`` (``reason`` is what
    was given to ``kill``). ``exception`` is set for every kind but ok: the
    task's own exception when it could be unpickled here, else a
    ``RemoteError``, ``WorkerCrashed`` or ``JobKilled``.
    """

    kind: str
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    exception: BaseException | None = None
    pid: int | None = None
    exitcode: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind == OK

    @property
    def error(self) -> str | None:
        """``"ValueError: boom"``, ``"WorkerCrashed: worker process died: killed by SIGSEGV"``; None if ok."""
        return None if self.kind == OK else f"{self.error_type}: {self.message}"


# What faulthandler writes for each fatal signal, for when the exit status is lost.
_FATAL = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Floating point exception": "SIGFPE",
          "Aborted": "SIGABRT", "Illegal instruction": "SIGILL"}


def _crash_message(exitcode: int | None, dump: str = "") -> str:
    if exitcode in (None, 255):
        # 255 is what multiprocessing reports when the forkserver's status word for the
        # child is missing; the child's own faulthandler dump still says how it died.
        for text, name in _FATAL.items():
            if f"Fatal Python error: {text}" in dump:
                return f"worker process died: killed by {name}"
    if exitcode is None:
        return "worker process died (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker process died: killed by {name}"
    return f"worker process died: exited with code {exitcode}"


def _crashed(pid: int | None, exitcode: int | None, dump: str, memory_limit: int | None,
             prefix: str = "") -> Outcome:
    message = prefix + _crash_message(exitcode, dump)
    if memory_limit:
        message += f" (it had a memory limit of {_size(memory_limit)}; going over it can end this way)"
    return Outcome(CRASHED, error_type="WorkerCrashed", message=message, traceback=dump,
                   exception=WorkerCrashed(message), pid=pid, exitcode=exitcode)


def _killed(pid: int | None, reason: str) -> Outcome:
    message = f"worker process killed: {reason}"
    return Outcome(KILLED, error_type="JobKilled", message=message, exception=JobKilled(message),
                   pid=pid, reason=reason)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# --------------------------------------------------------------------------- #
# Pickling, with errors that name the value
# --------------------------------------------------------------------------- #


def _kind(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _code_globals(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_globals(const)


def _parts(value: Any) -> Iterator[tuple[str, Any]]:
    """The parts of ``value`` that pickling it would pickle, each with how to name it."""
    if isinstance(value, dict):
        for key, item in list(value.items())[:_SEARCH_WIDTH]:
            yield f"[{key!r}]", item
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value[:_SEARCH_WIDTH]):
            yield f"[{index}]", item
    elif isinstance(value, (set, frozenset)):
        for item in list(value)[:_SEARCH_WIDTH]:
            yield " (an item)", item
    elif isinstance(value, functools.partial):
        yield ".func", value.func
        yield from ((f" (partial argument {i})", a) for i, a in enumerate(value.args))
        yield from ((f" (partial argument {k!r})", a) for k, a in value.keywords.items())
    elif isinstance(value, types.MethodType):
        yield ".__self__", value.__self__
        yield ".__func__", value.__func__
    elif isinstance(value, types.FunctionType):
        code = value.__code__
        for name, cell in zip(code.co_freevars, value.__closure__ or ()):
            try:
                yield f" (closure variable {name!r})", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        seen = set()
        for name in _code_globals(code):
            if name in value.__globals__ and name not in seen:
                seen.add(name)
                yield f" (global {name!r})", value.__globals__[name]
    elif not isinstance(value, (type, types.ModuleType)) and isinstance(getattr(value, "__dict__", None), dict):
        for name, item in list(vars(value).items())[:_SEARCH_WIDTH]:
            yield f".{name}", item


def _culprit(value: Any, path: str = "", depth: int = 0) -> tuple[str, Any, Exception] | None:
    """``(path, part, error)`` for the innermost part of ``value`` that does not pickle; None if it pickles."""
    try:
        cloudpickle.dumps(value)
        return None
    except Exception as exc:
        error = exc
    if depth < _SEARCH_DEPTH:
        for suffix, part in _parts(value):
            found = _culprit(part, path + suffix, depth + 1)
            if found is not None:
                return found
    return path, value, error


def _unpicklable(label: str, value: Any) -> str | None:
    """A sentence naming what in ``value`` cannot be pickled, or None if it pickles."""
    found = _culprit(value)
    if found is None:
        return None
    path, part, error = found
    return f"{label}{path} is a {_kind(part)}, which cannot be pickled ({type(error).__name__}: {error})"


def check_picklable(args: tuple = (), kwargs: dict | None = None, fn: Callable[..., Any] | None = None) -> None:
    """Raise ``TypeError`` naming the argument (or the part of ``fn``) that cannot go to a worker.

    Call it at submit. ``fn`` is optional; when given, its parameter names
    are used in the message and the function itself is checked too (a
    notebook function goes by value, with the globals it uses).
    """
    kwargs = kwargs or {}
    try:
        cloudpickle.dumps((fn, args, kwargs))
        return
    except Exception as exc:
        whole = exc
    names: list[str] = []
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            pass
    call = f"{_fn_name(fn)}()" if fn is not None else "the call"
    labelled: list[tuple[str, Any]] = []
    if fn is not None:
        labelled.append(("the function", fn))
    for index, value in enumerate(args):
        name = f" {names[index]!r}" if index < len(names) else ""
        labelled.append((f"argument{name} (position {index})", value))
    for key, value in kwargs.items():
        labelled.append((f"argument {key!r}", value))
    for label, value in labelled:
        problem = _unpicklable(label, value)
        if problem is not None:
            raise TypeError(f"cannot send {call} to a worker process: {problem}")
    raise TypeError(f"cannot send {call} to a worker process: {type(whole).__name__}: {whole}")


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def pickle_call(fn: Callable[..., Any], args: tuple, kwargs: dict, session: Any = None) -> bytes:
    """The job payload: ``cloudpickle`` of ``(fn, args, kwargs, session)``; ``TypeError`` names a bad value."""
    try:
        return cloudpickle.dumps((fn, tuple(args), dict(kwargs), session))
    except Exception:
        check_picklable(args, kwargs, fn)
        if session is not None and (problem := _unpicklable("the session", session)):
            raise TypeError(f"cannot send {_fn_name(fn)}() to a worker process: {problem}") from None
        raise


# --------------------------------------------------------------------------- #
# The parent side: ProcessJob and ProcessPool
# --------------------------------------------------------------------------- #


class Job:
    """What the runtime holds of a call in another process: wait for its outcome, or kill it.
    Subclasses settle it (``_settle``) from their delivery thread."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.pid: int | None = None
        self._outcome: Outcome | None = None
        self._settled = threading.Event()

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def done(self) -> bool:
        return self._settled.is_set()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the job has ended; ``TimeoutError`` if ``timeout`` passes first."""
        if not self._settled.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} {self.id} still running after {timeout}s")
        return self._outcome  # type: ignore[return-value]

    def kill(self, reason: str = "killed") -> bool:
        raise NotImplementedError


class ProcessJob(Job):
    """One call running (or queued) in a worker process. Thread-safe."""

    def __init__(self, pool: "ProcessPool", payload: bytes, on_message: OnMessage | None, memory_limit: int | None):
        super().__init__()
        self._pool = pool
        self._payload: bytes | None = payload
        self._on_message = on_message
        self.memory_limit = memory_limit  # self.pid: the worker's, once the job is handed to one
        self._worker: _Worker | None = None
        self._kill_reason: str | None = None

    def __repr__(self) -> str:
        state = self._outcome.kind if self._outcome else ("running" if self.pid else "queued")
        return f"<ProcessJob {self.id[:8]} {state} pid={self.pid}>"

    def kill(self, reason: str = "killed") -> bool:
        """``SIGKILL`` the worker running this job (or drop it from the queue).

        Returns False if the job had already ended. Otherwise the outcome will
        be ``killed`` with ``reason``, and ``wait()`` returns once the worker's
        PID is gone.
        """
        return self._pool._kill(self, reason)

    def _deliver(self, kind: str, data: dict) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(kind, data)
        except Exception:  # a broken forwarder must not break the pool
            log.exception("capsule_nb: on_message failed for a process job message %r", kind)

    def _settle(self, outcome: Outcome) -> None:
        """Caller holds the pool lock."""
        self._outcome = outcome
        self._payload = None
        self._worker = None
        self._settled.set()


_starting = threading.local()
_preparation_data = multiprocessing.spawn.get_preparation_data


def _without_main(name: str) -> dict:
    """multiprocessing's start data, minus "re-run the parent's ``__main__``" for our workers.

    A worker gets each call by value, so it never needs the parent's main
    module; re-running it would execute a script's top level (its task
    definitions, its submits) in every worker. Other processes started by
    this interpreter are left as multiprocessing makes them.
    """
    data = _preparation_data(name)
    if getattr(_starting, "worker", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


multiprocessing.spawn.get_preparation_data = _without_main


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, pool: "ProcessPool"):
        self.pool = pool
        self.conn, child_conn = _CONTEXT.Pipe()
        self.faults, child_faults = _CONTEXT.Pipe(duplex=False)
        self.process = _CONTEXT.Process(
            target=_worker_main, args=(child_conn, child_faults, os.getpid()),
            name="capsule-process-worker", daemon=False,  # not daemonic: its tasks may start processes
        )
        _starting.worker = True
        try:
            self.process.start()
        finally:
            _starting.worker = False
        child_conn.close()
        child_faults.close()
        self.pid: int = self.process.pid  # type: ignore[assignment]
        self.ready = False
        self.job: ProcessJob | None = None
        self.doomed = False  # killed, or asked to go: never handed another job
        self.reader = threading.Thread(target=self._read, name=f"capsule-process-{self.pid}", daemon=True)

    def send_job(self, job: ProcessJob) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(("job", job.id, job._payload, job.memory_limit), protocol=5))
        except (OSError, ValueError):
            pass  # it died meanwhile: the reader sees that and settles the job

    def kill(self) -> None:
        """SIGKILL the worker's process group (it leads one once it is ready), else the worker."""
        self.doomed = True
        for send in (os.killpg, os.kill):
            try:
                send(self.pid, signal.SIGKILL)
                return
            except ProcessLookupError:  # no such group (yet): try the process itself
                continue

    def _read(self) -> None:
        conn, sentinel = self.conn, self.process.sentinel
        while True:
            try:
                ready = multiprocessing.connection.wait([conn, sentinel])
                if conn not in ready and not conn.poll(0):  # dead and nothing left to read
                    break
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                self.pool._handle(self, pickle.loads(data))
            except Exception:
                log.exception("capsule_nb: bad message from process worker %s", self.pid)
        self.process.join()  # reaped (by the forkserver) before anyone hears the job ended
        dump = _read_available(self.faults)
        self.pool._died(self, self.process.exitcode, dump)
        self.conn.close()
        self.faults.close()


def _read_available(conn: multiprocessing.connection.Connection) -> str:
    """What faulthandler wrote to the pipe, without blocking."""
    fd = conn.fileno()
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class ProcessPool:
    """Reused worker processes, one job at a time each. Every method is thread-safe.

    ``run`` returns a ``ProcessJob`` at once; the job waits in a queue when
    all ``max_workers`` workers are busy. Workers start lazily and stay.
    """

    def __init__(self, max_workers: int | None = None):
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a whole number >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []  # LIFO: the warmest worker takes the next job
        self._queue: deque[ProcessJob] = deque()
        self._starting = 0
        self._closed = False
        _pools.add(self)

    def __repr__(self) -> str:
        with self._lock:
            busy = sum(1 for w in self._workers if w.job is not None)
            return (f"<ProcessPool workers={len(self._workers)}/{self.max_workers} busy={busy} "
                    f"queued={len(self._queue)}>")

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._workers if w.ready)

    def run(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
            on_message: OnMessage | None = None, memory_limit: int | None = None,
            session: Any = None) -> ProcessJob:
        """Run ``fn(*args, **kwargs)`` in a worker; ``TypeError`` (naming the value) if it cannot be pickled.

        ``on_message(kind, data)`` is called, in order, from a pool thread:
        ``("started", {"pid"})`` when a worker takes the job, then for what
        the task does: ``("capture", {"stream", "text"})``,
        ``("message", {"id", "kind", "text", "extra"})``,
        ``("extend", {"id", "text"})``, ``("progress", {"done", "total",
        "message"})``; all of them before ``wait()`` returns. ``forward_to(run)``
        turns these into calls on a runtime ``Run``.

        ``memory_limit`` (bytes): address space the job may add to the idle
        worker's; going over it raises ``MemoryError`` in the task (or, in
        code that does not check, kills the worker); either way the run fails
        saying so. ``session`` is bound as ``bound_session`` in the child (see
        ``ChildSession``).
        """
        return self.submit_payload(pickle_call(fn, args, kwargs or {}, session), on_message=on_message,
                                   memory_limit=memory_limit)

    def submit_payload(self, payload: bytes, *, on_message: OnMessage | None = None,
                       memory_limit: int | None = None) -> ProcessJob:
        """``run`` for a call already pickled with ``pickle_call``."""
        if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int)
                                         or memory_limit <= 0):
            raise ValueError(f"memory_limit must be a number of bytes > 0, got {memory_limit!r}")
        job = ProcessJob(self, payload, on_message, memory_limit)
        with self._lock:
            if self._closed:
                raise RuntimeError("this ProcessPool has been shut down")
            self._queue.append(job)
        self._dispatch()
        return job

    def warm(self, workers: int = 1) -> None:
        """Start up to ``workers`` idle workers in the background (no waiting).

        The first worker of a kernel costs a forkserver start plus importing
        capsule_nb there (a few hundred ms); call this when a ``process=True``
        task is defined so that the first submit finds a worker ready.
        """
        with self._lock:
            if self._closed:
                return
            slots = sum(1 for w in self._workers if w.ready) + self._starting
            count = max(0, min(workers, self.max_workers) - slots)
            self._starting += count
        if count:
            threading.Thread(target=lambda: [self._start_worker() for _ in range(count)],
                             name="capsule-process-warm", daemon=True).start()

    # ------------------------------------------------------------- internals

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers; start workers for the rest (up to max_workers)."""
        handed: list[tuple[_Worker, ProcessJob]] = []
        with self._lock:
            while self._queue and self._idle:
                worker, job = self._idle.pop(), self._queue.popleft()
                worker.job, job._worker, job.pid = job, worker, worker.pid
                handed.append((worker, job))
            to_start = 0
            if not self._closed:
                slots = sum(1 for w in self._workers if w.ready) + self._starting  # processes, up or coming
                to_start = max(0, min(len(self._queue) - self._starting, self.max_workers - slots))
                self._starting += to_start
        for worker, job in handed:
            job._deliver("started", {"pid": worker.pid})
            worker.send_job(job)
        for _ in range(to_start):
            self._start_worker()

    def _start_worker(self) -> None:
        try:
            _ensure_preload()
            with self._start_lock:  # Process.start is not meant to be raced
                worker = _Worker(self)
        except Exception as exc:
            log.exception("capsule_nb: could not start a worker process")
            with self._lock:
                self._starting -= 1
                job = self._queue.popleft() if self._queue and not self._workers else None
                if job is not None:
                    message = f"could not start a worker process: {type(exc).__name__}: {exc}"
                    if isinstance(exc, EOFError):  # the forkserver died, e.g. importing capsule_nb failed
                        message += " (the forkserver exited; its error went to the kernel's stderr)"
                    job._settle(Outcome(CRASHED, error_type="WorkerCrashed", message=message,
                                        exception=WorkerCrashed(message)))
            return
        with self._lock:
            self._workers.add(worker)
            if self._closed:
                worker.kill()
        worker.reader.start()  # after it is in _workers, so its death is always seen there

    def _handle(self, worker: _Worker, message: tuple) -> None:
        """A message from ``worker`` (on its reader thread)."""
        tag = message[0]
        if tag == "ready":
            with self._lock:
                self._starting -= 1
                worker.ready = True
                if not worker.doomed:
                    self._idle.append(worker)
            self._dispatch()
            return
        job = worker.job
        if job is None or message[1] != job.id:
            return  # a late word about a job that already ended (killed meanwhile)
        if tag == "msg":
            job._deliver(message[2], message[3])
        elif tag == "done":
            outcome = _outcome_from(message[2], message[3], worker.pid)
            with self._lock:
                if worker.job is not job:
                    return
                worker.job = None
                job._settle(_killed(worker.pid, job._kill_reason) if job._kill_reason else outcome)
                if message[4]:
                    worker.doomed = True  # it exits by itself; its reader then removes it
                elif not worker.doomed and not self._closed:
                    self._idle.append(worker)
            self._dispatch()

    def _died(self, worker: _Worker, exitcode: int | None, dump: str) -> None:
        """``worker``'s process is gone (and reaped); settle its job, if it had one."""
        with self._lock:
            self._workers.discard(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            if not worker.ready:
                self._starting -= 1
            job, worker.job = worker.job, None
            if job is not None:
                if job._kill_reason is not None:
                    job._settle(_killed(worker.pid, job._kill_reason))
                else:
                    job._settle(_crashed(worker.pid, exitcode, dump, job.memory_limit))
            elif not worker.ready and self._queue and not self._closed:
                # it never came up: fail one waiting job with why, so a broken setup cannot loop for ever
                failed = self._queue.popleft()
                failed._settle(_crashed(None, exitcode, dump, None, prefix="could not start a worker: "))
        self._dispatch()

    def _kill(self, job: ProcessJob, reason: str) -> bool:
        with self._lock:
            if job._outcome is not None or job._kill_reason is not None:
                return False
            job._kill_reason = reason
            if job in self._queue:
                self._queue.remove(job)
                job._settle(_killed(None, reason))
                return True
            worker = job._worker
            if worker is not None:
                worker.kill()  # under the lock: the worker cannot have moved on to another job
        return True

    def shutdown(self, wait: bool = True) -> None:
        """Kill every worker (running jobs end ``killed``, queued ones too); ``run`` raises after."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            for job in queued:
                job._kill_reason = "pool shut down"
                job._settle(_killed(None, "pool shut down"))
            workers = list(self._workers)
            for worker in workers:
                if worker.job is not None and worker.job._kill_reason is None:
                    worker.job._kill_reason = "pool shut down"
                worker.kill()
        if wait:
            for worker in workers:
                worker.reader.join(timeout=5)

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _outcome_from(kind: str, data: dict, pid: int) -> Outcome:
    """The parent's Outcome from a worker's ``done`` message."""
    if kind == OK:
        try:
            value = pickle.loads(data["value"])
        except Exception as exc:
            message = f"the return value could not be unpickled in the kernel: {type(exc).__name__}: {exc}"
            return Outcome(ERROR, error_type="TypeError", message=message, exception=TypeError(message), pid=pid)
        return Outcome(OK, value=value, pid=pid)
    exception: BaseException | None = None
    if data.get("exc") is not None:
        try:
            exception = pickle.loads(data["exc"])
        except Exception:
            exception = None
    if not isinstance(exception, BaseException):
        exception = RemoteError(data["type"], data["message"])
    return Outcome(ERROR, error_type=data["type"], message=data["message"], traceback=data["traceback"],
                   exception=exception, pid=pid)


_pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


def _shutdown_all() -> None:
    for pool in list(_pools):
        try:
            pool.shutdown(wait=True)
        except Exception:
            pass


# At exit, multiprocessing joins every non-daemonic child, and idle workers never leave by
# themselves: kill them first. A Finalize with a priority runs before those joins, both at
# interpreter exit and when this process is itself a multiprocessing child (a Dask worker).
multiprocessing.util.Finalize(None, _shutdown_all, exitpriority=100)


def _ensure_preload() -> None:
    """Have the forkserver import this module once, so a new worker is a cheap fork.

    Only takes effect if the forkserver is not running yet (it is process-wide).
    """
    global _preload_set
    if not _preload_set:
        _CONTEXT.set_forkserver_preload(["capsule_nb.processes"])
        _preload_set = True


# --------------------------------------------------------------------------- #
# Messages into a runtime Run
# --------------------------------------------------------------------------- #


def forward_to(run: Any) -> OnMessage:
    """An ``on_message`` that replays a child's calls on ``run`` (a ``runtime.Run``).

    The child makes its own message ids (it needs one at once, for
    ``extend_message``); this maps them to the ids ``run.message`` returns.
    """
    ids: dict[str, str] = {}

    def on_message(kind: str, data: dict) -> None:
        if kind == "capture":
            run.capture(data["stream"], data["text"])
        elif kind == "message":
            ids[data["id"]] = run.message(data["kind"], data["text"], **data.get("extra", {}))
        elif kind == "extend":
            run.extend_message(ids.get(data["id"], data["id"]), data["text"])
        elif kind == "progress":
            run.progress(data["done"], data["total"], data["message"])

    return on_message


# --------------------------------------------------------------------------- #
# The child side
# --------------------------------------------------------------------------- #


class ChildRun:
    """``current_run`` inside a worker: what ``Session`` and the output capture call, sent to the parent."""

    stop_reason: str | None = None  # a process job is stopped by SIGKILL, never asked

    def __init__(self, worker: "_ChildWorker", job_id: str):
        self._worker = worker
        self._job_id = job_id

    def _send(self, kind: str, data: dict) -> None:
        self._worker.send(("msg", self._job_id, kind, data))

    def capture(self, stream: str, text: str) -> None:
        self._send("capture", {"stream": stream, "text": text})

    def flush_output(self) -> None:
        self._worker.flush_streams()

    def message(self, kind: str, text: str, **extra: Any) -> str:
        self._worker.flush_streams()  # a print before a reply shows before it
        message_id = uuid.uuid4().hex[:16]
        self._send("message", {"id": message_id, "kind": kind, "text": str(text), "extra": extra})
        return message_id

    def extend_message(self, message_id: str, text: str) -> None:
        self._send("extend", {"id": message_id, "text": str(text)})

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        self._send("progress", {"done": done, "total": total, "message": message})

    def show(self, card: Any) -> None:
        self.message("show_task", str(getattr(card, "task_id", "")))


class _JobStream(ProxyStream):
    """The worker's ``sys.stdout``/``sys.stderr``: while a job runs, whole lines go to the parent."""

    def __init__(self, worker: "_ChildWorker", original: Any, name: str):
        super().__init__(original, name)
        self._worker = worker
        self._buffer: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if self._worker.job_id is None:
            return self._original.write(text)
        with self._lock:
            self._buffer.append(text)
            due = "\n" in text or sum(map(len, self._buffer)) > 8192
        if due:
            self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            text, self._buffer = "".join(self._buffer), []
        job_id = self._worker.job_id
        if text and job_id is not None:
            self._worker.send(("msg", job_id, "capture", {"stream": self._name, "text": text}))
        elif text:
            self._original.write(text)
        if job_id is None:
            self._original.flush()


class _JobLogHandler(logging.Handler):
    def __init__(self, worker: "_ChildWorker"):
        super().__init__(logging.NOTSET)
        self._worker = worker
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job_id = self._worker.job_id
        if job_id is not None:
            self._worker.send(("msg", job_id, "capture", {"stream": "log", "text": self.format(record) + "\n"}))


class _ChildWorker:
    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn
        self.job_id: str | None = None
        self._send_lock = threading.Lock()
        self.streams = [_JobStream(self, sys.stdout, "stdout"), _JobStream(self, sys.stderr, "stderr")]
        sys.stdout, sys.stderr = self.streams  # type: ignore[assignment]
        logging.getLogger().addHandler(_JobLogHandler(self))

    def send(self, message: tuple) -> None:
        try:
            data = pickle.dumps(message, protocol=5)
        except Exception:  # an odd ``extra`` in a session message: send its text instead
            data = pickle.dumps(_textified(message), protocol=5)
        with self._send_lock:
            self.conn.send_bytes(data)

    def flush_streams(self) -> None:
        for stream in self.streams:
            stream.flush()

    def serve(self) -> None:
        self.send(("ready", os.getpid()))
        while True:
            try:
                tag, job_id, payload, memory_limit = pickle.loads(self.conn.recv_bytes())
            except EOFError:
                return
            if tag != "job":
                return
            if not self.run_job(job_id, payload, memory_limit):
                return  # recycle: the parent starts a fresh worker when one is needed

    def run_job(self, job_id: str, payload: bytes, memory_limit: int | None) -> bool:
        """Run one job and send its ``done``; False if this worker should exit afterwards."""
        from .context import bound_session, current_run

        self.job_id = job_id
        run_token = current_run.set(ChildRun(self, job_id))  # type: ignore[arg-type]
        session_token = None
        keep = True
        try:
            try:
                fn, args, kwargs, session = cloudpickle.loads(payload)
            except BaseException as exc:
                raise PayloadError(f"the call could not be unpickled in the worker: {type(exc).__name__}: {exc}") from exc
            del payload
            if session is not None:
                session_token = bound_session.set(session)
            with _address_space_limit(memory_limit):
                value = fn(*args, **kwargs)
                if inspect.iscoroutine(value):
                    value = asyncio.run(value)
            try:
                kind, data = OK, {"value": cloudpickle.dumps(value)}
            except Exception:
                problem = _unpicklable("the return value", value) or "the return value cannot be pickled"
                message = f"cannot send the result back from the worker process: {problem}"
                kind, data = ERROR, _error_data(TypeError(message), skip=0)
            del value
        except BaseException as exc:  # the task's failure is its outcome, not the worker's end
            kind, data = ERROR, _error_data(exc, skip=1)
            if memory_limit and isinstance(exc, MemoryError):
                data["message"] = (f"memory limit of {_size(memory_limit)} exceeded"
                                   + (f" ({data['message']})" if data["message"] else ""))
                keep = False  # a worker that ran out of memory may be left in a poor state
        finally:
            self.flush_streams()
            _flush_stores()
            if session_token is not None:
                bound_session.reset(session_token)
            current_run.reset(run_token)
            self.job_id = None
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


def _flush_stores() -> None:
    """Make a job's writes to capsule_nb stores durable before the parent hears it ended."""
    app_module = sys.modules.get("capsule_nb.app")
    for store in list(getattr(app_module, "_stores", {}).values()):
        try:
            store.flush()
        except Exception:
            log.exception("capsule_nb: flushing a store in a worker process failed")


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


def _worker_main(conn: multiprocessing.connection.Connection, faults: multiprocessing.connection.Connection,
                 parent_pid: int) -> None:
    """A worker process's life: its own process group, a crash dump pipe, a parent watch, then jobs."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel interrupt is not for us
    faulthandler.enable(file=faults.fileno(), all_threads=False)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="capsule-parent-watch", daemon=True).start()
    _ChildWorker(conn).serve()
    faults.close()


# --------------------------------------------------------------------------- #
# A session that can cross into a worker
# --------------------------------------------------------------------------- #


class _StoreApp:
    """What a Session needs of an App, in a worker: the store at the same path, opened lazily."""

    def __init__(self, home: str):
        self.home = home
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from .app import _open_store
            from pathlib import Path

            self._store = _open_store(Path(self.home))
        return self._store

    @property
    def db(self) -> Any:
        from .collections import Database

        return Database(self.store)


def _make_child_session(id: str, user: Any, home: str) -> Any:
    return ChildSession(id, user, home)


def portable_session(session: Any) -> Any:
    """A picklable stand-in for ``session`` to send with a process job (None stays None).

    In the worker it has the same ``id``, ``user``; ``data`` and ``db`` open the
    same store by path; ``reply``/``notify``/``log``/``progress``/``stream``
    go to the parent through the job's ``current_run``. Importing this module
    also makes every ``Session`` pickle as one (``copyreg``), so a notebook
    function that uses the global ``session`` can go to a worker too.
    """
    if session is None or isinstance(session, ChildSession):
        return session
    return ChildSession(session.id, session.user, str(session._app.home))


def _reduce_session(session: Any) -> tuple:
    return _make_child_session, (session.id, session.user, str(session._app.home))


class ChildSession(Session):
    """``Session`` for code in a worker process; see ``portable_session``."""

    def __init__(self, id: str, user: Any, home: str):  # no super().__init__: no App here
        self.id = id
        self.user = user
        self._app = _StoreApp(home)

    def __reduce__(self) -> tuple:
        return _make_child_session, (self.id, self.user, self._app.home)

    @property
    def data(self) -> Any:  # type: ignore[override]
        from .session import SessionData

        return SessionData(self._app, self.id)  # type: ignore[arg-type]

    def stream(self, chunks: Any) -> Any:
        if hasattr(chunks, "__aiter__"):
            from .session import _on_a_loop

            coro = self._stream_async(chunks)
            return coro if _on_a_loop() else asyncio.run(coro)
        return super().stream(chunks)

    def show_task(self, handle_or_id: Any, *, message: str | None = None) -> Any:
        from .awaitables import DONE
        from .context import current_run

        task_id = handle_or_id if isinstance(handle_or_id, str) else handle_or_id.task_id
        run = current_run.get()
        if run is not None:
            run.message("show_task", str(task_id))
        return DONE


copyreg.pickle(Session, _reduce_session)
