"""The change feed: how one process learns what others wrote to the store.

Every transaction that changes shared rows appends the keys it changed
under ``chg/<seq>`` (``seq`` is a counter row). A reader remembers the last
``seq`` it folded in; ``changes()`` reads the entries after it (one ``get``
when nothing changed). A reader that fell behind the kept window is told to
reload everything, and so is one that finds an entry it cannot read (the
reload moves its position past it, so a bad entry never stops the feed).
Entries this process wrote itself are skipped: its mirror already has them.
"""

from __future__ import annotations

import threading
import time

import diskcache

from ..errors import StoreError

RUN = "run/"
PAYLOAD = "payload/"
LOCK = "lock/"
DOC = "doc/"
CANCEL = "cancel/"
ENTRY = "chg/"
# The window of entries kept. A reader further behind (a suspended laptop, a stalled
# process) reloads what is live instead, which is cheap: a few indexed reads.
SEQ_LIMIT = 10**12  # the counter's range: entries are named by 12 digits, so they sort as they count
KEEP = 500  # entries at most (one per commit, each up to thousands of keys)
KEEP_SECONDS = 5.0  # and none older than this
PRUNE_EVERY = 50  # commits between two trims of the window (or KEEP_SECONDS, if sooner)


def past(prefix: str) -> str:
    """The first key after every key that starts with ``prefix``: ``key >= prefix AND
    key < past(prefix)`` is one range of diskcache's key index."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def good_seq(value: object) -> bool:
    """Whether ``value`` can be the change-feed counter: a whole number that names an entry."""
    return type(value) is int and 0 <= value < SEQ_LIMIT


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
        self._pruned = time.monotonic()  # when this process last trimmed the window
        self.seen = 0

    def announce(self, keys: list[str]) -> None:
        """Append ``keys`` to the feed; call inside a transaction."""
        if not keys:
            return
        cache = self._cache
        seq = cache.incr("seq")
        cache.set(f"{ENTRY}{seq:012d}", keys)
        now = time.monotonic()
        if seq % PRUNE_EVERY == 0 or now - self._pruned > KEEP_SECONDS:
            self._pruned = now
            for old in self._outside_window(seq):
                cache.delete(old)  # (diskcache's delete: a big entry's value file goes too)
        with self._lock:
            self._own.add(seq)

    def _outside_window(self, seq: int) -> list[str]:
        """Entries older than ``KEEP_SECONDS`` or more than ``KEEP`` behind ``seq`` (diskcache
        stamps each row's ``store_time``); the entries are few, so this reads little."""
        rows = self._cache._sql(
            "SELECT key FROM Cache WHERE raw = 1 AND key > ? AND key < ? AND (key < ? OR store_time < ?)",
            (ENTRY, past(ENTRY), f"{ENTRY}{max(0, seq - KEEP):012d}",
             time.time() - KEEP_SECONDS)).fetchall()
        return [key for (key,) in rows if type(key) is str]  # (diskcache deletes by a key of ours only)

    def head(self) -> int:
        try:
            seq = self._cache.get("seq", 0)
        except StoreError:
            seq = None
        if not good_seq(seq):
            raise StoreError(f"the store's change-feed counter (row 'seq') is damaged ({seq!r}); "
                             "`capsule-nb doctor --fix` moves it aside")
        return seq

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
            try:
                changed = self._cache.get(f"{ENTRY}{n:012d}")
            except StoreError:  # not ours (a pickle, broken JSON): reload past it
                changed = None
            if type(changed) is not list or not all(type(k) is str for k in changed):
                return seq, None  # gone from the window, or not a list of keys: reload everything
            keys.update(dict.fromkeys(changed))
        return seq, list(keys)

    def mark(self, seq: int) -> None:
        self.seen = max(self.seen, seq)
