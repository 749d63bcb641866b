"""The change feed: how one process learns what others wrote to the store.

Every transaction that changes shared rows appends the keys it changed
under ``chg/<seq>`` (``seq`` is a counter row). A reader remembers the last
``seq`` it folded in; ``changes()`` reads the entries after it (one ``get``
when nothing changed). A reader that fell behind the kept window is told to
reload everything. Entries this process wrote itself are skipped: its
mirror already has them.
"""

from __future__ import annotations

import threading

import diskcache

RUN = "run/"
PAYLOAD = "payload/"
LOCK = "lock/"
DOC = "doc/"
CANCEL = "cancel/"
_ENTRY = "chg/"
KEEP = 20_000  # entries kept; a reader further behind reloads everything


def doc_key(collection: str, doc_id: str) -> str:
    return f"{DOC}{collection}/{doc_id}"


def split_doc_key(key: str) -> tuple[str, str]:
    collection, _, doc_id = key[len(DOC) :].rpartition("/")
    return collection, doc_id


class Feed:
    """This process's end of the feed: what it announced and how far it has read."""

    def __init__(self, cache: diskcache.Cache):
        self._cache = cache
        self._lock = threading.Lock()
        self._own: set[int] = set()
        self.seen = 0

    def announce(self, keys: list[str]) -> None:
        """Append ``keys`` to the feed; call inside a transaction."""
        if not keys:
            return
        cache = self._cache
        seq = cache.incr("seq")
        cache.set(f"{_ENTRY}{seq:012d}", keys)
        if seq > KEEP and seq % 1000 == 0:
            for old in range(seq - KEEP - 1000, seq - KEEP):
                cache.delete(f"{_ENTRY}{old:012d}")
        with self._lock:
            self._own.add(seq)

    def head(self) -> int:
        return self._cache.get("seq", 0)

    def changes(self) -> tuple[int, list[str] | None]:
        """``(seq, keys other processes changed since the last read)``; keys is None when
        this reader fell behind the kept window (reload everything). Call under the
        store's poll lock, then ``mark(seq)`` once the keys are folded in."""
        seq = self.head()
        keys: dict[str, None] = {}
        for n in range(self.seen + 1, seq + 1):
            with self._lock:
                if n in self._own:
                    self._own.discard(n)
                    continue
            changed = self._cache.get(f"{_ENTRY}{n:012d}")
            if changed is None:
                return seq, None
            keys.update(dict.fromkeys(changed))
        return seq, list(keys)

    def mark(self, seq: int) -> None:
        self.seen = max(self.seen, seq)
