"""The store's folder and its key: who may read and write them, checked at every open.

Whoever can write the folder can write a key of their own, sign a pickle
with it and have it run at the next ``result()``; whoever can read the key
can forge payloads. So a store is used only when it is private to the
user who opens it:

* the folder belongs to the user and nobody else may write it. One that
  others may only *read* (a ``mkdir`` under umask 022) is made private
  (0700) with a warning: nobody else could have changed it, so it is safe
  to keep, once nothing inside it is writable by others or theirs (they
  could enter it: everything under it is looked at, once). One that others
  may write is refused: it may already hold their key or their rows;
* ``db/`` and the database files are the user's, nobody else may write them,
  and none is a symbolic link (SQLite would follow it, and keep its journal
  beside the target), checked at every open (a few stats), even in a private folder;
* ``secret.key`` is a regular file (not a symlink, not even one into the
  folder), belongs to the user, and has no group or other bits at all.

Every refusal is a ``StoreError`` that names the path and says how to fix it.
"""

from __future__ import annotations

import logging
import os
import stat
from shlex import quote
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import StoreError

log = logging.getLogger("capsule_nb")

KEY_BYTES = 32
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_OTHERS_ANY = 0o077


def prepare_folder(path: Path) -> None:
    """Create the store folder (0700) or check an existing one; errors name the path."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"capsule_nb store path {path} exists and is not a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the capsule_nb store at {path}: {exc.strerror}") from exc
    _check_folder(path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"capsule_nb store path {path} is not writable")
    check_database_kept(path)


def check_database_kept(path: Path) -> None:
    """Refuse a store whose database is gone or empty while the value files its rows named
    are still there (a copy or a restore cut short, a full disk): opened, it would start an
    empty store over them, and doctor would see nothing wrong."""
    db = path / "db" / "cache.db"
    try:
        if db.stat().st_size > 0:
            return
    except (FileNotFoundError, NotADirectoryError):  # (a path through a file: no store there either)
        pass
    left = sum(1 for _, _, files in os.walk(path / "db") for name in files if name.endswith(".val"))
    if left:
        raise StoreError(
            f"the capsule_nb store at {path} has lost its database: {db} is {'empty' if db.exists() else 'missing'}, "
            f"but {left} value file(s) of its runs and documents remain in {path / 'db'}. Restore db/cache.db "
            f"(and its -wal file) from a backup; or, to start afresh, move {path} aside (its files stay there)")


def database_id(path: Path) -> tuple[int, int] | None:
    """Which file the store's database is now (device, inode); None when there is none."""
    try:
        info = os.stat(path / "db" / "cache.db")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_dev, info.st_ino


def replaced(path: Path, opened: tuple[int, int] | None) -> StoreError | None:
    """Why the store at ``path`` cannot be written by a process that opened its database as
    ``opened``: the file was deleted or replaced since (a reset, a restore from a backup).
    SQLite goes on writing the file it opened, which nobody else reads, so every change made
    from then on would be lost; None while it is the same file."""
    now = database_id(path)
    if now == opened:
        return None
    how = "removed" if now is None else "replaced by another file"
    return StoreError(f"the database of the capsule_nb store at {path} was {how} while this process had it "
                      f"open: what it writes from then on is lost. It takes no new runs (those it had accepted "
                      f"run on, unrecorded); restart this kernel (or process) to use the store as it is now")


def _check_folder(path: Path) -> None:
    info = os.stat(path)
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        raise StoreError(
            f"capsule_nb store folder {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}): "
            f"its owner could change what this process loads. Use a store folder of your own "
            f"(--home, CAPSULE_NB_HOME or App(home=...))")
    if mode & _OTHERS_WRITE:
        raise StoreError(
            f"capsule_nb store folder {path} is writable by other users (mode {mode:04o}): anyone who can "
            f"write it can make this process run their code, so it is not used. If you trust everything in "
            f"it, make it private with `chmod 700 {quote(str(path))}`; otherwise delete it and start a new store")
    loose = bool(mode & _OTHERS_ANY)
    for inside in (_walk(path) if loose else _database(path)):
        _check_inside(path, inside, loose)
    if loose:
        os.chmod(path, mode & ~_OTHERS_ANY)
        log.warning("capsule_nb: the store folder %s was readable by other users (mode %04o); "
                    "made it private (%04o)", path, mode, mode & ~_OTHERS_ANY)


def _database(path: Path) -> Iterator[Path]:
    """What the store trusts most, looked at on every open (a few stats): ``db/`` and the
    database files, none of them a link. Inside a private folder diskcache makes nothing else
    others could write but value folders (0777 under umask 000), which nobody else can reach."""
    for inside in ("db", "db/cache.db", "db/cache.db-wal", "db/cache.db-shm"):
        if os.path.lexists(path / inside):
            yield path / inside


