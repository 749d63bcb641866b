"""When each process that runs runs was last seen alive.

A run whose process died stays ``running`` on disk until another process finds it
(``Upkeep.recover``), which may be hours later, when a kernel next opens the store: it
used to be recorded as ending then, so its card said it ran for hours. A process beats
into one row every ``BEAT_SECONDS`` while it has runs running (an idle one writes
nothing), and its runs found left behind end at its last sign of life. Whoever records
them drops its entry; a process that closes drops its own; an entry older than
``FORGET_SECONDS`` goes at any beat (a process that died with nothing running).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .rows import ALIVE

if TYPE_CHECKING:
    from .store import Store

BEAT_SECONDS = 2.0
FORGET_SECONDS = 7 * 86400.0


def beat(store: "Store", owner: str) -> None:
    now = time.time()

    def change(value: Any) -> dict[str, float]:
        seen = {who: at for who, at in _entries(value).items() if now - at < FORGET_SECONDS}
        seen[owner] = now
        return seen

    store.update_value(ALIVE, change)


def last_seen(store: "Store", owner: str) -> float | None:
    """When ``owner`` last beat, if it did (and its entry is still there)."""
    return _entries(store.get(ALIVE)).get(owner)


def forget(store: "Store", owners: set[str]) -> None:
    store.update_value(ALIVE, lambda value: {who: at for who, at in _entries(value).items() if who not in owners})


def _entries(value: Any) -> dict[str, float]:
    """The row's entries that are what they should be (a row written behind our back reads as empty)."""
    return {who: at for who, at in value.items() if type(at) is float} if type(value) is dict else {}
