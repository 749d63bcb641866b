"""The run record: the one shape every module agrees on (pure, no I/O).

A record is a JSON-able dict typed by ``RunRecord``: JSON is what the store
keeps, and a dict is what a widget, a CLI ``--json`` and ``h.snapshot()``
hand on. Records are immutable snapshots: a change makes a new dict
(``evolve``), so a snapshot can be handed to another thread, a widget or
the store's writer without copying. ``evolve`` refuses a field that
``RunRecord`` does not name, so ``evolve(r, stauts=...)`` is an error, not
a silent new key.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, TypedDict

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


class RunRecord(TypedDict, total=False):
    """One run, as the store keeps it. Times are Unix seconds (UTC)."""

    task_id: str  # time-ordered (``new_task_id``): sorting ids sorts runs by creation
    app: str
    task_name: str
    display_name: str | None
    status: str
    args: list[Any]  # JSON, or the repr of a value JSON cannot keep
    kwargs: dict[str, Any]
    params: dict[str, Any]  # the call's arguments by parameter name, defaults included
    args_payload: bool  # True: the exact arguments are a signed payload; False: they could not be kept
    created_at: float
    scheduled_for: float | None  # when a waiting run is due
    started_at: float | None
    completed_at: float | None
    updated_at: float
    deadline: float  # a running run's timeout
    attempt: int
    max_attempts: int
    error: str | None
    traceback: str | None
    result: Any  # inline JSON results (``result_kind == "json"``)
    result_repr: str | None
    result_kind: str | None  # "json", "payload" (signed pickle) or "repr" (not kept)
    result_note: str  # why a result was not kept
    result_bytes: int
    owner: str  # the process working on it (``owners.owner_id``)
    session_id: str | None
    lock_key: str | None
    queued: bool  # waiting for its lock key (``on_lock="queue"``)
    every: float | None  # a repeating run's interval
    series: str | None  # the first run of a repeating series
    schedule: str  # the cron of a schedule's tick
    messages: list[dict[str, Any]]
    output: list[dict[str, Any]]
    progress: dict[str, Any] | None
    process: bool


FIELDS = frozenset(RunRecord.__annotations__)


def new_record(**fields: Any) -> RunRecord:
    """A record with every field present (``None`` or empty where not given)."""
    unknown = fields.keys() - FIELDS
    if unknown:
        raise TypeError(f"unknown run record fields: {sorted(unknown)}")
    record: dict[str, Any] = dict.fromkeys(_NULLABLE)
    record.update(attempt=0, messages=[], output=[], args=[], kwargs={}, params={})
    record.update(fields)
    return record  # type: ignore[return-value]


_NULLABLE = ("display_name", "scheduled_for", "started_at", "completed_at", "error", "traceback", "result",
             "result_repr", "result_kind", "session_id", "lock_key", "every", "series", "progress")


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


def evolve(record: RunRecord, **changes: Any) -> RunRecord:
    """A new snapshot with ``changes``; refuses an unknown field and an illegal status move."""
    unknown = changes.keys() - FIELDS
    if unknown:
        raise TypeError(f"run {record.get('task_id')}: unknown record fields {sorted(unknown)}")
    status = changes.get("status")
    if status is not None and (status != record["status"] or status in FINISHED):
        if status not in TRANSITIONS[record["status"]]:
            raise ValueError(f"run {record['task_id']}: {record['status']} -> {status} is not allowed")
    new = dict(record)
    new.update(changes)
    new["updated_at"] = time.time()
    return new  # type: ignore[return-value]


_SCALARS = (str, int, float, bool, type(None))


def json_safe(value: Any) -> tuple[Any, bool]:
    """``(a copy of value, True)`` when it survives JSON unchanged, else ``(repr, False)``."""
    if type(value) in _SCALARS and not (type(value) is float and value != value):  # NaN is not JSON
        return value, True
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return short_repr(value), False
    copy = json.loads(text)  # a copy: later changes to the caller's object do not leak in
    return (copy, True) if copy == value else (short_repr(value), False)


def short_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the run record
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def append_message(record: RunRecord, kind: str, text: str, **extra: Any) -> list[dict[str, Any]]:
    """The record's message list with one more entry (oldest dropped past the cap)."""
    messages = list(record.get("messages") or ())
    messages.append({"kind": kind, "text": text, "at": time.time(), **extra})
    return messages[-MAX_MESSAGES:]
