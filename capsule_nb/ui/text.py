"""Text forms of runs, cards and boards: terminal IPython, plain ``repr``, the magics, the CLI.

Pure functions of run records, so the CLI can use them without the widgets.
They render any dict, even one a damaged store produced (``capsule-nb
doctor`` shows such records with them): a field of the wrong type is shown
as ``?`` and its value, never a crash.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from ..record import RUNNING, iso_utc, short_repr


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _shown(value: Any, kind: type | tuple[type, ...] = str) -> str:
    """``value`` as text when it has the type the field should have; else ``?`` and its repr."""
    if value is None:
        return "-"
    if isinstance(value, kind) and not isinstance(value, bool) or kind is bool and type(value) is bool:
        return str(value)
    return "?" + short_repr(value, 40)


def elapsed(record: dict[str, Any]) -> str:
    """How long a run has taken ("-" before it starts, and while it waits for a retry;
    counting on while it runs)."""
    start = record.get("started_at")
    end = record.get("completed_at") or (time.time() if record.get("status") == RUNNING else None)
    if not start or end is None:
        return "-"
    if not (_number(start) and _number(end)):
        return "?"
    seconds = max(0.0, end - start)
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _items(value: Any) -> list[dict[str, Any]]:
    """The dicts of a list field (messages, output); anything else in it is left out."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def run_text(record: dict[str, Any], message: str | None = None, *, messages: int | None = 5,
             output_lines: int = 3) -> str:
    """A few lines that say what a run is doing or did: the newest ``messages`` (None: all)
    and the last ``output_lines`` of what it printed."""
    name = message or record.get("display_name") or _shown(record.get("task_name"))
    if message and record.get("display_name") not in (None, message):  # the headline, and the run's own name
        name = f"{message} · {_shown(record['display_name'])}"
    attempt = (f"attempt {_shown(record.get('attempt'), int)}/{_shown(record.get('max_attempts'), int)}"
               if record.get("attempt") else "not started")  # (attempt 0 is no attempt)
    due = record.get("scheduled_for") if record.get("status") in ("scheduled", "retry") else None
    status = _shown(record.get("status"))
    if record.get("stopping") and record.get("status") == RUNNING:  # (as its card says: asked, not yet stopped)
        status += ", timing out" if record["stopping"] == "timeout" else ", stopping"
    lines = [
        f"{_one_line(name)} [{status}]  run {_shown(record.get('task_id'))}",
        f"  {attempt}  elapsed {elapsed(record)}" + (f"  starts {iso_utc(due)}" if due is not None else ""),
    ]
    progress = record.get("progress")
    if isinstance(progress, dict):
        total, done = progress.get("total"), _shown(progress.get("done"), (int, float))
        bar = f"{done}/{_shown(total, (int, float))}" if total else done
        lines.append(f"  progress {bar}" + (f"  {_one_line(progress['message'])}" if progress.get("message") else ""))
    elif progress is not None:
        lines.append(f"  progress {_shown(progress, dict)}")
    shown = _items(record.get("messages"))
    if record.get("messages_dropped"):
        lines.append(f"  ({_shown(record['messages_dropped'], int)} older messages dropped)")
    for item in shown[-messages:] if messages is not None else shown:
        detail = f" ({_one_line(item['detail'])})" if item.get("detail") else ""
        lines.append(f"  {_shown(item.get('kind'))}: {_one_line(item.get('text'))}{detail}")
    output = "".join(str(x.get("text", "")) for x in _items(record.get("output")))
    if output:
        tail = output.rstrip().splitlines()[-output_lines:]
        lines.extend(f"  | {line}" for line in tail)
    if record.get("error"):
        lines.append(f"  error: {_one_line(record['error'])}")
    if record.get("status") == "completed" and record.get("result_repr") is not None:
        lines.append(f"  result: {_one_line(record['result_repr'])}")
    return "\n".join(lines)


def runs_text(records: Iterable[dict[str, Any]]) -> str:
    """Every run in full, oldest first (the CLI's ``show`` and the demo's report)."""
    ordered = sorted(records, key=lambda r: str(r.get("task_id")))
    if not ordered:
        return "no task runs were recorded"
    return "\n".join(run_text(r, messages=None, output_lines=5) for r in ordered)


def board_text(title: str, lanes: Iterable[dict[str, Any]]) -> str:
    """A board as text: each lane (``views.board``) with its count and newest cards."""
    lines = [title]
    for lane in lanes:
        lines.append(f"{lane['label']} ({lane['count']})")
        for card in lane["cards"]:
            lines.append(f"  {_shown(card.get('title')):<24} {_shown(card.get('status')):<10} "
                         f"{_shown(card.get('task_id'))}  {elapsed(card)}")
        if lane["count"] > len(lane["cards"]):
            lines.append(f"  … {lane['count'] - len(lane['cards'])} more")
    return "\n".join(lines)


def table_text(records: list[dict[str, Any]]) -> str:
    """An aligned table of runs (``%capsule`` and the CLI); an APP column when they are of several apps."""
    several = len({str(r.get("app")) for r in records}) > 1
    rows = [("TASK ID", "NAME", *(("APP",) if several else ()), "STATUS", "ATTEMPT", "ELAPSED", "ERROR")]
    for r in records:
        rows.append((_shown(r.get("task_id")), _one_line(_shown(r.get("task_name")), 60),
                     *((_shown(r.get("app")),) if several else ()), _shown(r.get("status")),
                     f"{_shown(r.get('attempt'), int)}/{_shown(r.get('max_attempts'), int)}",
                     elapsed(r), _one_line(r.get("error") or "", 60)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
