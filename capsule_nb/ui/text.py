"""Text forms of runs, cards and boards: terminal IPython, plain ``repr``, the magics, the CLI.

Pure functions of run records, so the CLI can use them without the widgets.
"""

from __future__ import annotations

import time
from typing import Any, Iterable


def elapsed(record: dict[str, Any]) -> str:
    """How long a run has taken ("-" before it starts; counting on while it runs)."""
    start = record.get("started_at")
    if not start:
        return "-"
    end = record.get("completed_at") or time.time()
    seconds = max(0.0, end - start)
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_text(record: dict[str, Any], message: str | None = None, *, messages: int | None = 5,
             output_lines: int = 3) -> str:
    """A few lines that say what a run is doing or did: the newest ``messages`` (None: all)
    and the last ``output_lines`` of what it printed."""
    name = message or record.get("display_name") or record["task_name"]
    lines = [
        f"{name} [{record['status']}]  run {record['task_id']}",
        f"  attempt {record['attempt']}/{record['max_attempts']}  elapsed {elapsed(record)}",
    ]
    progress = record.get("progress")
    if progress:
        total = progress.get("total")
        done = progress["done"]
        bar = f"{done}/{total}" if total else f"{done}"
        lines.append(f"  progress {bar}" + (f"  {progress['message']}" if progress.get("message") else ""))
    shown = record.get("messages") or []
    for item in shown[-messages:] if messages is not None else shown:
        detail = f" ({item['detail']})" if item.get("detail") else ""
        lines.append(f"  {item['kind']}: {_one_line(item['text'])}{detail}")
    output = "".join(x["text"] for x in record.get("output") or ())
    if output:
        tail = output.rstrip().splitlines()[-output_lines:]
        lines.extend(f"  | {line}" for line in tail)
    if record.get("error"):
        lines.append(f"  error: {_one_line(record['error'])}")
    if record["status"] == "completed" and record.get("result_repr") is not None:
        lines.append(f"  result: {_one_line(record['result_repr'])}")
    return "\n".join(lines)


def runs_text(records: Iterable[dict[str, Any]]) -> str:
    """Every run in full, oldest first (the CLI's ``show`` and the demo's report)."""
    ordered = sorted(records, key=lambda r: r["task_id"])
    if not ordered:
        return "no task runs were recorded"
    return "\n".join(run_text(r, messages=None, output_lines=5) for r in ordered)


def board_text(title: str, columns: Iterable[tuple[str, list[dict[str, Any]]]], per_column: int = 5) -> str:
    lines = [title]
    for label, records in columns:
        lines.append(f"{label} ({len(records)})")
        for record in records[:per_column]:
            lines.append(f"  {record['task_name']:<24} {record['status']:<10} {record['task_id']}  {elapsed(record)}")
        if len(records) > per_column:
            lines.append(f"  … {len(records) - per_column} more")
    return "\n".join(lines)


def table_text(records: list[dict[str, Any]]) -> str:
    """An aligned table of runs (``%capsule`` and the CLI); an APP column when they are of several apps."""
    several = len({r.get("app") for r in records}) > 1
    rows = [("TASK ID", "NAME", *(("APP",) if several else ()), "STATUS", "ATTEMPT", "ELAPSED", "ERROR")]
    for r in records:
        rows.append((r["task_id"], r["task_name"], *((str(r.get("app")),) if several else ()), r["status"],
                     f"{r['attempt']}/{r['max_attempts']}", elapsed(r), (r.get("error") or "")[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