def _walk(path: Path) -> Iterator[Path]:
    """Everything under a folder others could enter (once, before it is made private)."""
    for top, folders, files in os.walk(path):
        for name in (*folders, *files):
            yield Path(top) / name


def _check_inside(path: Path, inside: Path, loose: bool) -> None:
    info = os.lstat(inside)
    mode = stat.S_IMODE(info.st_mode)
    how = (f"{path} could be entered by other users (mode {stat.S_IMODE(os.stat(path).st_mode):04o}): they "
           f"could have" if loose else "they could have")
    shell = quote(str(path))  # (pasted into a shell as it is said: a path with a space stays one)
    if stat.S_ISLNK(info.st_mode) and inside.relative_to(path).parts[0] == "db":
        # SQLite follows the link, and keeps its -wal and -shm files beside the target, where
        # the folder's checks never look (w57: a link to a file another user owns was used).
        raise StoreError(f"capsule_nb store file {inside} is a symbolic link (to {os.readlink(inside)}): "
                         f"the store's database must be inside its folder, so the store is not used. To keep "
                         f"a store elsewhere, point --home, CAPSULE_NB_HOME or App(home=...) at that folder")
    if info.st_uid != os.getuid():
        raise StoreError(f"capsule_nb store file {inside} belongs to user id {info.st_uid}, not to you "
                         f"({os.getuid()}): {how} put their rows in it, so the store is not used. If you trust "
                         f"everything in the store, have it made yours (`sudo chown -R {os.getuid()} {shell}`); "
                         f"otherwise delete it and start a new store")
    if mode & _OTHERS_WRITE and not stat.S_ISLNK(info.st_mode):
        raise StoreError(f"capsule_nb store file {inside} is writable by other users (mode {mode:04o}): {how} "
                         f"written rows this process would trust, so the store is not used. If you trust "
                         f"everything in the store, make it yours alone (`chmod -R go-w {shell}` and "
                         f"`chmod 700 {shell}`); otherwise delete it and start a new store")


def load_key(folder: Path) -> bytes:
    """The store's HMAC key, made on first open. Written to a private temp file and
    linked into place, so a second process opening a new store at the same moment
    reads either no key or the whole key, never half of one."""
    key_path = folder / "secret.key"
    if not os.path.lexists(key_path):  # lexists: a dangling symlink is not "no key"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
            os.link(tmp, key_path)
            if (folder / "db" / "cache.db").is_file():  # a store that had a key: say what a new one costs
                log.warning("capsule_nb: the store at %s had no secret.key, so a new key was made; what was signed "
                            "with the old one (process runs' arguments, pickled results) now reads as 'bad "
                            "signature'. If the old key is somewhere, put it back in place of the new one.", folder)
        except FileExistsError:
            pass  # another process won; use its key
        except OSError as exc:
            raise StoreError(f"cannot write the store key at {key_path}: {exc.strerror}") from exc
        finally:
            os.unlink(tmp)
    _check_key(key_path)
    try:
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StoreError(f"cannot read the store key {key_path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        key = fh.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise StoreError(f"store key {key_path} is damaged (expected {KEY_BYTES} bytes, found {len(key)})")
    return key


def _check_key(key_path: Path) -> None:
    info = os.lstat(key_path)
    mode = stat.S_IMODE(info.st_mode)
    renew = (f"Remove it (`rm {quote(str(key_path))}`) and a new key is made at the next open; results kept as "
             f"signed payloads (not JSON) then cannot be read back")
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(key_path)
        where = "" if os.path.exists(key_path) else ", which does not exist"
        raise StoreError(
            f"capsule_nb store key {key_path} is a symbolic link (to {target}{where}); the key must be a "
            f"regular file inside the store, so a link is refused. Put the real key file in its place "
            f"(mode 0600), or: {renew}")
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"capsule_nb store key {key_path} is not a regular file. {renew}")
    if info.st_uid != os.getuid():
        raise StoreError(
            f"capsule_nb store key {key_path} belongs to user id {info.st_uid}, not to you ({os.getuid()}), "
            f"so it may be someone else's key. {renew}")
    if mode & _OTHERS_WRITE:
        raise StoreError(
            f"capsule_nb store key {key_path} is writable by other users (mode {mode:04o}), so it may have "
            f"been replaced. {renew}")
    if mode & _OTHERS_ANY:
        raise StoreError(
            f"capsule_nb store key {key_path} is readable by other users (mode {mode:04o}): anyone who read "
            f"it can forge payloads this process would unpickle. If nobody else could have read it, "
            f"`chmod 600 {quote(str(key_path))}`; otherwise: {renew}")
