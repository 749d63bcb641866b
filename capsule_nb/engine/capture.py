"""Per-run capture of stdout, stderr, logging and tqdm progress bars.

``sys.stdout``/``sys.stderr`` are wrapped once by a stream that asks a
*route* where a write belongs: inside a run it is kept with that run (and
shown on its card), elsewhere it goes to the original stream untouched. In
a kernel the route is the ``current_run`` context variable; in a worker
process it is the job the worker is running, whatever thread prints. A log
record factory does the same for log records, so a task's ``logging.info``
never lands in whichever cell happens to be executing. A ``tqdm`` bar
(``from tqdm import tqdm``) inside a run drives the run's progress instead
of printing frames: its ``display``
is wrapped, remembering the run it was created in, because tqdm's monitor
thread redraws bars from a thread that has no run context.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any, Callable, Protocol, TextIO

from .context import current_run

_install_lock = threading.Lock()


class Sink(Protocol):
    """Where a run's output goes: ``engine.run.Run`` here, ``workers.child.ChildRun`` in a worker."""

    def capture(self, stream: str, text: str) -> None: ...

    def flush_output(self) -> None: ...

    def progress(self, done: float, total: float | None, message: str | None) -> None: ...


Route = Callable[[], "Sink | None"]


class _RoutedStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: a write inside a run goes to the run."""

    def __init__(self, original: TextIO, name: str, route: Route):
        self._original = original
        self._name = name
        self._route = route

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")

    def fileno(self) -> int:
        return self._original.fileno()

    def write(self, text: str) -> int:
        run = self._route()
        if run is None:
            return self._original.write(text)
        run.capture(self._name, text)
        return len(text)

    def flush(self) -> None:
        run = self._route()
        if run is None:
            self._original.flush()
        else:
            run.flush_output()

    def __getattr__(self, name: str) -> Any:  # ipykernel streams have extras
        return getattr(self._original, name)


class _RunLogCapture:
    """Keeps the log records made inside a run with the run; outside runs it does nothing.

    It is a log record factory, wrapping whichever was set before, not a handler on the
    root logger: a root handler makes a later ``logging.basicConfig()`` in a notebook do
    nothing (it configures only a root with no handlers), and makes ``hasHandlers()`` true
    for every logger. A record is made only once its logger's level lets it through."""

    def __init__(self) -> None:
        self.route: Route = current_run.get
        self.made: Callable[..., logging.LogRecord] = logging.LogRecord
        self._formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        self._making = threading.local()

    def __call__(self, name: Any, *args: Any, **kwargs: Any) -> logging.LogRecord:
        if getattr(self._making, "now", False):  # a factory set after ours, which calls ours, wrapped
            return logging.LogRecord(name, *args, **kwargs)  # again at a next install: no loop
        self._making.now = True
        try:
            record = self.made(name, *args, **kwargs)
        finally:
            self._making.now = False
        if name is not None:  # (``logging.makeLogRecord`` makes a blank one first, to fill in)
            run = self.route()
            if run is not None:
                _not_in_runs.add_to_handlers()
                run.capture("log", self._text(record) + "\n")
        return record

    def _text(self, record: logging.LogRecord) -> str:
        try:
            return self._formatter.format(record)
        except Exception as exc:  # bad arguments for the message: what a handler would say
            return f"{record.levelname} {record.name}: {record.msg!r} {record.args!r} (cannot format: {exc})"


class _NotInRuns(logging.Filter):
    """Added to the root's handlers and to Python's last resort: a run's records are kept
    with the run, not also printed under whichever cell is executing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _capture.route() is None

    def add_to_handlers(self) -> None:
        for handler in (*logging.root.handlers, logging.lastResort):
            if handler is not None and self not in handler.filters:
                handler.addFilter(self)

    def remove_from_handlers(self) -> None:
        for handler in (*logging.root.handlers, logging.lastResort):
            if handler is not None:
                handler.removeFilter(self)


_capture = _RunLogCapture()
_not_in_runs = _NotInRuns()


_NO_RUN = object()


def _patch_tqdm() -> None:
    """Wrap ``tqdm.std.tqdm.display`` once, if tqdm has been imported."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None or getattr(tqdm_std.tqdm.display, "_capsule", False):
        return
    original = tqdm_std.tqdm.display

    def display(bar: Any, msg: str | None = None, pos: int | None = None) -> Any:
        run = bar.__dict__.get("_capsule_run", _NO_RUN)
        if run is _NO_RUN:
            run = bar._capsule_run = _capture.route()
        if run is None:
            return original(bar, msg, pos)
        run.progress(bar.n, bar.total, bar.desc or None)
        return True

    display._capsule = True  # type: ignore[attr-defined]
    tqdm_std.tqdm.display = display


def install(route: Route | None = None) -> None:
    """Route output of runs to the runs (idempotent; re-wraps a stream replaced since).

    ``route`` says which run a write belongs to (default: the ``current_run``
    of the writing context). Called at every submit, so it has a fast path:
    something (pytest, a ``capture_output``) may have swapped ``sys.stdout``
    since the last run.
    """
    if "tqdm.std" in sys.modules:
        _patch_tqdm()
    if (route is None and isinstance(sys.stdout, _RoutedStream) and isinstance(sys.stderr, _RoutedStream)
            and logging.getLogRecordFactory() is _capture):
        return
    with _install_lock:
        if route is not None:
            _capture.route = route
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _RoutedStream):
                setattr(sys, name, _RoutedStream(stream, name, _capture.route))
        made = logging.getLogRecordFactory()
        if made is not _capture:
            _capture.made = made
            logging.setLogRecordFactory(_capture)
        _not_in_runs.add_to_handlers()


def uninstall() -> None:
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _RoutedStream):
                setattr(sys, name, stream._original)
        if logging.getLogRecordFactory() is _capture:
            logging.setLogRecordFactory(_capture.made)
        _not_in_runs.remove_from_handlers()
