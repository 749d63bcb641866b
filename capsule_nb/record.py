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

import datetime as dt

import itertools
import json
import math
import random
import time
from typing import Any, TypedDict

import orjson

from .awaitables import unwrapped
from .durations import MIN_INTERVAL

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
MAX_MESSAGE_CHARS = 64_000  # one message's text (and each text beside it, such as a notify's detail)
MAX_MESSAGES_CHARS = 1_000_000  # all of a run's messages together
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
    stopping: str  # a running run asked to stop ("cancel" or "timeout") that has not stopped yet
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
    messages_dropped: int  # the oldest messages dropped past MAX_MESSAGES or MAX_MESSAGES_CHARS
    output: list[dict[str, Any]]
    progress: dict[str, Any] | None
    process: bool


FIELDS = frozenset(RunRecord.__annotations__)


def new_record(**fields: Any) -> RunRecord:
    """A record with every field present (``None`` or empty where not given)."""
    if not FIELDS.issuperset(fields):
        raise TypeError(f"unknown run record fields: {sorted(fields.keys() - FIELDS)}")
    return {**_NULLS, "messages": [], "output": [], "args": [], "kwargs": {}, "params": {},  # type: ignore[return-value]
            **fields}


_NULLS = {**dict.fromkeys(("display_name", "scheduled_for", "started_at", "completed_at", "error", "traceback",
                           "result", "result_repr", "result_kind", "session_id", "lock_key", "every", "series",
                           "progress")), "attempt": 0}


def submitted_record(task_id: str, app: str, task_name: str, display_name: str | None, status: str, args: list,
                     kwargs: dict, params: dict, now: float, scheduled_for: float | None, max_attempts: int,
                     owner: str, session_id: str | None, lock_key: str | None, every: float | None,
                     series: str | None, process: bool) -> RunRecord:
    """``new_record`` of a submit's fields, made as one dict: on the submit path, where the
    keywords, the check and the merge of ``new_record`` made three (its twin in the tests).
    A copy of a whole record then filled in place: a dict literal of 30 keys grows its table
    four times, a copy makes it at its size."""
    record = _SUBMITTED.copy()
    record["task_id"] = task_id
    record["app"] = app
    record["task_name"] = task_name
    record["display_name"] = display_name
    record["status"] = status
    record["args"] = args
    record["kwargs"] = kwargs
    record["params"] = params
    record["created_at"] = record["updated_at"] = now
    record["scheduled_for"] = scheduled_for
    record["max_attempts"] = max_attempts
    record["owner"] = owner
    record["session_id"] = session_id
    record["lock_key"] = lock_key
    record["every"] = every
    record["series"] = series
    record["messages"] = []
    record["output"] = []
    record["process"] = process
    return record  # type: ignore[return-value]


# Every field of a submitted record, in the order new_record gives them (JSON keeps it).
_SUBMITTED = {**new_record(task_id="", app="", task_name="", status="", created_at=0.0, updated_at=0.0, max_attempts=1,
                           owner="", process=False)}


# What a record read from disk must look like before any module may use it: the fields
# every record has, then the types of the others (null allowed). ``validate`` checks it.
_REQUIRED = {"task_id": "text", "app": "text", "task_name": "text", "status": "text",
             "attempt": "int", "max_attempts": "int", "created_at": "number"}
_OPTIONAL = {"display_name": "text", "args": "list", "kwargs": "dict", "params": "dict", "args_payload": "bool",
             "scheduled_for": "number", "started_at": "number", "completed_at": "number", "updated_at": "number",
             "deadline": "number", "stopping": "text", "error": "text", "traceback": "text", "result_repr": "text",
             "result_kind": "text", "result_note": "text", "result_bytes": "int", "owner": "text",
             "session_id": "text", "lock_key": "text", "queued": "bool", "every": "number", "series": "text",
             "schedule": "text", "messages": "list", "messages_dropped": "int", "output": "list",
             "progress": "dict", "process": "bool"}
_KINDS = {"text": {str}, "int": {int}, "number": {int, float}, "bool": {bool}, "list": {list}, "dict": {dict}}


