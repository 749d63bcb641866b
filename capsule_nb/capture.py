"""Per-run capture of stdout, stderr, logging and tqdm progress bars.

``sys.stdout``/``sys.stderr`` are wrapped once by a stream that asks the
``current_run`` context variable where a write belongs: inside a run it is
kept with that run (and shown on its card), elsewhere it goes to the
original stream untouched. A root logging handler does the same for log
records, so a task's ``logging.info`` never lands in whichever cell
happens to be executing. A ``tqdm`` bar (``from tqdm import tqdm``) inside
a run drives the run's progress instead of printing frames: its ``display``
is wrapped, remembering the run it was created in, because tqdm's monitor
thread redraws bars from a thread that has no run context.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any, TextIO

from .context import current_run

_install_lock = threading.Lock()


class ProxyStream(io.TextIOBase):
    """A text stream standing in for ``original`` (``sys.stdout``/``sys.stderr``):
    subclasses decide where each write goes; the rest is the original's."""

    def __init__(self, original: TextIO, name: str):
        self._original = original
        self._name = name

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")

    def fileno(self) -> int:
        return self._original.fileno()


class _RoutedStream(ProxyStream):
    def write(self, text: str) -> int:
        run = current_run.get()
        if run is None:
            return self._original.write(text)
        run.capture(self._name, text)
        return len(text)

    def flush(self) -> None:
        if current_run.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:  # ipykernel streams have extras
        return getattr(self._original, name)


class _RunLogHandler(logging.Handler):
    """Keeps log records of a run with the run; does nothing outside runs."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        run = current_run.get()
        if run is not None:
            run.capture("log", self.format(record) + "\n")
        elif logging.lastResort and record.levelno >= logging.lastResort.level and _only_handler(record):
            logging.lastResort.handle(record)  # what Python would have done without us


def _only_handler(record: logging.LogRecord) -> bool:
    """True when no handler but ours would see ``record`` (so Python's last resort applies)."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not _handler for h in logger.handlers):
            return False
        logger = logger.parent if logger.propagate else None
    return True


class _NotInRuns(logging.Filter):
    """Added to the other root handlers: a run's records are already kept with the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return current_run.get() is None


_handler = _RunLogHandler()
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
            run = bar._capsule_run = current_run.get()
        if run is None:
            return original(bar, msg, pos)
        run.progress(bar.n, bar.total, bar.desc or None)
        return True

    display._capsule = True  # type: ignore[attr-defined]
    tqdm_std.tqdm.display = display


def install() -> None:
    """Route output of runs to the runs (idempotent; re-wraps a stream replaced since).

    Called at every submit, so it has a fast path: something (pytest, a
    ``capture_output``) may have swapped ``sys.stdout`` since the last run.
    """
    _patch_tqdm()
    if isinstance(sys.stdout, _RoutedStream) and isinstance(sys.stderr, _RoutedStream) and _handler in logging.root.handlers:
        return
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _RoutedStream):
                setattr(sys, name, _RoutedStream(stream, name))
        root = logging.getLogger()
        if _handler not in root.handlers:
            root.addHandler(_handler)
        for handler in root.handlers:
            if handler is not _handler and _not_in_runs not in handler.filters:
                handler.addFilter(_not_in_runs)


def uninstall() -> None:
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _RoutedStream):
                setattr(sys, name, stream._original)
        root = logging.getLogger()
        root.removeHandler(_handler)
        for handler in root.handlers:
            handler.removeFilter(_not_in_runs)
