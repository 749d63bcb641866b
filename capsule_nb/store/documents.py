"""Collection documents: diskcache rows ``doc/<collection>/<id>``, written through.

Collections are written through, not behind: ``$inc`` from two processes at
once must add up, so each change reads the document from disk inside the
transaction that writes it. Reads go through an in-memory copy of a
collection, made on its first read in this process (one query over the key
index) and kept current from the change feed; a collection nobody reads
here costs nothing, however big it is.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import diskcache

from .feed import DOC, Feed, doc_key, split_doc_key
from .rows import Rows

Change = Callable[["dict | None"], "dict | None"]


class Documents:
    def __init__(self, cache: diskcache.Cache, rows: Rows, feed: Feed):
        self._cache = cache
        self._rows = rows
        self._feed = feed
        self._lock = threading.Lock()
        self._loaded: dict[str, dict[str, dict[str, Any]]] = {}

    def docs(self, collection: str) -> list[dict[str, Any]]:
        """The documents of ``collection`` (a snapshot): ids in key order when first read,
        then as this process inserted them."""
        with self._lock:
            loaded = self._loaded.get(collection)
            if loaded is not None:
                return list(loaded.values())
        found = {split_doc_key(key)[1]: value for key, value in self._rows.scan(doc_key(collection, ""))
                 if value is not None}
        with self._lock:
            loaded = self._loaded.setdefault(collection, found)  # another thread may have loaded it first
            return list(loaded.values())

    def write(self, collection: str, changes: dict[str, Change]) -> dict[str, dict | None]:
        """Apply ``{doc_id: change(current) -> new or None (delete)}`` in one transaction."""
        written: dict[str, dict | None] = {}
        with self._cache.transact(retry=True):
            for doc_id, change in changes.items():
                key = doc_key(collection, doc_id)
                new = change(self._rows.read(key))
                if new is None:
                    self._cache.delete(key)
                else:
                    self._cache.set(key, new)
                written[doc_id] = new
            self._feed.announce([doc_key(collection, doc_id) for doc_id in written])
        with self._lock:
            loaded = self._loaded.get(collection)
            if loaded is not None:
                for doc_id, new in written.items():
                    _apply(loaded, doc_id, new)
        return written

    def fold(self, keys: list[str]) -> None:
        """Take in what other processes changed (keys from the feed), for collections read here."""
        with self._lock:
            wanted = [key for key in keys if key.startswith(DOC) and split_doc_key(key)[0] in self._loaded]
        values = {key: self._rows.read(key) for key in wanted}
        with self._lock:
            for key, value in values.items():
                collection, doc_id = split_doc_key(key)
                if collection in self._loaded:
                    _apply(self._loaded[collection], doc_id, value)

    def forget(self) -> None:
        """Drop every copy (this process fell behind the feed): the next read loads afresh."""
        with self._lock:
            self._loaded.clear()


def _apply(mirror: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        mirror.pop(key, None)
    else:
        mirror[key] = value