def validate(record: Any, task_id: str | None = None) -> str | None:
    """What is wrong with ``record`` (read from disk) as a run record, or None when nothing is.

    The store keeps a row only when this says nothing, so every other module
    can index a record's fields without guarding each one: a row that a bug,
    a crash or a person left malformed is set aside, never a crash.
    """
    if type(record) is not dict:
        return f"a run record is a JSON object, not {type(record).__name__}"
    for field, kind in _REQUIRED.items():
        if field not in record:
            return f"it has no {field!r} field"
        if field == "status" and (type(record[field]) is not str or record[field] not in STATUSES):
            return f"status {short_repr(record[field], 60)} is not a known status"
        if type(record[field]) not in _KINDS[kind]:
            return f"{field} is {short_repr(record[field], 60)}, not {kind}"
    if task_id is not None and record["task_id"] != task_id:
        return f"its task_id {record['task_id']!r} is not the one in its key ({task_id!r})"
    for field, kind in _OPTIONAL.items():
        value = record.get(field)
        if value is not None and type(value) not in _KINDS[kind]:
            return f"{field} is {short_repr(value, 60)}, not {kind} or null"
    for field, name in (("messages", "kind"), ("output", "stream")):
        for item in record.get(field) or ():
            if type(item) is not dict or type(item.get(name)) is not str or type(item.get("text")) is not str:
                return f"{field} holds {short_repr(item, 60)}, not {{{name}: text, text: text}}"
    every = record.get("every")
    if every is not None and not every >= MIN_INTERVAL:  # (NaN too) a repeat is never a busy loop
        return f"every is {short_repr(every, 60)}, not a number of seconds of at least {MIN_INTERVAL:g}"
    progress = record.get("progress")
    number = _KINDS["number"]
    if progress is not None and not (type(progress.get("done")) in number
                                     and (progress.get("total") is None or type(progress["total"]) in number)):
        return f"progress is {short_repr(progress, 60)}, not {{done: number, total: number or null}}"
    return None


def check_status(status: str | None) -> None:
    if status is not None and (type(status) is not str or status not in STATUSES):
        raise ValueError(f"unknown status {status!r}; expected one of {sorted(STATUSES)}")


