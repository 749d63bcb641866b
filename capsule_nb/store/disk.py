"""What the store's folder holds on disk, and the rules that keep it safe to read.

diskcache's default disk pickles keys and values, so anyone who can write
the folder could run code in the kernel (CVE-2025-69872). ``JSONDisk``
speaks JSON only and refuses a pickled row. Values that are not JSON (a
DataFrame result) travel as *signed payloads*: cloudpickle bytes behind an
HMAC-SHA256 of them, made with a key that lives in the folder (mode 0600)
and checked before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT

from ..errors import StoreError

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads

SIGNATURE_BYTES = 32  # HMAC-SHA256 in front of every payload
REFUSED = "\x00refused"  # what a pickled key reads as: matches no prefix of ours


class JSONDisk(diskcache.Disk):
    """Keys are plain strings, values JSON text or signed payload bytes. Never pickle."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        # A pickled key was not written by capsule_nb; never unpickle it. Iteration skips it.
        return key if raw else REFUSED

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple:
        if type(value) not in (bytes, int):  # ints stay raw so diskcache's incr works
            value = _dumps(value)
        return super().store(value, read, key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise StoreError("store row holding a pickle refused (not written by capsule_nb)")
        data = super().fetch(mode, filename, value, read)
        if mode == MODE_TEXT or (mode == MODE_RAW and type(data) is str):
            return _loads(data)
        return data  # signed payload bytes, or a raw int (the feed counter)


def prepare_folder(path: Path) -> None:
    """Create the store folder (0700) or check an existing one; errors name the path."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"capsule_nb store path {path} exists and is not a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the capsule_nb store at {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"capsule_nb store path {path} is not writable")


def load_key(folder: Path) -> bytes:
    """The store's HMAC key, made on first open. Written to a private temp file and
    linked into place, so a second process opening a new store at the same moment
    reads either no key or the whole key, never half of one."""
    key_path = folder / "secret.key"
    if not key_path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
            os.link(tmp, key_path)
        except FileExistsError:
            pass  # another process won; use its key
        except OSError as exc:
            raise StoreError(f"cannot write the store key at {key_path}: {exc.strerror}") from exc
        finally:
            os.unlink(tmp)
    key = key_path.read_bytes()
    if len(key) != 32:
        raise StoreError(f"store key {key_path} is damaged (expected 32 bytes)")
    return key


class Signer:
    """Signs pickled bytes with the store's key, and refuses bytes it did not sign."""

    def __init__(self, key: bytes, where: Path):
        self._key = key
        self._where = where

    def sign(self, blob: bytes) -> bytes:
        return hmac.new(self._key, blob, hashlib.sha256).digest() + blob

    def load(self, name: str, signed: Any) -> Any:
        """Unpickle ``signed`` if, and only if, its signature is ours."""
        if type(signed) is not bytes or len(signed) < SIGNATURE_BYTES:
            raise StoreError(f"payload {name} in {self._where} is not a signed payload; refused")
        sig, blob = signed[:SIGNATURE_BYTES], signed[SIGNATURE_BYTES:]
        if not hmac.compare_digest(sig, hmac.new(self._key, blob, hashlib.sha256).digest()):
            raise StoreError(f"payload {name} in {self._where} has a bad signature; refused")
        return pickle.loads(blob)


def has_store(path: Path) -> bool:
    """Whether ``path`` holds a store already (a reader that must not create one asks)."""
    return (path / "db" / "cache.db").is_file() and (path / "secret.key").is_file()


def open_cache(path: Path) -> diskcache.Cache:
    try:
        return diskcache.Cache(
            str(path / "db"),
            disk=JSONDisk,
            eviction_policy="none",
            cull_limit=0,  # nothing here expires or is evicted: skip diskcache's cull query on every set
            size_limit=2**62,
            statistics=0,
            tag_index=0,
            timeout=60,
        )
    except Exception as exc:
        raise StoreError(f"cannot open the capsule_nb store at {path}: {exc}") from exc
