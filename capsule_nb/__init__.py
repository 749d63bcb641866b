"""capsule_nb: Capsule's background tasks, inside Jupyter.

``%load_ext capsule_nb`` (or ``import capsule_nb as cpsl``), then
``@cpsl.task`` / ``.submit()`` / ``await handle.result()``.
"""

from __future__ import annotations

from typing import Any

from .app import App, Image, configure, current_session, get_task, schedule, task
from .errors import LockedError, TaskCancelled, TaskFailed
from .handle import TaskHandle
from .notebook import load_ipython_extension, unload_ipython_extension
from .session import Session
from .tables import Column

__version__ = "0.2.0.dev0"  # after the 0.1.0 release, whose stores open here (migrated once)


def __getattr__(name: str) -> Any:
    """``cpsl.ui`` is imported on first use: the widgets pull in anywidget and
    ipywidgets, which a script or a worker process does not need."""
    if name == "ui":
        import importlib

        return importlib.import_module(".ui", __name__)
    raise AttributeError(f"module 'capsule_nb' has no attribute {name!r}")

__all__ = [
    "App",
    "Column",
    "Image",
    "LockedError",
    "Session",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "configure",
    "current_session",
    "get_task",
    "load_ipython_extension",
    "schedule",
    "task",
    "ui",
    "unload_ipython_extension",
]
