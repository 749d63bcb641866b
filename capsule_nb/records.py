"""The run record: the one shape every module agrees on (pure, no I/O).

A record is a plain JSON-able dict. Records are treated as immutable
snapshots: a change makes a new dict (``evolve``), so a snapshot can be
handed to another thread, a widget or the store's writer without copying.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

PENDING = "pending"
CLAIMED = "claimed"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
RETRY = "retry"
CANCELLED = "cancelled"
SCHEDULED = "scheduled"
TIMEOUT = "timeout"

STATUSES = frozenset({PENDING, CLAIMED, RUNNING, COMPLETED, FAILED, RETRY, CANCELLED, SCHEDULED, TIMEOUT})
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})
WAITING = frozenset({PENDING, SCHEDULED, RETRY})

# Which status may follow which. A finished run never changes status again;
# that is what lets a waiter trust the first finished status it sees.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({CLAIMED, RUNNING, CANCELLED, FAILED}),
    SCHEDULED: frozenset({PENDING, CLAIMED, RUNNING, CANCELLED, FAILED}),
    RETRY: frozenset({PENDING, CLAIMED, RUNNING, CANCELLED, FAILED}),
    CLAIMED: frozenset({RUNNING, PENDING, CANCELLED, FAILED}),
    RUNNING: frozenset({COMPLETED, FAILED, RETRY, CANCELLED, TIMEOUT}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    TIMEOUT: frozenset(),
}

MAX_MESSAGES = 1000
MAX_OUTPUT_CHARS = 200_000


def check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {sorted(STATUSES)}")


def new_task_id() -> str:
    """Time-ordered id: sorting ids sorts runs by creation, across processes.

    40 random bits after the microsecond clock; ``random`` (reseeded after a
    fork) rather than ``secrets`` because this is on the submit path and an id
    needs to be unique, not unguessable.
    """
    return f"{time.time_ns() // 1000:014x}{random.getrandbits(40):010x}"


def evolve(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A new snapshot with ``changes``; refuses an illegal status move."""
    status = changes.get("status")
    if status is not None and (status != record["status"] or status in FINISHED):
        if status not in TRANSITIONS[record["status"]]:
            raise ValueError(f"run {record['task_id']}: {record['status']} -> {status} is not allowed")
    new = dict(record)
    new.update(changes)
    new["updated_at"] = time.time()
    return new


_SCALARS = (str, int, float, bool, type(None))


def json_safe(value: Any) -> tuple[Any, bool]:
    """``(a copy of value, True)`` when it survives JSON unchanged, else ``(repr, False)``."""
    if type(value) in _SCALARS and not (type(value) is float and value != value):  # NaN is not JSON
        return value, True
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return _short_repr(value), False
    copy = json.loads(text)  # a copy: later changes to the caller's object do not leak in
    return (copy, True) if copy == value else (_short_repr(value), False)


def _short_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the run record
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def append_message(record: dict[str, Any], kind: str, text: str, **extra: Any) -> list[dict[str, Any]]:
    """The record's message list with one more entry (oldest dropped past the cap)."""
    messages = list(record.get("messages") or ())
    messages.append({"kind": kind, "text": text, "at": time.time(), **extra})
    return messages[-MAX_MESSAGES:]
