"""TaskCard: one run, live."""

from __future__ import annotations

from typing import Any

from traitlets import Dict, List, Unicode

from ..checks import text_or_none
from ..handle import TaskHandle
from ..queries import newest_in_series
from . import assets, views
from .live import LiveWidget
from .text import run_text


class TaskCard(LiveWidget):
    """A run's card: name, status, attempt of max, elapsed time, progress bar, messages,
    captured output, error with its traceback, result preview, Cancel and Retry.

    Retry starts a new run with the same arguments, and the card follows it. A card of
    a repeating run (``schedule("every 5m")``) follows its series: each next run, in
    this process or another, so it never says "completed" while the series goes on,
    and its Cancel stops the series.
    Outside a widget front end (terminal IPython, ``repr``) it is text.
    """

    _esm = assets.esm("task_card.js")

    task_id = Unicode("").tag(sync=True)
    title = Unicode("").tag(sync=True)
    run = Dict().tag(sync=True)  # views.run(): status, attempts, times, progress, error, result
    messages = List().tag(sync=True)  # the newest views.MESSAGES_SHOWN of reply/notify/stream/log/show_task
    output = List().tag(sync=True)  # [{stream, text}]: the tail of what the run printed

    def __init__(self, handle: "TaskHandle | str", message: str | None = None, *, refresh_ms: int = 5000):
        text_or_none("TaskCard message", message)
        if isinstance(handle, str):
            from ..app import app_in_use

            found = app_in_use().get_task(handle)
            if found is None:
                raise KeyError(f"no run {handle!r} in {app_in_use().home}")
            handle = found
        elif not hasattr(handle, "task_id") or not hasattr(handle, "_app"):
            raise TypeError(f"TaskCard shows a run: give its TaskHandle or its id, not {handle!r}")
        self._app = handle._app
        record = self._app.store.get_run(handle.task_id) or {}
        self._series: str | None = record.get("series") if record.get("every") else None
        newer = newest_in_series(self._app.store, record)  # (shown again after the series went on)
        self.handle = TaskHandle(self._app, newer["task_id"]) if newer else handle
        self.message = message
        super().__init__(self._app, refresh_ms=refresh_ms, **self._state())

    def _state(self) -> dict[str, Any]:
        record = self._app.store.get_run(self.handle.task_id)
        if record is None:  # pruned from the store: keep showing the last state
            return {}
        return {"task_id": record["task_id"], **views.card(record, self.message)}

    def _subscribe(self) -> None:
        events = self._app.store.events
        own = events.subscribe(self._changed, task_id=self.handle.task_id)
        if self._series is None:
            self._unsubscribe = own
            return
        series = events.subscribe(self._series_changed)

        def both() -> None:
            own()
            series()

        self._unsubscribe = both

    def _series_changed(self, record: dict[str, Any]) -> None:
        """A store event (any thread): a newer run of the series is the one to show."""
        if record.get("series") == self._series and record["task_id"] > self.handle.task_id:
            self._retried(self.handle.task_id, TaskHandle(self._app, record["task_id"]))

    def _retried(self, task_id: str, handle: "TaskHandle") -> None:
        """Follow the new run (a Retry's, or the series' next): listen to it instead, and show it."""
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
