"""Text forms of cards and boards: terminal IPython, plain ``repr``, the CLI."""

from __future__ import annotations

import time
from typing import Any, Iterable


def _elapsed(record: dict[str, Any]) -> str:
    start = record.get("started_at")
    if not start:
        return "-"
    end = record.get("completed_at") or time.time()
    seconds = max(0.0, end - start)
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def card_text(record: dict[str, Any], message: str | None = None) -> str:
    """A few lines that say what a run is doing or did."""
    name = message or record.get("display_name") or record["task_name"]
    lines = [
        f"{name} [{record['status']}]  run {record['task_id']}",
        f"  attempt {record['attempt']}/{record['max_attempts']}  elapsed {_elapsed(record)}",
    ]
    progress = record.get("progress")
    if progress:
        total = progress.get("total")
        done = progress["done"]
        bar = f"{done}/{total}" if total else f"{done}"
        lines.append(f"  progress {bar}" + (f"  {progress['message']}" if progress.get("message") else ""))
    for item in (record.get("messages") or [])[-5:]:
        lines.append(f"  {item['kind']}: {item['text'].rstrip()}")
    output = "".join(x["text"] for x in record.get("output") or ())
    if output:
        tail = output.rstrip().splitlines()[-3:]
        lines.extend(f"  | {line}" for line in tail)
    if record.get("error"):
        lines.append(f"  error: {record['error']}")
    if record["status"] == "completed" and record.get("result_repr") is not None:
        lines.append(f"  result: {record['result_repr']}")
    return "\n".join(lines)


def board_text(title: str, columns: Iterable[tuple[str, list[dict[str, Any]]]], per_column: int = 5) -> str:
    lines = [title]
    for label, records in columns:
        lines.append(f"{label} ({len(records)})")
        for record in records[:per_column]:
            lines.append(f"  {record['task_name']:<24} {record['status']:<10} {record['task_id']}  {_elapsed(record)}")
        if len(records) > per_column:
            lines.append(f"  … {len(records) - per_column} more")
    return "\n".join(lines)


def table_text(records: list[dict[str, Any]]) -> str:
    """An aligned table of runs (``%tasks`` and the CLI)."""
    rows = [("TASK ID", "NAME", "STATUS", "ATTEMPT", "ELAPSED", "ERROR")]
    for r in records:
        rows.append((r["task_id"], r["task_name"], r["status"], f"{r['attempt']}/{r['max_attempts']}",
                     _elapsed(r), (r.get("error") or "")[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
