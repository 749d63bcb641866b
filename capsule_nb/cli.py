"""The ``capsule-nb`` command (also ``python -m capsule_nb``).

    capsule-nb demo [--notebook PATH] [--home DIR] [--save PATH]
    capsule-nb tasks [--status S] [--name N] [--app A] [--limit K] [--home PATH] [--json]
    capsule-nb show ID [--home PATH] [--json]
    capsule-nb cancel ID [--home PATH] [--json]
    capsule-nb prune --older-than 7d [--home PATH] [--json]
    capsule-nb schedules [--home PATH] [--json]
    capsule-nb doctor [--fix] [--home PATH] [--json]
    capsule-nb check NOTEBOOK... [--json]

``demo`` executes the quickstart notebook headless (``demo.py``) and exits
non-zero when a cell of the notebook raises. ``check`` lists a notebook's
capsule_nb-only extensions (``portcheck.py``). The others read (or act on) a
store: ``--home``, else ``$CAPSULE_NB_HOME``, else ``./.capsule``; ``--home``
and ``--json`` go before or after the command. They show every app on the
store. An unknown run id, a folder that is not a store, and a store that
cannot be used (damaged, or open to other users) exit with code 2 and one
line saying why.

Subcommands are argparse sub-parsers, each a ``cmd_<name>(args) -> int``;
``main(argv)`` returns the exit code, so tests can call it in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence

from . import __version__
from .demo import cmd_demo
from .errors import StoreError
from .schedules import on_store, when


class _UsageError(Exception):
    """Exit code 2 with this message."""


def _open(args: argparse.Namespace) -> Any:
    """The App of the store named by ``--home`` (never creating one on a typo)."""
    from .app import App, _home
    from .store.folder import check_database_kept

    try:
        home = _home(args.home)
    except (TypeError, ValueError) as exc:  # --home "" names no folder
        raise _UsageError(f"--home: {exc}") from None
    if not (home / "db" / "cache.db").is_file():
        check_database_kept(home)  # (a store that lost it says so)
        named_by = ("given by --home" if args.home else "from CAPSULE_NB_HOME" if os.environ.get("CAPSULE_NB_HOME")
                    else "the default; give --home or set CAPSULE_NB_HOME")
        raise _UsageError(f"{home} is not a capsule_nb store (no db/cache.db; {named_by})")
    return App(home=home)


def _run(app: Any, task_id: str) -> dict[str, Any]:
    from .queries import whole_run_id
    from .store.feed import RUN

    try:
        task_id = whole_run_id(app.store, task_id)
    except LookupError as exc:
        raise _UsageError(f"{exc} ({app.home})") from None
    record = app.store.get_run(task_id)
    damage = app.store.problem(RUN + task_id)
    if record is None and damage:
        raise _UsageError(f"run {task_id!r} in {app.home} is damaged ({damage}); `capsule-nb doctor` lists it")
    if record is None:
        raise _UsageError(f"no run {task_id!r} in {app.home}")
    return record


def _emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` (made only then, when a function)."""
    if args.json:
        import json

        print(json.dumps(data, indent=2, default=str))
    else:
        print(text() if callable(text) else text)


def cmd_tasks(args: argparse.Namespace) -> int:
    from .record import check_status
    from .ui.text import table_text

    try:
        check_status(args.status)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    app = _open(args)
    where = {column: value for column, value in (("status", args.status), ("task_name", args.name), ("app", args.app))
             if value is not None}
    records = app.store.runs(where, limit=args.limit or None)
    _emit(args, records, lambda: table_text(records) if records else "no runs" + _apps_hint(app, args.app))
    return 0


def _apps_hint(app: Any, name: str | None) -> str:
    """What to say after "no runs" when ``--app`` names an app with no runs on the store at all."""
    apps = sorted({key[0] for key in app.store.run_counts(by=("app",))}) if name is not None else []
    if name is None or name in apps:
        return ""
    return f" (no app {name!r} has runs on {app.home}; " + (f"its apps: {', '.join(apps)})" if apps else "none has)")


