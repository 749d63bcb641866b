"""The store layer: every byte on disk, and the change events that follow a write.

It knows nothing of tasks, sessions, notebooks or widgets. One ``Store`` per
folder per process: ``open_store`` hands out the shared one, so apps on one
home share one writer thread and one mirror.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .store import Store

__all__ = ["Store", "flush_all", "open_store"]

log = logging.getLogger("capsule_nb")

_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def open_store(home: str | Path, *, afresh: bool = False) -> Store:
    """This process's ``Store`` for the folder ``home`` (opened on first use). ``afresh``: open
    it again if its database was deleted or replaced since (``Store.replaced``), for a process
    that only reads and outlives kernels, the Jupyter server: a kernel's runs hold their store."""
    key = Path(home).expanduser().resolve()
    with _stores_lock:
        store = _stores.get(key)
        if store is not None and afresh and store.replaced is not None:
            store.close()
            store = None
        if store is None:
            store = _stores[key] = Store(key)
        return store


def flush_all() -> None:
    """Make every open store's accepted writes durable (a worker process, before it reports)."""
    with _stores_lock:
        stores = list(_stores.values())
    for store in stores:
        try:
            store.flush()
        except Exception:
            log.exception("capsule_nb: flushing the store at %s failed", store.path)

