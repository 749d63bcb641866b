"""Who owns a run or a lock: a process named by host, pid and start time.

The start time makes a reused pid a different owner, so a lock held by a
process that died is never mistaken for one held by its successor.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any


def process_owner(pid: int) -> str:
    """Another process of this host as an owner: the worker a process run's body runs in."""
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


_identity = functools.lru_cache(maxsize=None)(process_owner)


def owner_id() -> str:
    """This process as an owner (recomputed after a fork)."""
    return _identity(os.getpid())


def owner_alive(owner: str) -> bool:
    """Whether ``owner`` still runs. An owner on another host counts as alive:
    only its lease (checked by the caller) can tell."""
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return start == _start_time(pid)
    return _start_time(pid) == start


def _start_time(pid: int) -> str:
    """Process start in clock ticks since boot (Linux); '' when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return "" if fields[0] in (b"Z", b"X") else fields[19].decode()  # a zombie is dead
    except (OSError, IndexError):
        if not os.path.isdir("/proc"):  # not Linux: the pid existing is all we can know
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return ""
            except PermissionError:
                pass
            return "?"
        return ""


def worker_alive(lock: dict[str, Any]) -> bool:
    """Whether the worker process running a lock holder's body lives: while it does, the key
    is held even if its owner died (whatever the run's record says by now: another kernel
    may have settled it)."""
    worker = lock.get("worker")
    return type(worker) is str and owner_alive(worker)
