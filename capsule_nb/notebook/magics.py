"""The line magics: ``%tasks``, ``%task <id>``, ``%capsule``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..app import App, default_app
from ..record import FINISHED, RUNNING


def register(ip: Any) -> None:
    ip.register_magic_function(_tasks_magic, "line", "tasks")
    ip.register_magic_function(_task_magic, "line", "task")
    ip.register_magic_function(_capsule_magic, "line", "capsule")


def _tasks_magic(line: str) -> None:
    """%tasks [task_name]: the task board."""
    from ..ui import TaskBoard, display

    name = line.strip()
    display(TaskBoard(filter={"task_name": name} if name else None))


def _task_magic(line: str) -> None:
    """%task <id>: one run's card."""
    from ..ui import TaskCard, display

    task_id = line.strip()
    if not task_id:
        print("usage: %task <task id>   (ids are on the %tasks board and in handle.task_id)")
        return
    handle = default_app().get_task(task_id)
    if handle is None:
        print(f"no run {task_id!r} in {default_app().home}")
        return
    display(TaskCard(handle))


def capsule_summary(app: App | None = None) -> str:
    """What ``%capsule`` prints: the store, counts by status, running work, schedules."""
    from ..ui.text import table_text

    app = app or default_app()
    app.store.poll()
    runs = [r for r in app.store.runs() if r["app"] == app.name]
    counts = Counter(r["status"] for r in runs)
    lines = [f"capsule_nb store: {app.home}", f"app {app.name!r}: {len(runs)} runs"]
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "  no runs yet")
    running = sorted((r for r in runs if r["status"] == RUNNING), key=lambda r: r["task_id"])
    live = [r for r in runs if r["status"] not in FINISHED and r["status"] != RUNNING]
    lines.append(f"running now ({len(running)}):" if running else "nothing running")
    if running:
        lines.append(table_text(running))
    if live:
        lines.append(f"waiting ({len(live)}): " + ", ".join(f"{r['task_name']} {r['status']}" for r in live[:10]))
    schedules = app.schedules()
    lines.append(f"schedules ({len(schedules)}):" if schedules else "no schedules")
    for schedule in schedules:
        when = "paused" if schedule.paused else "next " + schedule.next_runs(1)[0].isoformat(timespec="seconds")
        skipped = schedule.state().get("skipped", 0)
        lines.append(f"  {schedule.name:<24} {schedule.cron:<20} {schedule.tz.key:<16} {when}"
                     + (f"  ({skipped} ticks skipped)" if skipped else ""))
    return "\n".join(lines)


def _capsule_magic(line: str) -> None:
    """%capsule: store path, counts by status, what is running."""
    print(capsule_summary())
