"""What this process knows of one run while it is live; the record is the durable part.

Task code reaches its ``Run`` through ``context.current_run`` (``print``
through ``capture``, ``session.reply`` through the session layer), from
whatever thread it runs on. A run's messages also go to a ``Display``:
the notebook layer shows them under the cell that submitted the run; a
script has none.
"""

from __future__ import annotations

import asyncio
import itertools
import linecache
import operator
import os
import re
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from ..record import MAX_OUTPUT_CHARS, add_message, capped_text, evolve, grow_message, new_task_id

if TYPE_CHECKING:
    from ..tasks import Task
    from ..workers.pickling import Call
    from .runtime import Runtime

_FRAME = re.compile(r'  File "(.+)", line (\d+), in ')  # a frame of a formatted traceback
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_FLUSH_SECONDS = 0.05  # how often captured output is folded into the record


class Display(Protocol):
    """Where a run's messages show besides its record (``notebook.messages.KernelDisplay``).

    ``target`` is what the display gave the submit as the run's place (a
    cell); it is None for runs that have none. A message is shown once under
    its ``message_id``; ``update`` redraws it in place with its whole text when
    it grows (a stream; the text may come as a function, called only when a
    redraw goes out), and ``flush`` sends a redraw it is holding back once
    the stream has ended, so the last text is out before whoever awaited the
    stream (a cell, ``h.result()``) goes on. ``session_id`` lets a display keep
    one notification per session. Each returns False when there was nowhere to show it.
    """

    def message(self, target: Any, kind: str, text: str, extra: dict[str, Any], *, message_id: str,
                session_id: str | None = None) -> bool: ...

    def update(self, target: Any, kind: str, text: str | Callable[[], str], extra: dict[str, Any], *,
               message_id: str) -> bool: ...

    def flush(self, message_id: str) -> None: ...

    def show(self, target: Any, bundle: dict[str, str]) -> bool: ...


class NoDisplay:
    """A script's display: messages stay on the record."""

    def message(self, target: Any, kind: str, text: str, extra: dict[str, Any], *, message_id: str,
                session_id: str | None = None) -> bool:
        return False

    def update(self, target: Any, kind: str, text: str | Callable[[], str], extra: dict[str, Any], *,
               message_id: str) -> bool:
        return False

    def flush(self, message_id: str) -> None:
        pass

    def show(self, target: Any, bundle: dict[str, str]) -> bool:
        return False


