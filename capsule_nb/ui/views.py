"""What the widgets show, as plain JSON-able data (no widgets; a board asks a ``RunSource``).

A card is a few small dicts and lists cut from a run record; a board is its
columns, each with a count and only the newest cards up to a cap. Keeping
this apart from the widgets keeps the shapes testable without a kernel, and
keeps what crosses the comm small: a board over 10,000 runs still sends at
most ``page`` cards a column.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..record import COMPLETED, FINISHED

MESSAGES_SHOWN = 200  # the newest messages a card carries
OUTPUT_SHOWN = 20_000  # characters of captured output a card carries (the tail)
NOTE_CHARS = 160  # an error or result on a board card: one line
SAID_KINDS = ("reply", "notify")  # what a run says that tells its card apart (not every log line)


def _can_cancel(record: Mapping[str, Any]) -> bool:
    return record["status"] not in FINISHED and not record.get("stopping")


def _stopping(record: Mapping[str, Any]) -> str | None:
    """"cancel" or "timeout" while a running run asked to stop has not yet (a thread run
    blocked in a call stops when the call returns)."""
    return record.get("stopping") if record["status"] not in FINISHED else None


def _can_retry(status: str) -> bool:
    return status in FINISHED and status != COMPLETED


def title(record: Mapping[str, Any], message: str | None = None) -> str:
    return message or record.get("display_name") or record["task_name"]


def run(record: Mapping[str, Any], orphaned: bool = False) -> dict[str, Any]:
    """The card's head: who, status, attempts, times, progress, error, result; ``orphaned``:
    its record says running but its process is gone (a view shows it as interrupted)."""
    status = record["status"]
    return {
        "task_id": record["task_id"],
        "task_name": record["task_name"],
        "display_name": record.get("display_name"),  # (shown under a title that show_task's message took)
        "status": status,
        "attempt": record.get("attempt", 0),
        "max_attempts": record.get("max_attempts", 1),
        "created_at": record.get("created_at"),
        "scheduled_for": record.get("scheduled_for"),
        "started_at": record.get("started_at"),
        "completed_at": record.get("completed_at"),
        "progress": record.get("progress"),
        "error": record.get("error"),
        "traceback": record.get("traceback"),
        "result_repr": record.get("result_repr") if status == COMPLETED else None,
        "result_note": record.get("result_note"),
        "session_id": record.get("session_id"),
        "every": record.get("every"),  # a repeating series: its card follows the newest run
        "stopping": _stopping(record),
        "can_cancel": _can_cancel(record),
        "can_retry": _can_retry(status),
        "orphaned": orphaned,
    }


def messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((record.get("messages") or ())[-MESSAGES_SHOWN:])


def output(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The tail of what the run printed, as ``[{stream, text}]``, at most ``OUTPUT_SHOWN`` characters."""
    chunks = list(record.get("output") or ())
    tail: list[dict[str, str]] = []
    room = OUTPUT_SHOWN
    for chunk in reversed(chunks):
        text = chunk["text"]
        if len(text) >= room:
            tail.append({"stream": chunk["stream"], "text": "…" + text[len(text) - room + 1 :]})
            break
        tail.append({"stream": chunk["stream"], "text": text})
        room -= len(text)
    tail.reverse()
    return tail


def card(record: Mapping[str, Any], message: str | None = None, orphaned: bool = False) -> dict[str, Any]:
    """Everything a card shows, keyed by the widget trait that carries it."""
    return {"title": title(record, message), "run": run(record, orphaned), "messages": messages(record),
            "output": output(record)}


def _line(text: Any) -> str | None:
    """The first line of ``text``, cut to ``NOTE_CHARS``; None when there is none."""
    lines = str(text).strip().splitlines() if text else []
    if not lines:
        return None
    return lines[0] if len(lines[0]) <= NOTE_CHARS else lines[0][: NOTE_CHARS - 1] + "…"


def _note(record: Mapping[str, Any]) -> str | None:
    return _line(record.get("error") if record["status"] != COMPLETED else record.get("result_repr"))


def _said(record: Mapping[str, Any]) -> str | None:
    """What tells this run apart from others of its task: its progress message, else
    the newest reply or notify (a display name, when set, is already its title)."""
    progress = record.get("progress") or {}
    if progress.get("message"):
        return _line(progress["message"])
    for message in reversed(record.get("messages") or ()):
        if message.get("kind") in SAID_KINDS:
            return _line(message.get("text"))
    return None