def new_task_id() -> str:
    """Time-ordered id: sorting ids sorts runs by creation, across processes.

    40 random bits after the microsecond clock; ``random`` (reseeded after a
    fork) rather than ``secrets`` because this is on the submit path and an id
    needs to be unique, not unguessable.
    """
    return ((time.time_ns() // 1000 << 40) | random.getrandbits(40)).to_bytes(12, "big").hex()  # (an f-string: 2x)


def evolve(record: RunRecord, **changes: Any) -> RunRecord:
    """A new snapshot with ``changes``; refuses an unknown field and an illegal status move."""
    if not FIELDS.issuperset(changes):
        raise TypeError(f"run {record.get('task_id')}: unknown record fields {sorted(changes.keys() - FIELDS)}")
    status = changes.get("status")
    if status is not None and (status != record["status"] or status in FINISHED):
        if status not in TRANSITIONS[record["status"]]:
            raise ValueError(f"run {record['task_id']}: {record['status']} -> {status} is not allowed")
    return {**record, **changes, "updated_at": time.time()}  # type: ignore[typeddict-item]


_SCALARS = (str, int, float, bool, type(None))


def json_safe(value: Any) -> tuple[Any, bool]:
    """``(a copy of value, True)`` when it survives JSON unchanged, else ``(repr, False)``.

    NaN and the infinities are no JSON: the store's encoder (orjson) would write them as
    null, so they go where a value that is no JSON goes (a payload, a repr)."""
    if type(value) in _SCALARS and not (type(value) is float and not math.isfinite(value)):
        return value, True
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        try:  # a stand-in for None or a bool given on (``find_one()`` of nothing) is the plain one
            plain = unwrapped(value)
        except RecursionError:
            plain = value
        return json_safe(plain) if plain is not value else (short_repr(value), False)
    copy = json.loads(text)  # a copy: later changes to the caller's object do not leak in
    return (copy, True) if copy == value else (short_repr(value), False)


def storable(values: dict) -> tuple[dict, bool]:
    """Each value as JSON where it can be, else its repr; and whether all were JSON."""
    if not values:  # most calls: no arguments, or no keywords
        return {}, True
    stored, exact = {}, True
    for key, value in values.items():
        stored[key], ok = json_safe(value)
        exact = exact and ok
    return stored, exact


def short_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the run record
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def iso_utc(at: Any) -> str:
    """A Unix time (a record's ``scheduled_for``, a schedule's last tick) as ISO text in UTC;
    ``?`` and its repr when it is none (a row written behind our back)."""
    try:
        return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?" + short_repr(at, 40)


def add_message(record: RunRecord, kind: str, text: str, **extra: Any) -> dict[str, Any]:
    """The changes (``messages``, ``messages_dropped``) that add one message within the caps.

    A message is a reply a task sends as it goes: it must not grow a record
    (kept in memory by every process, rewritten at each change) without
    bound. A text over ``MAX_MESSAGE_CHARS`` is cut and the message marked
    ``truncated``; past ``MAX_MESSAGES`` messages or ``MAX_MESSAGES_CHARS``
    characters in all, replaced notifications and then the oldest go, counted in
    ``messages_dropped``.
    """
    entry = {"kind": kind, "text": text, "at": time.time(), **extra}
    for name, value in list(entry.items()):
        if type(value) is str and len(value) > MAX_MESSAGE_CHARS:
            entry[name] = capped_text(value)
            entry["truncated"] = True
    return _within_caps(record, [*(record.get("messages") or ()), entry])


def grow_message(record: RunRecord, message_id: str, text: str) -> dict[str, Any]:
    """The changes that append ``text`` to the message ``message_id`` (a streamed reply),
    within the same caps: a message that reached its cap takes no more text."""
    messages = []
    for m in record.get("messages") or ():
        if m.get("id") == message_id and not m.get("truncated"):
            grown = m["text"] + text
            cut = len(grown) > MAX_MESSAGE_CHARS
            m = dict(m, text=capped_text(grown), truncated=True) if cut else dict(m, text=grown)
        messages.append(m)
    return _within_caps(record, messages)


def _sizes(messages: list[dict[str, Any]]) -> list[int] | None:
    """The characters of each message's texts, or None when all of them together are within
    ``MAX_MESSAGES_CHARS``: the messages' JSON text holds every one of those characters, and
    orjson writes it in microseconds, where counting them took milliseconds at each message
    once a run held a thousand (a loop of 30,000 notifications took 28 s)."""
    try:
        if len(orjson.dumps(messages)) <= MAX_MESSAGES_CHARS:
            return None
    except TypeError:  # what orjson refuses (a lone surrogate): count them
        pass
    return [sum(len(v) for v in m.values() if type(v) is str) for m in messages]


def capped_text(text: str) -> str:
    """``text``, or its first ``MAX_MESSAGE_CHARS`` characters and a note of how much was cut."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}… [cut: {len(text) - MAX_MESSAGE_CHARS:,} more characters]"


def _within_caps(record: RunRecord, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Past the caps, notifications a newer one has replaced go first (a notification is a status
    that the next replaces in place: a loop of them must not push the run's replies out), then
    the oldest messages; the newest always stays. ``messages`` is a new list, changed in place."""
    sizes = _sizes(messages)
    count, total = len(messages), 0 if sizes is None else sum(sizes)
    dropped: set[int] = set()
    if count > MAX_MESSAGES or total > MAX_MESSAGES_CHARS:
        newest = next((i for i in reversed(range(count)) if messages[i].get("kind") == "notify"), 0)
        replaced = (i for i in range(newest) if messages[i].get("kind") == "notify")
        for i in itertools.chain(replaced, range(count - 1)):
            if count <= MAX_MESSAGES and total <= MAX_MESSAGES_CHARS:
                break
            if i not in dropped:
                dropped.add(i)
                count, total = count - 1, total - (0 if sizes is None else sizes[i])
    for i in sorted(dropped, reverse=True):
        del messages[i]
    return {"messages": messages, "messages_dropped": (record.get("messages_dropped") or 0) + len(dropped)}