NOT_SHOWN = frozenset({"log", "show_task"})  # kept on the record only: a card shows them, a cell does not


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

    @classmethod
    def from_worker(cls, exc: BaseException, error: str, text: str) -> "Failure":
        """A worker's traceback, with the lines it could not show (a notebook cell's code,
        whose file only this kernel has, in ``linecache``) filled in as an in-kernel run has them."""
        if not text:
            return cls(exc, error, text)
        lines = text.splitlines(keepends=True)
        out = []
        for i, line in enumerate(lines):
            out.append(line)
            frame = _FRAME.match(line)
            if frame and not (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
                source = linecache.getline(frame[1], int(frame[2])).strip()
                if source:
                    out.append(f"    {source}\n")
        return cls(exc, error, "".join(out))


class Run:
    """One live run: its call, where it stands, and how to stop it. Slotted: thousands are
    alive at once after a burst of submits, and each is scanned by every garbage collection."""

    __slots__ = ("runtime", "task", "task_id", "args", "kwargs", "session", "target", "lock_key", "call", "lock",
                 "takes_key_when_due", "phase", "stop_reason", "claimed", "thread_id", "in_function", "interrupt_sent",
                 "aio_task", "job", "start_timer", "deadline_timer", "session_view", "_out", "_out_flushed",
                 "_open_streams")

    def __init__(self, runtime: "Runtime", task: "Task", task_id: str, args: tuple, kwargs: dict,
                 session: Any, target: Any, lock_key: str | None, call: "Call | None" = None):
        self.runtime = runtime
        self.task = task
        self.task_id = task_id
        self.args = args
        self.kwargs = kwargs
        self.session = session
        self.target = target if session is not None else None
        self.lock_key = lock_key
        self.call = call  # a process run's pickled call (pickled once, at submit)
        self.lock = threading.Lock()
        self.takes_key_when_due = False  # a repeat's next run: see ``Runtime.submit``
        self.phase = "waiting"  # waiting -> running -> (waiting for a retry) -> done
        self.stop_reason: str | None = None  # "cancel" or "timeout"
        self.claimed = False  # an attempt's: by its body (async, thread), or by a stop before it began
        self.thread_id: int | None = None
        self.in_function = False
        self.interrupt_sent = False
        self.aio_task: asyncio.Task | None = None
        self.job: Any = None  # the worker-process job of a process=True run
        self.start_timer: Any = None
        self.deadline_timer: Any = None
        self.session_view: Any = None  # the session the run's code sees (``Executor.session``)
        self._out: list[tuple[str, str]] | None = None  # made by the first write: most runs print nothing
        self._out_flushed = 0.0
        self._open_streams: set[str] | None = None  # streams not ended yet: the attempt's end ends them

    def follow_redefinition(self) -> None:
        """Starting after its task was defined again (a re-run cell): run the new body."""
        newest = self.task.newest()
        if newest is self.task:
            return
        try:
            call = self.runtime.pickle_call(newest, self.args, self.kwargs, self.session) if newest.process else None
        except Exception:  # the new body cannot go to a worker: the one it was submitted with runs
            return
        self.task, self.call = newest, call

    # Called from task code (any thread) through capture and the session layer.

    def capture(self, stream: str, text: str) -> None:
        with self.lock:
            first = self._out is None
            if first:
                self._out = []
            self._out.append((stream, text))
            due = time.monotonic() - self._out_flushed > OUTPUT_FLUSH_SECONDS
        if due:
            self.flush_output()
        elif first and not self.runtime.settings.immediate:  # (immediate: no timers; the run's end flushes)
            # held back for the next print, which a task that goes quiet (a long call) makes late
            self.runtime.timers.call_later(OUTPUT_FLUSH_SECONDS, self.flush_output)

    def flush_output(self) -> None:
        with self.lock:
            chunks, self._out = self._out, None
            self._out_flushed = time.monotonic()
        if chunks:
            self.runtime.update(self.task_id, lambda r: evolve(r, output=_merge_output(r.get("output"), chunks)))

    def message(self, kind: str, text: str, **extra: Any) -> str:
        message_id = new_task_id()
        if kind == "stream":
            with self.lock:
                if self._open_streams is None:
                    self._open_streams = set()
                self._open_streams.add(message_id)
        self.runtime.update(self.task_id, lambda r: evolve(r, **add_message(r, kind, text, id=message_id, **extra)))
        if kind not in NOT_SHOWN:
            self.runtime.display.message(self.target, kind, capped_text(text), extra, message_id=message_id,
                                         session_id=getattr(self.session, "id", None))
        return message_id

    def extend_message(self, message_id: str, text: str) -> None:
        """Grow a message (a stream) on the record, and redraw it in place in the cell."""
        record = self.runtime.update(self.task_id, lambda r: evolve(r, **grow_message(r, message_id, text)))
        message = next((m for m in (record or {}).get("messages") or () if m.get("id") == message_id), None)
        if message is not None and message["kind"] not in NOT_SHOWN:
            extra = {k: v for k, v in message.items() if k not in ("kind", "text", "at", "id", "truncated")}
            self.runtime.display.update(self.target, message["kind"], message["text"], extra, message_id=message_id)

    def end_message(self, message_id: str) -> None:
        """A stream has ended: its last text goes to the cell now, not at the next redraw."""
        with self.lock:
            if self._open_streams is not None:
                self._open_streams.discard(message_id)
        self.runtime.display.flush(message_id)

    def settle_output(self) -> None:
        """An attempt has ended: what it printed goes to the record, and each stream it never closed
        ends, so its last text is in the cell before anyone awaiting the run goes on (a notebook
        saved by nbconvert or papermill keeps the whole text, not a redraw still held back)."""
        if self._out is not None:  # (most attempts print nothing: no lock taken for them)
            self.flush_output()
        if self._open_streams:
            with self.lock:
                streams, self._open_streams = self._open_streams or (), None
            for message_id in streams:
                self.runtime.display.flush(message_id)

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        value = {"done": done, "total": total, "message": message}
        self.runtime.update(self.task_id, lambda r: evolve(r, progress=value))

    def show(self, task_id: str, bundle: dict[str, str]) -> bool:
        """Record a ``show_task`` message and show ``bundle`` (a card) under the submitting
        cell; False when the run has no cell to show it in."""
        self.message("show_task", task_id)
        return self.runtime.display.show(self.target, bundle)


def _merge_output(output: list | None, chunks: list[tuple[str, str]]) -> list[dict]:
    """A stream's chunks are joined before they meet the kept text: added one by one, each copied that
    text (up to ``MAX_OUTPUT_CHARS``), and a task printing 100,000 lines took seconds, not a tenth."""
    merged = [dict(x) for x in output or ()]
    for stream, same in itertools.groupby(chunks, key=operator.itemgetter(0)):
        text = "".join(part for _, part in same)
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
