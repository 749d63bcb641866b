"""Queries over run records: ``task.find/count/cancel`` and ``app.tasks``.

They read the store's indexed run table (what every process has written),
so a page of the newest runs, or a count, costs the same with a million
runs of history as with ten. Each returns a value usable as it is or
awaited, as in Capsule.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from .awaitables import ReadyInt, ReadyList, ReadyNone
from .checks import whole_number
from .doc_filters import json_equal
from .record import PENDING, RETRY, SCHEDULED, check_status

_WAITING = frozenset({PENDING, SCHEDULED, RETRY})  # what a cancel with no status stops
_ID_TAIL = re.compile(r"[0-9a-f]{4,23}")  # the end of a run id (24 hex digits), as a board's card shows it
_SHORT_TAIL = re.compile(r"[0-9a-f]{1,3}")  # too little of one to look for

if TYPE_CHECKING:
    from .app import App
    from .handle import TaskHandle
    from .store.store import Store


def whole_run_id(store: "Store", text: str) -> str:
    """The run ``text`` names, for ``%task`` and the CLI: a whole id, or the end of one (a
    board's card shows its last 6 characters) that only one run's id ends with. A LookupError
    lists the runs when several do; an id nothing matches comes back for the caller to refuse."""
    if _SHORT_TAIL.fullmatch(text.lower()) and store.get_run(text) is None:
        raise LookupError(f"no run {text!r}: give at least 4 characters of a run's id (a board's card shows 6)")
    if not _ID_TAIL.fullmatch(text.lower()) or store.get_run(text) is not None:
        return text
    found = store.run_ids_ending(text.lower(), limit=6)  # (ids are lower-case hex: B04326 is b04326)
    if len(found) > 1:
        listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise LookupError(f"more than one run's id ends with {text!r} ({listed}): give more of the id")
    return found[0] if found else text


def newest_in_series(store: "Store", record: dict[str, Any]) -> dict[str, Any] | None:
    """The newest run of a repeating run's series (``schedule("every 5m")``), when it is a later
    run than ``record``: what the series' handle and card speak for once a run of it has ended."""
    series = record.get("series") if record.get("every") else None
    if series is None:
        return None
    newest = store.runs({"app": record["app"], "task_name": record["task_name"]},
                        keep=lambda r: r.get("series") == series, limit=1)
    return newest[0] if newest and newest[0]["task_id"] > record["task_id"] else None


class TaskQuery:
    """Runs of one app, or of one task of it."""

    def __init__(self, app: "App", task_name: str | None = None):
        self._app = app
        self._task_name = task_name

    def _where(self, status: str | None, session_id: Any) -> dict[str, Any]:
        """The runs' columns to match: this app (and task), this status, this session (an id
        or a ``Session``; "" as None: any)."""
        check_status(status)
        session_id = getattr(session_id, "id", session_id)
        where: dict[str, Any] = {"app": self._app.name}
        if self._task_name is not None:
            where["task_name"] = self._task_name
        if status is not None:
            where["status"] = status
        if session_id:
            where["session_id"] = session_id
        return where

    def find(self, status: str | None = None, session_id: str | None = None, limit: int = 100, offset: int = 0,
             **kwarg_filters: Any) -> ReadyList:
        """Handles of matching runs, newest first."""
        whole_number("limit", limit)
        whole_number("offset", offset)
        from .handle import TaskHandle

        records = self._app.store.runs(self._where(status, session_id), keep=_arguments(kwarg_filters),
                                       arguments=kwarg_filters, limit=limit or None, offset=offset)
        return ReadyList(TaskHandle(self._app, r["task_id"]) for r in records)

    def count(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        return ReadyInt(self._app.store.count_runs(self._where(status, session_id), keep=_arguments(kwarg_filters),
                                                   arguments=kwarg_filters))

    def cancel(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        """Cancel matching runs that wait (Capsule's rule: pending, scheduled or retry, so a
        backlog is cleared without killing work in progress); ``status="running"`` stops
        running ones too. Gives how many were cancelled."""
        check_status(status)
        statuses = _WAITING if status is None else {status}
        where, keep = self._where(None, session_id), _arguments(kwarg_filters)
        self._app.store.poll()  # runs other processes started lately
        live = [r["task_id"] for r in self._app.store.unfinished_runs() if r["status"] in statuses
                and all(r.get(k) == v for k, v in where.items()) and (keep is None or keep(r))]
        return ReadyInt(sum(1 for task_id in live if self._app.runtime.cancel(task_id)))

    def get(self, task_id: str) -> "TaskHandle | ReadyNone":
        """The run's handle, or a stand-in for None: Capsule code awaits either."""
        return self._app.get_task(task_id) or ReadyNone()

    def __repr__(self) -> str:
        scope = f"task {self._task_name!r}" if self._task_name else f"app {self._app.name!r}"
        return f"<runs of {scope}: {self.count()}>"


def _arguments(filters: dict[str, Any]) -> Callable[[dict[str, Any]], bool] | None:
    """A test of a run's arguments (``find(city="Paris")``), or None when there is none."""
    if not filters:
        return None

    def keep(record: dict[str, Any]) -> bool:
        params = record.get("params") or {}
        return all(k in params and json_equal(params[k], v) for k, v in filters.items())

    return keep
