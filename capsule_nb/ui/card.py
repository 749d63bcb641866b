"""TaskCard: one run, live."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from traitlets import Dict, List, Unicode

from . import assets, views
from .live import LiveWidget
from .text import run_text

if TYPE_CHECKING:
    from ..handle import TaskHandle


class TaskCard(LiveWidget):
    """A run's card: name, status, attempt of max, elapsed time, progress bar, messages,
    captured output, error with its traceback, result preview, Cancel and Retry.

    Retry starts a new run with the same arguments, and the card follows it.
    Outside a widget front end (terminal IPython, ``repr``) it is text.
    """

    _esm = assets.esm("task_card.js")

    task_id = Unicode("").tag(sync=True)
    title = Unicode("").tag(sync=True)
    run = Dict().tag(sync=True)  # views.run(): status, attempts, times, progress, error, result
    messages = List().tag(sync=True)  # the newest views.MESSAGES_SHOWN of reply/notify/stream/log/show_task
    output = List().tag(sync=True)  # [{stream, text}]: the tail of what the run printed

    def __init__(self, handle: "TaskHandle | str", message: str | None = None, *, refresh_ms: int = 5000):
        if isinstance(handle, str):
            from ..app import app_in_use

            found = app_in_use().get_task(handle)
            if found is None:
                raise KeyError(f"no run {handle!r} in {app_in_use().home}")
            handle = found
        self.handle = handle
        self.message = message
        self._app = handle._app
        super().__init__(self._app, refresh_ms=refresh_ms, **self._state())

    def _state(self) -> dict[str, Any]:
        record = self._app.store.get_run(self.handle.task_id)
        if record is None:  # pruned from the store: keep showing the last state
            return {}
        return {"task_id": record["task_id"], **views.card(record, self.message)}

    def _subscribe(self) -> None:
        self._unsubscribe = self._app.store.events.subscribe(self._changed, task_id=self.handle.task_id)

    def _retried(self, task_id: str, handle: "TaskHandle") -> None:
        """Follow the new run: listen to it instead, and show it."""
        with self._lock:  # not while close() runs, or the new subscription would outlive it
            if task_id != self.handle.task_id or self._closed:
                return
            stop_listening = self._unsubscribe
            self.handle = handle
            self._subscribe()
        if stop_listening is not None:
            stop_listening()
        self._changed()

    def __repr__(self) -> str:
        try:
            return run_text(self.handle.snapshot(), self.message)
        except KeyError:
            return f"<TaskCard {self.handle.task_id} (not in the store)>"
