"""Task cards and the task board: anywidget widgets over the run records.

``TaskCard`` shows one run, ``TaskBoard`` all runs of a store in columns;
``Page`` and ``Divider`` stack them as a Capsule page function returns them.
Both are drawn by the ES modules in ``js/`` from synced traits only, kept
current by ``live.LiveWidget`` (coalesced, rate-capped, no thread of their
own), and print as text where there is no widget front end (``text.py``).
The widgets are imported on first use, so ``ui.text`` (the CLI's) costs no
anywidget import.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..record import STATUSES

_WIDGETS = {"TaskCard": ".card", "TaskBoard": ".board", "TaskBoardColumn": ".board",
            "DEFAULT_COLUMNS": ".board", "LiveWidget": ".live", "Page": ".page", "Divider": ".page"}


def __getattr__(name: str) -> Any:
    if name in _WIDGETS:
        return getattr(importlib.import_module(_WIDGETS[name], __name__), name)
    raise AttributeError(f"module 'capsule_nb.ui' has no attribute {name!r}")


def display(obj: Any) -> None:
    """Show ``obj`` in the current cell.

    Without a kernel (a script, terminal IPython) nothing can draw a widget,
    so its text form is shown once and a live widget is closed at once.
    """
    from ..notebook import kernel
    from .live import LiveWidget
    from .page import Page

    try:
        from IPython import get_ipython
        from IPython.display import display as ipy_display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        get_ipython = ipy_display = None  # type: ignore[assignment]
    if get_ipython is not None and get_ipython() is not None:
        ipy_display(obj)
    else:
        print(repr(obj))
    if kernel.kernel() is None and isinstance(obj, (LiveWidget, Page)):
        obj.close()


__all__ = ["TaskCard", "TaskBoard", "TaskBoardColumn", "DEFAULT_COLUMNS", "Page", "Divider", "STATUSES", "display"]
