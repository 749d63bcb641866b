"""A refresh asked of a run that another process owns: ``h.refresh()`` in a second kernel.

The owner's timer ends a run at its deadline. A refresh from elsewhere is a row, the
time it was asked, which the owner reads when the deadline comes: a refresh since
then moves the deadline to that time plus the timeout, instead of ending the run.
Nothing polls for it, and the owner answers within a timeout whenever it was asked.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .rows import REFRESH

if TYPE_CHECKING:
    from .store import Store


def ask(store: "Store", task_id: str) -> None:
    store.set(REFRESH + task_id, {"at": time.time()})


def asked_at(store: "Store", task_id: str) -> float | None:
    """When a refresh of ``task_id`` was last asked from another process, if ever."""
    at = (store.get(REFRESH + task_id) or {}).get("at")
    return at if type(at) is float else None
