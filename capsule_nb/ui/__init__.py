"""Task cards and the task board.

Until the anywidget front end lands these render as text (which is also
what terminal IPython and ``repr`` will keep showing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from ..records import STATUSES, check_status
from .text import board_text, card_text

if TYPE_CHECKING:
    from ..handle import TaskHandle


@dataclass(frozen=True)
class TaskBoardColumn:
    label: str
    statuses: tuple[str, ...]

    def __init__(self, label: str, statuses: Iterable[str]):
        statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)
        for status in statuses:
            check_status(status)
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "statuses", statuses)


DEFAULT_COLUMNS = (
    TaskBoardColumn("Pending", ("pending", "claimed", "scheduled", "retry")),
    TaskBoardColumn("Running", ("running",)),
    TaskBoardColumn("Completed", ("completed",)),
    TaskBoardColumn("Failed", ("failed", "cancelled", "timeout")),
)


class TaskCard:
    """A run's card: name, status, attempt, progress, messages, error, result."""

    def __init__(self, handle: "TaskHandle", message: str | None = None):
        self.handle = handle
        self.message = message

    @property
    def task_id(self) -> str:
        return self.handle.task_id

    def __repr__(self) -> str:
        return card_text(self.handle.snapshot(), self.message)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


_FILTER_KEYS = ("task_name", "session_id", "status")


class TaskBoard:
    """All runs of an app in columns by status."""

    def __init__(self, *, title: str | None = None, filter: dict[str, Any] | None = None,
                 columns: Iterable[TaskBoardColumn] | None = None, refresh_ms: int = 5000, app: Any = None):
        from ..app import default_app

        self.app = app or default_app()
        self.title = title or "Tasks"
        self.filter = dict(filter or {})
        unknown = set(self.filter) - set(_FILTER_KEYS)
        if unknown:
            raise ValueError(f"TaskBoard filter keys are {_FILTER_KEYS}, not {sorted(unknown)}")
        self.columns = tuple(columns) if columns is not None else DEFAULT_COLUMNS
        if refresh_ms <= 0:
            raise ValueError(f"refresh_ms must be > 0, got {refresh_ms!r}")
        self.refresh_ms = refresh_ms

    def records(self) -> list[tuple[str, list[dict[str, Any]]]]:
        self.app.store.poll()
        runs = [r for r in self.app.store.runs() if r["app"] == self.app.name
                and all(r.get(k) == v for k, v in self.filter.items())]
        runs.sort(key=lambda r: r["task_id"], reverse=True)
        return [(c.label, [r for r in runs if r["status"] in c.statuses]) for c in self.columns]

    def __repr__(self) -> str:
        return board_text(self.title, self.records())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def display(obj: Any) -> None:
    """Show ``obj`` in the current cell, or print it outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import display as ipy_display
    except ImportError:  # pragma: no cover
        print(repr(obj))
        return
    if get_ipython() is None:
        print(repr(obj))
    else:
        ipy_display(obj)


__all__ = ["TaskCard", "TaskBoard", "TaskBoardColumn", "DEFAULT_COLUMNS", "STATUSES", "display"]