def summary(record: Mapping[str, Any], orphaned: bool = False) -> dict[str, Any]:
    """A card on the board: name and status; what it last said, when it started and its
    id (runs of one task look alike otherwise); a bar; the error or result."""
    status = record["status"]
    progress = record.get("progress")
    fraction = None
    if progress and progress.get("total"):
        fraction = max(0.0, min(1.0, progress["done"] / progress["total"]))
    return {
        "task_id": record["task_id"],
        "title": title(record),
        "status": status,
        "attempt": record.get("attempt", 0),
        "max_attempts": record.get("max_attempts", 1),
        "created_at": record.get("created_at"),
        "started_at": record.get("started_at"),
        "completed_at": record.get("completed_at"),
        "scheduled_for": record.get("scheduled_for"),
        "progress": fraction,
        "said": _said(record),
        "note": _note(record),
        "stopping": _stopping(record),
        "can_cancel": _can_cancel(record),
        "can_retry": _can_retry(status),
        "orphaned": orphaned,
    }


class RunSource(Protocol):
    """What a board reads: the store's queries (``store.Store``), which answer from indexes."""

    def runs(self, where: Mapping[str, Any], *, limit: int | None = None) -> list[Any]: ...

    def run_counts(self, where: Mapping[str, Any], by: Sequence[str] = ...) -> dict[tuple[str, ...], int]: ...

    def run_values(self, column: str) -> list[str]: ...

    def get_run(self, task_id: str) -> Any: ...


_REFUSALS = {
    "missing": "run {} is not in this store",
    "finished": "run {} had already finished",
}


def refusal(task_id: str, why: str) -> str:
    """What a view says of a click that could not act (``missing``, ``finished``):
    the kernel's ``notice`` and the server's answer to a Cancel the kernel did not hear alike."""
    return _REFUSALS[why].format(task_id)


def _kept_by(record: Mapping[str, Any], filter: Mapping[str, Any]) -> bool:
    """Whether the board's ``filter`` keeps ``record`` by what a run keeps all its life (its app,
    task and session): details left open on a run whose status moves on stay open."""
    return all(record.get(key) in (value if isinstance(value, list) else [value])
               for key, value in filter.items() if key != "status")


def board(source: RunSource, *, columns: Sequence[tuple[str, Sequence[str]]],
          filter: Mapping[str, Any], limits: Mapping[str, int], page: int, selected: str = "",
          orphaned: Callable[[Mapping[str, Any]], bool] = lambda record: False) -> dict[str, Any]:
    """The board's traits: ``lanes`` (a column each: label, count, newest cards up to its
    limit), ``choices`` (values the filter menus offer), ``total`` (of the runs its columns
    hold: a status no column shows is not counted), and ``detail``: the
    ``selected`` run as a card ({} when none is, or it is gone); ``selected`` too, as "", when
    the filter leaves that run out (the details close).
    The widget and the server (for a view whose kernel is gone) both answer with this; the
    server says which runs are ``orphaned``.

    Counts and menus come from the counts the store keeps, and each lane's cards
    from one index walk per status, so a store with a million runs renders as
    fast as one with ten.
    """
    counts = {status: n for (status,), n in source.run_counts(filter).items()}
    wanted = filter.get("status")

    def passes(status: str) -> bool:  # the status filter
        return wanted is None or status == wanted or (isinstance(wanted, (list, tuple)) and status in wanted)

    lanes = []
    for label, statuses in columns:
        limit = max(page, int(limits.get(label, page)))
        shown = [s for s in statuses if passes(s)]
        newest = heapq.nlargest(limit, (r for s in shown if counts.get(s)
                                        for r in source.runs({**filter, "status": s}, limit=limit)),
                                key=lambda r: r["task_id"])
        lanes.append({"label": label, "statuses": list(statuses), "count": sum(counts.get(s, 0) for s in shown),
                      "limit": limit, "cards": [summary(r, orphaned(r)) for r in newest]})
    record = source.get_run(selected) if selected else None
    closed = record is not None and not _kept_by(record, filter)
    if closed:  # the details show a run of the board, not one its filter has since left out: they close
        record = None
    on_board = {s for _, statuses in columns for s in statuses if passes(s)}
    return {"lanes": lanes, "total": sum(counts.get(s, 0) for s in on_board),  # (what no column shows is not counted)
            "choices": {"app": source.run_values("app"), "task_name": source.run_values("task_name"),
                        "session_id": source.run_values("session_id"),
                        "status": list(dict.fromkeys(s for _, statuses in columns for s in statuses))},
            "detail": {"task_id": selected, **card(record, orphaned=orphaned(record))} if record is not None else {},
            **({"selected": ""} if closed else {})}
