"""How a run's messages look in a cell, and the ``Display`` that puts them there.

The engine hands every message of a bound run to a ``Display``; in a kernel
it is ``KernelDisplay``, which sends the message to iopub with the parent
header of the cell that submitted the run, so it appears under that cell.
The session layer uses the same display for messages sent from a cell.

Each message is one output with a display id, so it can change in place:

* a stream (``session.stream``, ``stream_reply``) is one output that an
  ``update_display_data`` redraws with the whole text so far: at once after a
  quiet spell, then at most every ``REDRAW_SECONDS`` (less often once the text
  is longer than ``REDRAW_CHARS``, so a long stream stays linear), and the last text always
  goes out, at the latest when the stream ends (a token stream of thousands of
  chunks is a few redraws a second, not thousands of ever longer messages);
* a notification replaces the session's previous one under the same cell, as
  Capsule's replace-in-place notification block does.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

from . import kernel

NOTICES_KEPT = 10_000  # (session, cell) notification outputs remembered for replacing in place
REDRAW_SECONDS = 0.05  # a growing message is redrawn at most 20 times a second,
REDRAW_CHARS = 100_000  # and less often once longer: each redraw sends the whole text

_displays: "weakref.WeakSet[KernelDisplay]" = weakref.WeakSet()  # every app's display, for ``flush_held``


def render_message(kind: str, text: str, extra: dict[str, Any]) -> dict[str, str]:
    """The mime bundle a message shows as in a cell."""
    detail = extra.get("detail") or ""
    if kind == "notify":
        plain = f"[notify] {text}" + (f" — {detail}" if detail else "")
        markdown = f"🔔 **{text}**" + (f"  \n{detail}" if detail else "")
    else:
        plain, markdown = text, text
    return {"text/plain": plain, "text/markdown": markdown}


class KernelDisplay:
    """``engine.run.Display`` for a Jupyter kernel (a script has no kernel: it shows nothing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notices: OrderedDict[str, None] = OrderedDict()  # notification outputs already drawn
        self._redrawn: OrderedDict[str, float] = OrderedDict()  # display id -> when it may be redrawn next
        self._due: dict[str, tuple[Any, str, Any, dict[str, Any]]] = {}  # display id -> the newest redraw, waiting
        _displays.add(self)

    def message(self, target: Any, kind: str, text: str, extra: dict[str, Any], *, message_id: str,
                session_id: str | None = None) -> bool:
        bundle = render_message(kind, text, extra)
        if kind != "notify":
            return kernel.emit(target, bundle, display_id=_display_id(message_id))
        notice = f"capsule-notify-{session_id}-{kernel.cell_id(target)}"
        with self._lock:  # two notifications at once still make one output (emit only queues a send)
            if not kernel.emit(target, bundle, display_id=notice, update=notice in self._notices):
                return False
            self._notices[notice] = None
            while len(self._notices) > NOTICES_KEPT:
                self._notices.popitem(last=False)
        return True

    def update(self, target: Any, kind: str, text: str | Callable[[], str], extra: dict[str, Any], *,
               message_id: str) -> bool:
        if kernel.kernel() is None or target is None:
            return False
        display_id = _display_id(message_id)
        with self._lock:
            if display_id in self._due:  # a redraw is armed: it takes this newer text
                self._due[display_id] = (target, kind, text, extra)
                return True
            wait = self._redrawn.get(display_id, float("-inf")) - time.monotonic()
            if wait > 0:
                self._due[display_id] = (target, kind, text, extra)
                timer = threading.Timer(wait, self._redraw, (display_id,))
                timer.daemon = True
                timer.start()
                return True
            return self._emit(display_id, target, kind, text, extra)

    def flush(self, message_id: str) -> None:
        self._redraw(_display_id(message_id))

    def flush_all(self) -> None:
        """Send every redraw held back."""
        with self._lock:
            held = list(self._due)
        for display_id in held:
            self._redraw(display_id)

    def _redraw(self, display_id: str) -> None:
        """Send the redraw held back for ``display_id``, if one still is (a flush may have sent it)."""
        with self._lock:
            due = self._due.pop(display_id, None)
            if due is None:
                return
            self._emit(display_id, *due)

    def _emit(self, display_id: str, target: Any, kind: str, text: str | Callable[[], str],
              extra: dict[str, Any]) -> bool:
        """Caller holds ``self._lock``. A text given as a function is built only here, for a redraw that
        goes out: a stream of thousands of writes is not joined whole at every one of them. The next
        redraw waits longer the longer the text, so a long stream sends at most ``REDRAW_CHARS``
        characters per ``REDRAW_SECONDS``, not its whole text 20 times a second."""
        text = text() if callable(text) else text
        self._redrawn[display_id] = time.monotonic() + REDRAW_SECONDS * max(1.0, len(text) / REDRAW_CHARS)
        self._redrawn.move_to_end(display_id)
        while len(self._redrawn) > NOTICES_KEPT:
            self._redrawn.popitem(last=False)
        return kernel.emit(target, render_message(kind, text, extra), display_id=display_id, update=True)

    def show(self, target: Any, bundle: dict[str, str]) -> bool:
        return kernel.emit(target, bundle)


def flush_held(*_: Any) -> None:
    """Send every redraw still held back, by any app's display: registered as ``post_run_cell``, so
    a cell's stream that was never closed shows its whole text before the cell is done (nbconvert
    and papermill save what came before the cell's end, not a redraw sent after it)."""
    for display in list(_displays):
        display.flush_all()


def _display_id(message_id: str) -> str:
    return f"capsule-message-{message_id}"
