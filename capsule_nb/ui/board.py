"""TaskBoard: every run of a store (of every app on it), in columns by status."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

from traitlets import Dict, Int, List, TraitError, Unicode, observe, validate

from ..checks import text_or_none, whole_number
from ..record import check_status
from . import assets, views
from .live import LiveWidget
from .text import board_text

FILTER_KEYS = ("app", "task_name", "session_id", "status")


@dataclass(frozen=True)
class TaskBoardColumn:
    """A column of the board: a label and the statuses whose runs it holds."""

    label: str
    statuses: tuple[str, ...]

    def __init__(self, label: str, statuses: Iterable[str]):
        if not isinstance(label, str) or not label:
            raise TypeError(f"TaskBoardColumn label is a non-empty string, not {label!r}")
        if not isinstance(statuses, (str, list, tuple, set, frozenset)):
            raise TypeError(f"TaskBoardColumn {label!r}: statuses is a list such as ['running'], not {statuses!r}")
        statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)
        if not statuses:
            raise ValueError(f"TaskBoardColumn {label!r} needs at least one status: it would never hold a run")
        for status in statuses:
            check_status(status)
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "statuses", statuses)

    def to_dict(self) -> dict[str, Any]:
        """The SDK's form: ``{"label": ..., "statuses": [...]}``."""
        return {"label": self.label, "statuses": list(self.statuses)}


DEFAULT_COLUMNS = (
    TaskBoardColumn("Pending", ("pending", "claimed", "scheduled", "retry")),
    TaskBoardColumn("Running", ("running",)),
    TaskBoardColumn("Completed", ("completed",)),
    TaskBoardColumn("Failed", ("failed", "cancelled", "timeout")),
)


def _clean_filter(filter: dict[str, Any] | None) -> dict[str, Any]:
    """Known keys only; an empty value (a menu set back to "all") means no condition."""
    if filter is not None and not isinstance(filter, dict):
        raise TypeError(f"TaskBoard filter is a dict such as {{'task_name': 'build_report'}}, not {filter!r}")
    filter = dict(filter or {})
    unknown = set(filter) - set(FILTER_KEYS)
    if unknown:
        raise ValueError(f"TaskBoard filter keys are {FILTER_KEYS}, not {sorted(unknown)}")
    for key, value in filter.items():
        if not (value is None or isinstance(value, str)
                or isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise TypeError(f"TaskBoard filter {key!r} is a string or a list of strings, not {value!r}")
    filter = {key: value for key, value in filter.items() if value not in (None, "", [], ())}
    wanted = filter.get("status")
    for status in wanted if isinstance(wanted, (list, tuple)) else [wanted] if wanted is not None else []:
        check_status(status)
    return filter


def _columns(columns: Iterable[TaskBoardColumn]) -> tuple[TaskBoardColumn, ...]:
    """``columns`` checked: at least one, each a ``TaskBoardColumn``, no label twice ("show
    more" counts by label)."""
    if isinstance(columns, (str, dict)) or not isinstance(columns, Iterable):
        raise TypeError(f"TaskBoard columns is a list of cpsl.ui.TaskBoardColumn, not {columns!r}")
    columns = tuple(columns)
    wrong = next((c for c in columns if not isinstance(c, TaskBoardColumn)), None)
    if wrong is not None:
        raise TypeError(f"TaskBoard columns are cpsl.ui.TaskBoardColumn(label, statuses), not {wrong!r}")
    labels = [c.label for c in columns]
    if not columns or len(set(labels)) < len(labels):
        raise ValueError(f"a TaskBoard needs at least one column, each with its own label; got {labels}")
    return columns


class TaskBoard(LiveWidget):
    """All runs of a store in columns by status, newest first: every app's, unless
    ``filter={"app": name}`` narrows it (as ``task_name``, ``session_id`` and ``status`` do).

    ONE widget whatever the number of runs: its cards are data (``lanes``, a
    list synced as one trait and sent only when it differs), at most
    ``page_size`` per column until "show more" raises that column's limit.
    Clicking a card opens its details (``selected`` -> ``detail``); the cards'
    Cancel and Retry work as on a TaskCard.
    """

    _esm = assets.esm("task_board.js")

    title = Unicode("Tasks").tag(sync=True)
    filter = Dict().tag(sync=True)  # app / task_name / session_id / status; the view's menus set it too
    lanes = List().tag(sync=True)  # per column: {label, statuses, count, limit, cards: [views.summary]}
    limits = Dict().tag(sync=True)  # column label -> cards shown; "show more" raises it
    choices = Dict().tag(sync=True)  # what the filter menus offer
    total = Int(0).tag(sync=True)  # runs matching the filter
    page_size = Int(50).tag(sync=True)  # cards a column shows at first, and how many "show more" adds
    selected = Unicode("").tag(sync=True)  # the run in the details pane ("" = none)
    detail = Dict().tag(sync=True)  # that run as a card: {task_id, title, run, messages, output}

    def __init__(self, *, title: str | None = None, filter: dict[str, Any] | None = None,
                 columns: Iterable[TaskBoardColumn] | None = None, refresh_ms: int = 5000,
                 page_size: int = 50, app: Any = None):
        from ..app import app_in_use

        text_or_none("TaskBoard title", title)
        self.columns = _columns(columns) if columns is not None else DEFAULT_COLUMNS
        self._given = {"title": title, "columns": columns is not None}  # what ``to_dict`` says, as the SDK's
        whole_number("page_size", page_size, minimum=1)
        app = app or app_in_use()
        self._app = app
        filter = _clean_filter(filter)
        super().__init__(app, refresh_ms=refresh_ms, title=title or "Tasks", filter=filter, page_size=page_size,
                         **self._compute(filter, {}, "", page_size))

    # ------------------------------------------------------------------ state

    def _compute(self, filter: dict[str, Any], limits: dict[str, int], selected: str, page: int) -> dict[str, Any]:
        return views.board(self._app.store, columns=[(c.label, c.statuses) for c in self.columns],
                           filter=filter, limits=limits, page=page, selected=selected)

    def _state(self) -> dict[str, Any]:
        return self._compute(self.filter, self.limits, self.selected, self.page_size)

    def _subscribe(self) -> None:
        self._unsubscribe = self._app.store.events.subscribe(self._changed)

    @validate("filter")
    def _valid_filter(self, proposal: dict[str, Any]) -> dict[str, Any]:
        try:
            return _clean_filter(proposal["value"])
        except ValueError as exc:
            raise TraitError(str(exc)) from None

    @observe("filter", "limits", "selected")
    def _view_changed(self, change: dict[str, Any]) -> None:
        self._changed()

    def _retried(self, task_id: str, handle: Any) -> None:
        if self.selected == task_id:
            self.selected = handle.task_id

    def to_dict(self) -> dict[str, Any]:
        """The SDK's form: ``{"type": "task_board", "refresh_ms": N}``, with ``title``,
        ``filter`` and ``columns`` when they were given."""
        spec: dict[str, Any] = {"type": "task_board", "refresh_ms": self.refresh_ms}
        if self._given["title"] is not None:
            spec["title"] = self._given["title"]
        if self.filter:
            spec["filter"] = dict(self.filter)
        if self._given["columns"]:
            spec["columns"] = [column.to_dict() for column in self.columns]
        return spec

    # ------------------------------------------------------------------- text

    def _lanes(self, per_column: int = 5) -> list[dict[str, Any]]:
        """The board's columns under its filter, with the newest ``per_column`` cards each."""
        return self._compute(self.filter, {}, "", per_column)["lanes"]

    def __repr__(self) -> str:
        return board_text(self.title, self._lanes())