def cmd_show(args: argparse.Namespace) -> int:
    from .record import FINISHED
    from .ui.text import runs_text

    app = _open(args)
    record = _run(app, args.id)
    text = runs_text([record])
    if record["task_id"] in app.store.cancel_requests() and record["status"] not in FINISHED \
            and not record.get("stopping"):
        text += "\n  cancel asked: the kernel that owns the run has not taken it up yet"
    if record.get("traceback"):
        text += "\n\n" + record["traceback"].rstrip()
    _emit(args, record, text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .record import CANCELLED, FINISHED

    app = _open(args)
    record = _run(app, args.id)
    task_id = record["task_id"]
    if record["status"] in FINISHED and not record.get("series"):
        _emit(args, {"task_id": task_id, "cancelled": False, "status": record["status"]},
              f"run {task_id} already ended {record['status']}")
        return 1
    asked = app.runtime.cancel(task_id)
    now = (app.store.get_run(task_id) or {}).get("status")
    where = "cancelled" if now == CANCELLED else "asked of the process that holds it"  # (a live owner)
    _emit(args, {"task_id": task_id, "cancelled": asked, "status": now},
          f"run {task_id}: {where}" if asked else f"run {task_id}: nothing to cancel")
    return 0 if asked else 1


def cmd_prune(args: argparse.Namespace) -> int:
    from .durations import parse_delay

    try:
        age = parse_delay(args.older_than, what="age")
    except (TypeError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    app = _open(args)
    pruned = app.store.prune(None, before=time.time() - age)
    app.store.flush()
    _emit(args, {"pruned": pruned, "older_than": args.older_than},
          f"pruned {pruned} finished runs older than {args.older_than}")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    app = _open(args)
    rows = on_store(app.store)
    width = max([len(when(r)) for r in rows] + [4])
    lines = [f"{'NAME':<24} {'CRON':<18} {'TZ':<16} {'WHEN':<{width}} LAST"] + [
        f"{r['name']:<24} {r['cron'] or '?':<18} {r['tz']:<16} {when(r):<{width}} "
        f"{r['last'] or '-'}" + (f"  ({r['skipped']} skipped)" if r["skipped"] else "") for r in rows]
    _emit(args, rows, "\n".join(lines) if rows else "no schedules")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .app import _home
    from .store import doctor

    home = _home(args.home)
    bad = doctor.examine(home)
    listing = [{"key": row.name, "table": row.table, "row": row.row, "problem": row.problem} for row in bad]
    if args.fix and bad:
        fixed = doctor.move_aside(home, bad)
        said = [f"moved {fixed.moved} bad rows of {home} to {fixed.quarantine} (nothing reads it; delete it "
                f"when done)"] if fixed.moved or not fixed.recounted else []
        if fixed.recounted:
            said.append(f"counted the runs of {home} again: the kept counts were wrong")
        _emit(args, {"moved": fixed.moved, "to": str(fixed.quarantine), "recounted": fixed.recounted,
                     "rows": listing}, "\n".join(said))
        return 0
    _emit(args, listing, lambda: _doctor_text(home, bad))
    return 1 if bad else 0


def _doctor_text(home: Any, bad: list) -> str:
    from .store.feed import RUN
    from .ui.text import table_text

    if not bad:
        return f"no bad rows in {home}"
    lines = [f"{len(bad)} bad rows in {home}:"] + [f"  {row.name}: {row.problem}" for row in bad]
    records = [row.value for row in bad if (row.key or "").startswith(RUN) and isinstance(row.value, dict)]
    if records:
        lines += ["", "the damaged runs, as far as they can be read:", table_text(records)]
    return "\n".join(lines + ["", "`capsule-nb doctor --fix` moves them aside"])


def _whole(text: str) -> int:
    """An argument that is a whole number, 0 or more (argparse says which one is not)."""
    if not text.isdigit() or int(text) > 2**63 - 1:  # (SQLite's integers)
        raise argparse.ArgumentTypeError(f"not a whole number from 0 to 2**63 - 1: {text!r}")
    return int(text)


def _store_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--home`` and ``--json``, on the main parser and on each store command: a value given
    after the command wins, and a command that is not given one keeps the main parser's."""
    unset = None if top else argparse.SUPPRESS
    parser.add_argument("--home", metavar="PATH", default=unset,
                        help="the store (default: $CAPSULE_NB_HOME, else ./.capsule)")
    parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="print JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    from .portcheck import add_parser as add_check

    parser = argparse.ArgumentParser(
        prog="capsule-nb", description="Capsule-style background tasks for Jupyter notebooks."
    )
    _store_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"capsule-nb {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo", help="run the quickstart notebook headless and show what its tasks did",
        description="Execute a notebook (default: the bundled quickstart) in a fresh ipykernel "
                    "of this Python with a temporary store, then print every task run.",
    )
    demo.add_argument("--notebook", metavar="PATH", help="the notebook to run (default: the quickstart)")
    demo.add_argument("--home", metavar="DIR", help="store folder to use and keep (default: a temporary one)")
    demo.add_argument("--save", metavar="PATH", help="write the executed notebook here")
    demo.add_argument("--timeout", type=float, default=120, help="seconds one cell may take (default: 120)")
    demo.set_defaults(func=cmd_demo)

    tasks = commands.add_parser("tasks", help="list runs of every app, newest first, as a table")
    tasks.add_argument("--status", help="only runs with this status")
    tasks.add_argument("--name", help="only runs of this task")
    tasks.add_argument("--app", help="only runs of this app (default: every app on the store)")
    tasks.add_argument("--limit", type=_whole, default=50, help="at most this many (0: all; default 50)")
    _store_options(tasks)
    tasks.set_defaults(func=cmd_tasks)

    show = commands.add_parser("show", help="one run: record, messages, error, result preview")
    show.add_argument("id", help="the run's id, or its last characters (a board's card shows 6)")
    _store_options(show)
    show.set_defaults(func=cmd_show)

    cancel = commands.add_parser("cancel", help="cancel a run (a live kernel that owns it stops it)")
    cancel.add_argument("id", help="the run's id, or its last characters (a board's card shows 6)")
    _store_options(cancel)
    cancel.set_defaults(func=cmd_cancel)

    prune = commands.add_parser("prune", help="delete finished runs older than an age")
    prune.add_argument("--older-than", required=True, metavar="AGE", help="like 7d, 12h, 30m")
    _store_options(prune)
    prune.set_defaults(func=cmd_prune)

    schedules = commands.add_parser("schedules", help="the schedules defined on this store, with their next run")
    _store_options(schedules)
    schedules.set_defaults(func=cmd_schedules)

    doctor = commands.add_parser("doctor", help="list the store's bad rows (skipped when read); --fix moves them aside")
    doctor.add_argument("--fix", action="store_true", help="move the bad rows into quarantine.db in the store folder")
    _store_options(doctor)
    doctor.set_defaults(func=cmd_doctor)

    add_check(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (_UsageError, StoreError) as exc:  # a store that cannot be used: one line, no traceback
        print(f"capsule-nb {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `capsule-nb tasks | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush says nothing)
        return 0

