"""How a call in another process ended, and the ``Job`` the runtime holds while it runs.

Both back ends (the local ``ProcessPool`` and ``DaskBackend``) end every job
in one ``Outcome``, and both follow one rule: once a job was asked to die,
it ends ``killed``, whatever the worker said meanwhile (``Job._finish``).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import threading
import uuid
from typing import Any, Callable, NamedTuple

OK, ERROR, CRASHED, KILLED = "ok", "error", "crashed", "killed"
SHUT_DOWN = "pool shut down"  # the reason of a job killed because its process is exiting

OnMessage = Callable[[str, dict], None]

log = logging.getLogger("capsule_nb")

# Job ids: unique across processes (a Dask worker keeps jobs of several kernels), and cheap
# to make (no system call per job, as uuid4 makes).
_ID_PREFIX = uuid.uuid4().hex[:12] + "-"
_ids = itertools.count()


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


class Outcome(NamedTuple):
    """How a job ended (a named tuple: one is made per job, on the pool's listener thread).

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


def crash_message(exitcode: int | None, dump: str = "") -> str:
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


def crashed(pid: int | None, exitcode: int | None, dump: str, memory_limit: int | None,
             prefix: str = "") -> Outcome:
    message = prefix + crash_message(exitcode, dump)
    if memory_limit:
        message += f" (it had a memory limit of {size(memory_limit)}; going over it can end this way)"
    exception = WorkerCrashed(message)
    exception.by_signal = exitcode is not None and exitcode < 0  # (kept when it is pickled)
    return Outcome(CRASHED, error_type="WorkerCrashed", message=message, traceback=dump,
                   exception=exception, pid=pid, exitcode=exitcode)


def killed(pid: int | None, reason: str) -> Outcome:
    message = f"worker process killed: {reason}"
    return Outcome(KILLED, error_type="JobKilled", message=message, exception=JobKilled(message),
                   pid=pid, reason=reason)


def size(n: int) -> str:
    """``n`` bytes as the limit was likely written: "50 MB" or "64 MiB" when either is exact
    ("50MB" read back as "47.68 MiB"), else in binary units to four digits."""
    for power in (3, 2, 1):
        for base, units in ((1024, ("KiB", "MiB", "GiB")), (1000, ("KB", "MB", "GB"))):
            if n >= base**power and n % base**power == 0:
                return f"{n // base**power} {units[power - 1]}"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# Guards every job's outcome and callbacks against ``wait``: one lock for all jobs, as each
# holds it for a few bytecodes, and a lock per job is one more object for every garbage
# collection to scan while a burst of jobs waits.
_JOBS_LOCK = threading.Lock()


class Job:
    """What the runtime holds of a call in another process: wait for its outcome, or kill it.
    Back ends settle it with ``_finish`` from their delivery thread."""

    def __init__(self) -> None:
        self.id = f"{_ID_PREFIX}{os.getpid():x}-{next(_ids):x}"
        self.pid: int | None = None
        self._outcome: Outcome | None = None
        self._kill_reason: str | None = None  # set once by ``kill``: the job ends ``killed``
        self._settled: threading.Event | None = None  # made by the first ``wait``: most jobs have none
        self._callbacks: Callable[[Outcome], None] | list[Callable[[Outcome], None]] | None = None  # one, or a list

    def add_done_callback(self, callback: Callable[[Outcome], None]) -> None:
        """Call ``callback(outcome)`` once the job has ended: on the back end's delivery
        thread, or at once if it already has. Nobody has to block a thread on ``wait``."""
        with _JOBS_LOCK:
            if self._outcome is None:
                known = self._callbacks
                self._callbacks = callback if known is None else [*known, callback] if type(known) is list \
                    else [known, callback]
                return
        callback(self._outcome)

    def _run_callbacks(self) -> None:
        """Call the done callbacks; back ends call this after ``_finish``, holding no lock."""
        with _JOBS_LOCK:
            callbacks, self._callbacks = self._callbacks, None
        if callbacks is None:
            return
        for callback in callbacks if type(callbacks) is list else (callbacks,):
            try:
                callback(self._outcome)  # type: ignore[arg-type]
            except Exception:
                log.exception("capsule_nb: a done callback of job %s failed", self.id)

    def _finish(self, outcome: Outcome) -> bool:
        """Settle the job, once; False if it already was. A kill wins: a job asked to die
        ends ``killed`` even if its worker answered first. Caller holds the back end's lock."""
        if self._outcome is not None:
            return False
        if self._kill_reason is not None and outcome.reason != self._kill_reason:
            outcome = killed(outcome.pid or self.pid, self._kill_reason)
        with _JOBS_LOCK:
            self._outcome = outcome
            settled = self._settled
        if settled is not None:
            settled.set()
        return True

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def done(self) -> bool:
        return self._outcome is not None

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the job has ended; ``TimeoutError`` if ``timeout`` passes first."""
        with _JOBS_LOCK:
            if self._outcome is not None:
                return self._outcome
            if self._settled is None:
                self._settled = threading.Event()
            settled = self._settled
        if not settled.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} {self.id} still running after {timeout}s")
        return self._outcome  # type: ignore[return-value]

    def kill(self, reason: str = "killed") -> bool:
        raise NotImplementedError



def outcome_from(kind: str, data: dict, pid: int) -> Outcome:
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

