"""What the store's rows hold on disk, and the rules that keep them safe to read.

diskcache's default disk pickles keys and values, so anyone who can write
the folder could run code in the kernel (CVE-2025-69872). ``JSONDisk``
speaks JSON only. It refuses a pickled row, a row that is not readable
JSON, and a row whose value file is not one diskcache made inside the
folder (such a file is neither read nor, when the row goes, deleted).
Values that are not JSON (a DataFrame result) travel as *signed payloads*:
cloudpickle bytes behind an HMAC-SHA256 of them, made with the store's key
(``folder.py``) and checked before anything is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import pickle
import re
import sqlite3
from shlex import quote
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import diskcache
import orjson
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT

from ..errors import StoreError

_ORJSON = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
_json_dumps = json.JSONEncoder(separators=(",", ":")).encode


def dumps(value: Any) -> str:
    """JSON text as stored. orjson writes it (a run record in 1.5 µs, where the standard
    library takes 15: the writer thread encodes every record and holds the GIL meanwhile);
    what orjson refuses (an int beyond 64 bits, a lone surrogate, a key that is not text,
    a subclass, a datetime or a dataclass) goes to the standard library, which stores it
    as it always did or refuses it with the same error. Callers keep NaN out: orjson writes null."""
    try:
        return orjson.dumps(value, option=_ORJSON).decode()
    except TypeError:
        return _json_dumps(value)


_orjson_dumps = functools.partial(orjson.dumps, option=_ORJSON)


def dumps_each(values: Sequence[Any]) -> list[str]:
    """``[dumps(v) for v in values]`` without a Python step per value where orjson takes them all
    (the writer's batches: Python work in the writer is time-sliced with the event loop)."""
    try:
        return list(map(bytes.decode, map(_orjson_dumps, values)))
    except TypeError:
        return list(map(dumps, values))


_loads = json.loads
T = TypeVar("T")

SIGNATURE_BYTES = 32  # HMAC-SHA256 in front of every payload
BATCH = 500  # values in one ``IN (...)`` (SQLite allows far more; a statement stays small)
REFUSED = "\x00refused"  # what a pickled key reads as: matches no prefix of ours
# diskcache keeps a big value in a file it names "ab/cd/<28 hex>.val" under its folder. The
# name is a column of the row, so a row written behind our back could name any file.
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val".replace("/", re.escape(os.sep)))

log = logging.getLogger("capsule_nb")


class NotUTF8(bytes):
    """Text SQLite holds that is not UTF-8 (a flipped bit, another program's bytes), as
    read: the row it is in is a bad row, where sqlite3 would fail the whole query."""


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return NotUTF8(data)  # type: ignore[return-value]


def lenient(connection: sqlite3.Connection) -> sqlite3.Connection:
    """``connection``, reading text that is not UTF-8 as ``NotUTF8`` instead of failing."""
    if connection.text_factory is not _text:
        connection.text_factory = _text
    return connection


# How the store runs, fixed here rather than read from the database. diskcache keeps its
# settings as rows of the database's Settings table: it runs each ``sqlite_`` row as a PRAGMA
# on every new connection and sets each other row as an attribute. A row another program, an
# older diskcache or a person wrote would rule them: ``journal_mode = delete`` locks every
# thread but the opener's out of a store others hold in WAL mode, ``synchronous = 0`` loses
# commits, a ``disk_store`` row replaces a method.
_SETTINGS: dict[str, Any] = {
    **diskcache.DEFAULT_SETTINGS,
    "eviction_policy": "none",
    "cull_limit": 0,  # nothing here expires or is evicted: skip diskcache's cull query on every set
    "size_limit": 2**62,
    "statistics": 0,
    "tag_index": 0,
    "sqlite_journal_size_limit": 4 * 2**20,  # after a checkpoint, a write-ahead log bigger than this shrinks
    # diskcache's defaults (a 32 MiB page cache and a 64 MiB map, for each connection: one per
    # thread) grew a kernel by 70 MB over 100k runs. SQLite's own size of cache does as well
    # here: most reads are a few rows by index, and another kernel's write empties it anyway.
    "sqlite_cache_size": 512,  # pages: 2 MiB at the usual 4 KiB a page
    "sqlite_mmap_size": 0,
    # SQLite copies the write-ahead log into the database at each commit that finds it past
    # 1,000 pages: a seventh of a burst's writing, the same pages again and again. The store's
    # writer does it once a burst is written (``checkpoint``), and commits only from 32 MiB on.
    # (A reader in the middle of a long read holds the log back either way: under 600,000 runs
    # with another kernel polling, it reached 106 MiB, then went back to a few.)
    "sqlite_wal_autocheckpoint": 8192,
}


class _Cache(diskcache.Cache):
    """diskcache's Cache: its per-thread connections ``lenient``, its settings ``_SETTINGS``."""

    @property
    def _con(self) -> sqlite3.Connection:
        return lenient(super()._con)

    def reset(self, key: str, value: Any = diskcache.core.ENOVAL, update: bool = True) -> Any:
        if key in diskcache.core.METADATA:  # (its counts: read and kept by diskcache's triggers)
            return super().reset(key, value, update)
        if key not in _SETTINGS:
            return None  # a row capsule_nb never wrote is never run
        return super().reset(key, _SETTINGS[key], update)


class JSONDisk(diskcache.Disk):
    """Keys are plain strings, values JSON text or signed payload bytes. Never pickle."""

    def __init__(self, directory: str, **_from_the_table: Any):
        """diskcache hands over every ``disk_`` row of the Settings table: see ``_SETTINGS``."""
        super().__init__(directory, _SETTINGS["disk_min_file_size"], _SETTINGS["disk_pickle_protocol"])

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        # A pickled key was not written by capsule_nb; never unpickle it. Iteration skips it.
        return key if raw and type(key) is str else REFUSED

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple:
        if type(value) not in (bytes, int):  # ints stay raw so diskcache's incr works
            value = dumps(value)
        return super().store(value, read, key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise StoreError("store row holding a pickle refused (not written by capsule_nb)")
        if filename is not None or mode in (MODE_BINARY, MODE_TEXT):
            if not self.inside(filename):
                raise StoreError(f"store row naming the value file {filename!r}, outside the store, refused")
        if type(value) is NotUTF8:
            raise StoreError("store row is not UTF-8 text")
        try:
            data = super().fetch(mode, filename, value, read)
        except OSError as exc:
            raise StoreError(f"value file {filename} of a store row cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise StoreError(f"value file {filename} of a store row is not UTF-8 text ({exc})") from None
        if mode == MODE_TEXT or (mode == MODE_RAW and type(data) is str):
            try:
                return _loads(data)
            except (ValueError, RecursionError) as exc:  # broken text, or nesting too deep to read
                raise StoreError(f"store row is not readable JSON ({type(exc).__name__}: {exc})") from None
        return data  # signed payload bytes, or a raw int (the feed counter)

    def remove(self, file_path: Any) -> None:
        """diskcache removes a row's value file (and its empty parent folders) when the row goes;
        only ever one of its own, inside the store."""
        if self.inside(file_path):
            super().remove(file_path)
        else:
            log.warning("capsule_nb: a store row named the value file %r, outside %s; left it alone",
                        file_path, self._directory)

    def inside(self, filename: Any) -> bool:
        """Whether ``filename`` is a value file diskcache could have made in this folder:
        its own shape (``ab/cd/<28 hex>.val``, so no absolute path and no ``..``), and no
        symlink on the way out of the folder."""
        if type(filename) is not str or not _VALUE_FILE.fullmatch(filename):
            return False
        real = os.path.realpath(self._directory)
        return os.path.realpath(os.path.join(real, filename)).startswith(real + os.sep)


class Signer:
    """Signs pickled bytes with the store's key, bound to the row they are written to, and
    refuses bytes it did not sign for that row: one run's result moved onto another's row
    (or its arguments, which a process run of another kernel would be called with) is refused
    as any forged payload is. Payloads written before the row was bound in (by earlier versions)
    still read: their signature covers the bytes alone."""

    def __init__(self, key: bytes, where: Path):
        self._key = key
        self._where = where

    def sign(self, name: str, blob: bytes) -> bytes:
        return self._bound(name, blob) + blob

    def signed_by_us(self, name: str, signed: bytes) -> bool:
        sig, blob = signed[:SIGNATURE_BYTES], signed[SIGNATURE_BYTES:]
        return (hmac.compare_digest(sig, self._bound(name, blob))
                or hmac.compare_digest(sig, hmac.new(self._key, blob, hashlib.sha256).digest()))  # (before binding)

    def _bound(self, name: str, blob: bytes) -> bytes:
        # A pickle starts with b"\x80", never with this prefix: no unbound signature is a bound one.
        return hmac.new(self._key, b"capsule_nb payload\0" + name.encode() + b"\0" + blob, hashlib.sha256).digest()

    def load(self, name: str, signed: Any) -> Any:
        """Unpickle ``signed`` if, and only if, its signature is ours, for the row ``name``."""
        if type(signed) is not bytes or len(signed) < SIGNATURE_BYTES:
            raise StoreError(f"payload {name} in {self._where} is not a signed payload; refused")
        if not self.signed_by_us(name, signed):
            raise StoreError(f"payload {name} in {self._where} has a bad signature "
                             f"(not signed with this store's key, or for another row); refused")
        return pickle.loads(signed[SIGNATURE_BYTES:])


def says_which_store(method: Callable[..., T]) -> Callable[..., T]:
    """A query of a ``Store`` that meets a damaged database (a page SQLite cannot read) says
    which store, and what finds out more, instead of sqlite3's bare 'malformed'."""
    @functools.wraps(method)
    def query(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read the capsule_nb store at {self.path}: {exc} "
                             f"(`capsule-nb doctor --home {quote(str(self.path))}` checks it)") from exc
    return query


def marks(n: int) -> str:
    """``?, ?, ?``: the parameters of an ``IN (...)`` of ``n`` values."""
    return ", ".join("?" * n)


def batches(items: Sequence[T]) -> Iterator[list[T]]:
    """``items`` in lists of at most ``BATCH``: one statement each."""
    for start in range(0, len(items), BATCH):
        yield list(items[start : start + BATCH])


def has_store(path: Path) -> bool:
    """Whether ``path`` holds a store already (a reader that must not create one asks)."""
    return (path / "db" / "cache.db").is_file() and (path / "secret.key").is_file()


def checkpoint(cache: diskcache.Cache) -> None:
    """Copy what the write-ahead log holds into the database, as far as no reader needs it
    (PASSIVE: it waits for nobody); the writer's thread calls it when its queue is empty."""
    cache._sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def open_cache(path: Path) -> diskcache.Cache:
    try:
        return _Cache(str(path / "db"), disk=JSONDisk, timeout=60, **_SETTINGS)
    except Exception as exc:
        hint = ""
        if isinstance(exc, sqlite3.OperationalError) and "disk I/O error" in str(exc):
            hint = (" (if its db/cache.db-wal or -shm file was removed or replaced while processes had the store "
                    "open, close those kernels and open it again; else `capsule-nb doctor` checks the database)")
        raise StoreError(f"cannot open the capsule_nb store at {path}: {exc}{hint}") from exc
