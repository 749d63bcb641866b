"""The machinery every capsule_nb widget shares: store events in, coalesced state out.

Store events arrive on any thread (a task thread, the store's poller, the
loop) and may come by the thousand. A listener only marks the widget dirty;
the first mark arms one flush on the runtime's timer thread (not its loop,
which a blocking cell stops while thread runs go on). The flush recomputes
the widget's traits from the store's mirror, and sends what differs in one
message (``hold_sync``). A flush runs at once after a quiet spell and then
at most every ``FLUSH_SECONDS``, so a burst of any size costs a widget about
ten messages a second, and the last state always gets out.

The rest is a ``loop.call_later`` handle on the runtime's loop: the poll
that folds in other kernels' writes every ``refresh_ms``, and the grace
period before a widget nobody sees is closed. No widget starts a thread,
and ``close()`` leaves no subscriber or timer.

Views say when they are shown and hidden with custom messages, not with
ipywidgets' ``_view_count`` trait: a view removed because its tab closed
or its kernel went away would sync that trait over a dead connection (one
"Could not send widget sync message" per widget), while a view sends a
message only when its kernel is there to get it (``js/live.js``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import anywidget
from traitlets import Dict, Float, Unicode

from ..checks import whole_number
from ..engine.timers import Timer
from ..notebook.kernel import kernel
from ..record import CANCELLED
from . import assets, views

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("capsule_nb")

ACTIONS = ("cancel", "retry")
VIEW_STEPS = {"shown": 1, "hidden": -1}


def as_of(live: bool = True) -> str:
    """What ends the text of a view shown where it cannot be drawn (``live``: a widget's), or
    of a handle: when it was made."""
    where = "; live with its kernel, in a trusted notebook" if live else ""
    return f"\n(as of {time.strftime('%Y-%m-%d %H:%M:%S %Z')}{where})"


class LiveWidget(anywidget.AnyWidget):
    """A widget drawn from run records and kept current as they change."""

    _css = assets.css()

    # Kernel wall time of the last flush: a view counts running clocks on from
    # it, so a browser whose clock is off still shows the right elapsed time.
    clock = Float(0.0).tag(sync=True)
    # What the last Cancel or Retry said, when it could not do what was asked.
    notice = Unicode("").tag(sync=True)
    # Where the records live ({home, app}): a view whose kernel is gone asks the
    # Jupyter server for them there (ui/server.py). Sent once, with the first state.
    source = Dict().tag(sync=True)
    # The kernel process that made the widget ("" outside a kernel): ipykernel signs every
    # message it publishes with it, so a view that sees another has a restarted kernel behind
    # it, whether or not it heard the restart (js/live.js).
    kernel_session = Unicode("").tag(sync=True)

    FLUSH_SECONDS = 0.1  # at most 10 state messages a second per widget
    UNSEEN_SECONDS = 2.0  # a view re-rendered (a moved cell) comes back within this

    def __init__(self, app: "App", *, refresh_ms: int, **state: Any):
        whole_number("refresh_ms (milliseconds)", refresh_ms, minimum=1)
        self._app = app
        self._runtime = app.runtime
        self.refresh_ms = refresh_ms
        self._lock = threading.Lock()
        self._armed = False  # a flush is due; later events ride along with it
        self._closed = False
        self._last_flush = float("-inf")
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._flush_timer: Timer | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._views = 0  # views that said "shown" and not yet "hidden"
        self._store_said = ""  # the notice saying why the store does not write, while it does not
        running_in = kernel()
        super().__init__(clock=time.time(), source={"home": str(app.store.path), "app": app.name},
                         kernel_session=running_in.session.session if running_in is not None else "", **state)
        self.on_msg(self._on_view_msg)
        self._subscribe()
        # The state above was read before the subscription: a run that ended in between
        # (a fast one, while the comm opened) sent its last event to nobody. Read it again.
        self._changed()
        self._runtime.call_soon(self._arm, "poll", refresh_ms / 1000, self._poll)

    # ------------------------------------------------------- what subclasses say

    def _subscribe(self) -> None:
        """Listen to the store events this widget shows (``self._unsubscribe`` undoes it)."""
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        """The synced traits as they should be now, computed from the store's mirror."""
        raise NotImplementedError

    def _retried(self, task_id: str, handle: Any) -> None:
        """A Retry of ``task_id`` started the run ``handle``."""

    # ----------------------------------------------------------- events -> flush

    def _changed(self, record: dict[str, Any] | None = None) -> None:
        """A store event (any thread): note it; the next flush picks it up."""
        with self._lock:
            if self._armed or self._closed:
                return
            self._armed = True
        # On the timer thread, not the loop: a cell that blocks the kernel's loop must not
        # freeze a card whose run goes on in a thread (engine/timers.py).
        wait = self._last_flush + self.FLUSH_SECONDS - time.monotonic()
        self._flush_timer = self._runtime.timers.call_later(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._armed = False
            if self._closed:
                return
        self._last_flush = time.monotonic()
        try:
            state = self._state()
        except Exception:
            log.exception("capsule_nb: updating %s failed", type(self).__name__)
            return
        changed = {name: value for name, value in state.items() if getattr(self, name) != value}
        if changed:
            with self.hold_sync():
                for name, value in changed.items():
                    setattr(self, name, value)
                self.clock = time.time()

    def _poll(self) -> None:
        """Fold in other kernels' writes; the store publishes them as events. What keeps the
        store from writing (a full disk, its database deleted or replaced) is said on the view:
        a log line from a maintenance thread goes under a cell long finished, which nobody sees."""
        store = self._app.store
        try:
            store.poll()
        except Exception:
            log.exception("capsule_nb: polling the store at %s failed", store.path)
        failure = store.failure
        said = f"Not saved: {failure}" if failure is not None else ""
        if said != self._store_said:
            if said or self.notice == self._store_said:
                self.notice = said
            self._store_said = said
        self._arm("poll", self.refresh_ms / 1000, self._poll)

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop after ``delay`` seconds (call on the loop)."""
        if not self._closed:
            self._timers[name] = self._runtime.loop.call_later(delay, callback)

    # --------------------------------------------------------------- the view

    def _on_view_msg(self, _: Any, content: Any, buffers: Any) -> None:
        """A click in a view: ``{"action": "cancel" | "retry", "task_id": ...}``; or a view
        shown or hidden: ``{"view": "shown" | "hidden"}``.

        Sent as a message, not a trait, because a click is an event: a second
        click must act again. The comm handler may run off the loop thread
        (kernels with subshells), so the work is handed to the loop.
        """
        if not isinstance(content, dict):
            return
        if content.get("action") in ACTIONS and isinstance(content.get("task_id"), str):
            self.send({"heard": content["task_id"]})  # else the view files a Cancel through the server
            self._runtime.call_soon(self._act, content["action"], content["task_id"])
        elif content.get("view") in VIEW_STEPS:
            self._runtime.call_soon(self._counted, VIEW_STEPS[content["view"]])

    def _act(self, action: str, task_id: str) -> None:
        record = self._app.store.get_run(task_id)
        notice = ""
        if record is None:
            notice = views.refusal(task_id, "missing")
        elif action == "cancel":
            # (one cancelled already: a click heard late, its cancel filed meanwhile through the server)
            if not self._app.for_run(record).runtime.cancel(task_id) and record["status"] != CANCELLED:
                notice = views.refusal(task_id, "finished")
        else:
            try:
                handle = self._app.resubmit(task_id)
            except Exception as exc:
                notice = f"cannot retry {record['task_name']}: {exc}"
            else:
                self._retried(task_id, handle)
        if notice and notice == self.notice:
            # A view keeps a clicked button disabled until its next state: the same refusal
            # again must still be a change, or the button stays disabled with nothing said.
            self.notice = ""
        self.notice = notice

    def _counted(self, step: int) -> None:
        """A view was shown (+1) or hidden (-1); none left: close after a grace period."""
        self._views = max(0, self._views + step)
        if step > 0:  # a view drawn anew (a reload, a reopened tab) got the last state's clock,
            self.clock = time.time()  # maybe minutes old: its running clocks would restart near 0
        if step < 0 and self._views == 0:
            self._arm("unseen", self.UNSEEN_SECONDS, self._close_if_unseen)

    def _close_if_unseen(self) -> None:
        if self._views == 0:
            self.close()

    # ------------------------------------------------------------------- close

    def close(self) -> None:
        """Stop listening, cancel the timers and close the comm (and so every view)."""
        lock = getattr(self, "_lock", None)  # close() also runs from __del__ of a half-made widget
        if lock is not None:
            with lock:
                closing, self._closed = not self._closed, True
            if closing:
                if self._unsubscribe is not None:
                    self._unsubscribe()
                    self._unsubscribe = None
                if self._flush_timer is not None:
                    self._flush_timer.cancel()
                try:
                    self._runtime.call_soon(self._cancel_timers)
                except RuntimeError:  # the loop is closed, and its timers with it
                    self._timers.clear()
                self.layout.close()  # every DOMWidget makes a Layout widget, with a comm of its own
        super().close()

    def _cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The widget, and its text for a reader that cannot draw it (an untrusted notebook,
        GitHub, nbconvert): that text is made once, as the output is shown, so it says when."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle  # (anywidget adds metadata)
        if isinstance(data, dict) and "text/plain" in data:
            data["text/plain"] += as_of()
        return bundle
