"""The line magics: ``%tasks``, ``%task <id>``, ``%capsule`` (and ``%capsule portable on|off``).

Each shows every app on the store: a notebook may define tasks on
``cpsl.App(name=...)`` apps besides the default one.
"""

from __future__ import annotations

from typing import Any

from ..app import App, configure, default_app
from ..portable import is_portable
from ..queries import whole_run_id
from ..record import RUNNING
from ..schedules import on_store, when


def register(ip: Any) -> None:
    ip.register_magic_function(_tasks_magic, "line", "tasks")
    ip.register_magic_function(_task_magic, "line", "task")
    ip.register_magic_function(_capsule_magic, "line", "capsule")


def _tasks_magic(line: str) -> None:
    """%tasks [task_name]: the task board (every app on the store)."""
    from ..ui import TaskBoard, display

    name = line.strip()
    if " " in name or name.startswith("-"):
        print(f"usage: %tasks [task_name]   (got {name!r}; the board's menus filter by app, session and status)")
        return
    if name:
        app = default_app()
        names = sorted({task for (task,) in app.store.run_counts(by=("task_name",))}
                       | {t.name for a in app.apps_on_store() for t in a.tasks_defined()})
        if name not in names:
            print(f"no task named {name!r} on {app.home} yet (tasks: {', '.join(names) or 'none'}); "
                  "the board shows its runs once it has some")
    display(TaskBoard(filter={"task_name": name} if name else None))


def _task_magic(line: str) -> None:
    """%task <id>: one run's card."""
    from ..ui import TaskCard, display

    task_id = line.strip()
    if not task_id:
        print("usage: %task <task id>   (ids are on the %tasks board, or their last characters, and in "
              "handle.task_id)")
        return
    try:
        task_id = whole_run_id(default_app().store, task_id)
    except LookupError as exc:
        print(exc)
        return
    handle = default_app().get_task(task_id)
    if handle is None:
        print(f"no run {task_id!r} in {default_app().home}")
        return
    display(TaskCard(handle))


def capsule_summary(app: App | None = None) -> str:
    """What ``%capsule`` prints: the store, each app's counts by status, running work, schedules."""
    from ..ui.text import table_text

    app = app or default_app()
    app.store.poll()
    by_app: dict[str, dict[str, int]] = {}
    for (name, status), n in app.store.run_counts(by=("app", "status")).items():
        by_app.setdefault(name, {})[status] = n
    lines = [f"capsule_nb store: {app.home}"]
    for name in sorted(set(by_app) | {a.name for a in app.apps_on_store()}):
        counts = by_app.get(name, {})
        lines.append(f"app {name!r}: {sum(counts.values())} runs")
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "  no runs yet")
    unfinished = sorted(app.store.unfinished_runs(), key=lambda r: r["task_id"])
    running = [r for r in unfinished if r["status"] == RUNNING]
    waiting = [r for r in unfinished if r["status"] != RUNNING]
    lines.append(f"running now ({len(running)}):" if running else "nothing running")
    if running:
        lines.append(table_text(running))
    if waiting:
        lines.append(f"waiting ({len(waiting)}): " + ", ".join(f"{r['task_name']} {r['status']}" for r in waiting[:10]))
    schedules = on_store(app.store)  # every kernel's, not just this one's
    lines.append(f"schedules ({len(schedules)}):" if schedules else "no schedules")
    for row in schedules:
        lines.append(f"  {row['name']:<24} {row['cron'] or '?':<20} {row['tz']:<16} {when(row)}"
                     + (f"  ({row['skipped']} ticks skipped)" if row["skipped"] else ""))
    return "\n".join(lines)


def _capsule_magic(line: str) -> None:
    """%capsule: store path, counts by status, what is running. %capsule portable on|off:
    warn once for each capsule_nb-only extension used, with the Capsule way to write it;
    %capsule portable alone says which it is (a question, so it changes nothing)."""
    words = line.split()
    if not words:
        print(capsule_summary())
    elif words[0] == "portable" and (len(words) == 1 or len(words) == 2 and words[1] in ("on", "off")):
        if len(words) == 2:
            configure(portable=words[1] == "on")
        print("portable mode " + ("on: capsule_nb-only extensions warn once, with the Capsule way"
                                  if is_portable() else "off"))
    else:
        print("usage: %capsule   |   %capsule portable [on|off]")
