"""How many finished runs an app keeps: a setting of the app on its store, not of a process.

A second notebook or a script opening the app with the default number cut the history the
first one kept; now the number set last (``App(keep_finished=...)``, ``configure``) holds for
every process of the app, and each maintenance pass reads it afresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rows import APP_SETTINGS

if TYPE_CHECKING:
    from .store import Store

KEEP_FINISHED = 10_000  # until one is set


def kept(store: "Store", app: str) -> int:
    value = (store.get(APP_SETTINGS + app) or {}).get("keep_finished")
    return value if type(value) is int and value >= 0 else KEEP_FINISHED


def keep(store: "Store", app: str, finished: int) -> None:
    store.update_value(APP_SETTINGS + app, lambda s: {**(s if isinstance(s, dict) else {}), "keep_finished": finished})
