"""Queries over run records: ``task.find/count/cancel`` and ``app.tasks``.

They read the store's in-memory mirror (kept current with other processes
through the change feed), so they are cheap enough to call from a widget
refresh. Each returns a value usable as it is or awaited, as in Capsule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .checks import whole_number
from .awaitables import ReadyInt, ReadyList
from .record import FINISHED, check_status

if TYPE_CHECKING:
    from .app import App
    from .handle import TaskHandle


class TaskQuery:
    """Runs of one app, or of one task of it."""

    def __init__(self, app: "App", task_name: str | None = None):
        self._app = app
        self._task_name = task_name

    def _matching(self, status: str | None, session_id: Any, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Runs with this status, of this session (an id or a ``Session``; "" as None: any), whose
        arguments match ``filters``."""
        check_status(status)
        session_id = getattr(session_id, "id", session_id)
        self._app.store.poll()
        name, app = self._task_name, self._app.name
        for record in self._app.store.runs():
            if record["app"] != app or (name is not None and record["task_name"] != name):
                continue
            if status is not None and record["status"] != status:
                continue
            if session_id and record.get("session_id") != session_id:
                continue
            params = record.get("params") or {}
            if all(k in params and params[k] == v for k, v in filters.items()):
                yield record

    def find(self, status: str | None = None, session_id: str | None = None, limit: int = 100, offset: int = 0,
             **kwarg_filters: Any) -> ReadyList:
        """Handles of matching runs, newest first."""
        whole_number("limit", limit)
        whole_number("offset", offset)
        from .handle import TaskHandle

        records = sorted(self._matching(status, session_id, kwarg_filters), key=lambda r: r["task_id"], reverse=True)
        chosen = records[offset : offset + limit] if limit else records[offset:]
        return ReadyList(TaskHandle(self._app, r["task_id"]) for r in chosen)

    def count(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        return ReadyInt(sum(1 for _ in self._matching(status, session_id, kwarg_filters)))

    def cancel(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        """Cancel matching unfinished runs; returns how many were cancelled."""
        live = [r["task_id"] for r in self._matching(status, session_id, kwarg_filters) if r["status"] not in FINISHED]
        return ReadyInt(sum(1 for task_id in live if self._app.runtime.cancel(task_id)))

    def get(self, task_id: str) -> "TaskHandle | None":
        return self._app.get_task(task_id)

    def __repr__(self) -> str:
        scope = f"task {self._task_name!r}" if self._task_name else f"app {self._app.name!r}"
        return f"<runs of {scope}: {self.count()}>"
