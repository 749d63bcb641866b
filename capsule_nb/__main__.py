"""The ``capsule-nb`` command (also ``python -m capsule_nb``).

    capsule-nb demo [--notebook PATH] [--home DIR] [--save PATH]
    capsule-nb [--home PATH] [--json] tasks [--status S] [--name N] [--limit K]
    capsule-nb [--home PATH] [--json] show ID
    capsule-nb [--home PATH] cancel ID
    capsule-nb [--home PATH] prune --older-than 7d
    capsule-nb [--home PATH] [--json] schedules

``demo`` executes the quickstart notebook headless, in a real ipykernel of
this very Python, with a fresh store, then prints what every task run did.
It exits non-zero when a cell of the notebook raises. The others read (or
act on) a store: ``--home``, else ``$CAPSULE_NB_HOME``, else ``./.capsule``.
An unknown run id or a folder that is not a store exits with code 2.

Subcommands are argparse sub-parsers, each a ``cmd_<name>(args) -> int``;
``main(argv)`` returns the exit code, so tests can call it in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

NOTEBOOK = "quickstart.ipynb"


# ------------------------------------------------------------------ kernels


def _kernel_classes() -> tuple[type, type]:
    """``(KernelManager, AsyncKernelManager)`` whose ``python3`` is ipykernel on ``sys.executable``.

    Nothing needs to be installed with ``ipykernel install``, and a ``python3``
    kernelspec of some other Python on the machine is never picked up.
    """
    from jupyter_client import AsyncKernelManager, KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from traitlets import default

    class ThisPythonKernelSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            if kernel_name in ("python3", "python"):
                from ipykernel.kernelspec import RESOURCES, get_kernel_dict

                return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    class ThisPythonKernelManager(KernelManager):
        @default("kernel_spec_manager")
        def _this_python_specs(self) -> KernelSpecManager:
            return ThisPythonKernelSpecs(data_dir=self.data_dir)

    class AsyncThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _this_python_specs(self) -> KernelSpecManager:
            return ThisPythonKernelSpecs(data_dir=self.data_dir)

    return ThisPythonKernelManager, AsyncThisPythonKernelManager


def kernel_manager(**kwargs: Any) -> Any:
    """A blocking ``KernelManager`` for an ipykernel of this Python (``kernel_name="python3"``)."""
    blocking, _ = _kernel_classes()
    return blocking(kernel_name="python3", **kwargs)


def kernel_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """This process's environment with the store at ``home``."""
    env = dict(os.environ)
    env["CAPSULE_NB_HOME"] = str(home)
    env.pop("JPY_SESSION_NAME", None)
    return env


# ---------------------------------------------------------------- notebooks


def find_notebook(name: str = NOTEBOOK) -> Path:
    """The bundled notebook: inside the package (a wheel) or beside it (a checkout)."""
    packaged = resources.files("capsule_nb") / "notebooks" / name
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "notebooks" / name
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(f"{name} is neither in the capsule_nb package nor at {checkout}")


def run_notebook(path: str | os.PathLike[str], home: str | os.PathLike[str], *,
                 timeout: float = 120, cwd: str | os.PathLike[str] | None = None, stderr: Any = None) -> Any:
    """Execute the notebook at ``path`` in a new kernel whose store is ``home``.

    Returns the executed ``NotebookNode``; raises ``nbclient``'s
    ``CellExecutionError`` when a cell raises. ``stderr`` (a file) receives
    the kernel process's own stderr instead of this process's.
    """
    import nbformat
    from nbclient import NotebookClient

    _, async_manager = _kernel_classes()
    nb = nbformat.read(os.fspath(path), as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=async_manager,
        resources={"metadata": {"path": os.fspath(cwd or home)}},
    )
    launch: dict[str, Any] = {"env": kernel_env(home)}
    if stderr is not None:
        launch["stderr"] = stderr
    client.execute(**launch)
    return nb


# ------------------------------------------------------------------ reports


def _duration(record: dict[str, Any]) -> str:
    start, end = record.get("started_at"), record.get("completed_at")
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.2f}s" + ("" if end else " so far")


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_runs(records: list[dict[str, Any]]) -> str:
    """What each run did, oldest first: name, status, attempt, duration, result or error, messages."""
    if not records:
        return "no task runs were recorded"
    lines = []
    for r in sorted(records, key=lambda r: r["task_id"]):
        name = r.get("display_name") or r["task_name"]
        lines.append(f"{name}  [{r['status']}]  run {r['task_id']}")
        lines.append(f"    attempt {r['attempt']}/{r['max_attempts']}, took {_duration(r)}")
        if r.get("error"):
            lines.append(f"    error: {_one_line(r['error'])}")
        elif r["status"] == "completed":
            lines.append(f"    result: {_one_line(r.get('result_repr'))}")
        progress = r.get("progress")
        if progress:
            total = progress.get("total")
            lines.append(f"    progress: {progress['done']}" + (f"/{total}" if total else ""))
        for message in r.get("messages") or ():
            detail = f" ({message['detail']})" if message.get("detail") else ""
            lines.append(f"    {message['kind']}: {_one_line(message['text'])}{detail}")
        output = "".join(chunk["text"] for chunk in r.get("output") or ())
        for line in output.rstrip().splitlines()[-5:]:
            lines.append(f"    | {line}")
    return "\n".join(lines)


def _records(home: str | os.PathLike[str]) -> list[dict[str, Any]]:
    from .store import Store

    store = Store(home)
    try:
        return list(store.runs())
    finally:
        store.close()


# ---------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        path = Path(args.notebook) if args.notebook else find_notebook()
    except FileNotFoundError as exc:
        print(f"capsule-nb demo: {exc}", file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"capsule-nb demo: no notebook at {path}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="capsule-nb-demo-") as scratch:
        home = Path(args.home).resolve() if args.home else Path(scratch) / "store"
        print(f"running {path}")
        print(f"store   {home}")
        started = time.monotonic()
        status, failure = 0, None
        kernel_log = Path(scratch) / "kernel.log"
        try:
            with open(kernel_log, "w") as log:
                nb = run_notebook(path, home, timeout=args.timeout, cwd=scratch, stderr=log)
        except Exception as exc:  # CellExecutionError, a dead kernel, a timeout
            status, failure, nb = 1, exc, None
        took = time.monotonic() - started
        if nb is not None and args.save:
            import nbformat

            nbformat.write(nb, args.save)
            print(f"saved   {args.save}")
        records = _records(home) if home.is_dir() else []
        counts: dict[str, int] = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        verdict = "ran" if failure is None else "FAILED"
        print(f"\nnotebook {verdict} in {took:.1f}s; {len(records)} task runs" + (f" ({summary})" if summary else ""))
        print()
        print(format_runs(records))
        if failure is not None:
            print(f"\nthe notebook raised:\n{failure}", file=sys.stderr)
            log_text = kernel_log.read_text(errors="replace").strip() if kernel_log.exists() else ""
            if log_text:
                print(f"\nkernel stderr:\n{log_text[-4000:]}", file=sys.stderr)
    return status


class _UsageError(Exception):
    """Exit code 2 with this message."""


def _open(args: argparse.Namespace) -> Any:
    """The App of the store named by ``--home`` (never creating one on a typo)."""
    from .app import App, _home

    home = _home(args.home).expanduser().resolve()
    if not (home / "db" / "cache.db").is_file():
        raise _UsageError(f"{home} is not a capsule_nb store (no db/cache.db); give --home or set CAPSULE_NB_HOME")
    return App(home=home)


def _run(app: Any, task_id: str) -> dict[str, Any]:
    record = app.store.get_run(task_id)
    if record is None:
        raise _UsageError(f"no run {task_id!r} in {app.home}")
    return record


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        import json

        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_tasks(args: argparse.Namespace) -> int:
    from .records import check_status
    from .ui.text import table_text

    try:
        check_status(args.status)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    app = _open(args)
    records = [r for r in app.store.runs()
               if (args.status is None or r["status"] == args.status)
               and (args.name is None or r["task_name"] == args.name)]
    records.sort(key=lambda r: r["task_id"], reverse=True)
    records = records[: args.limit] if args.limit else records
    _emit(args, records, table_text(records) if records else "no runs")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    app = _open(args)
    record = _run(app, args.id)
    text = format_runs([record])
    if record.get("traceback"):
        text += "\n\n" + record["traceback"].rstrip()
    _emit(args, record, text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    app = _open(args)
    record = _run(app, args.id)
    if record["status"] in ("completed", "failed", "cancelled", "timeout") and not record.get("series"):
        print(f"run {args.id} already ended {record['status']}")
        return 1
    asked = app.runtime.cancel(args.id)
    owner = record.get("owner", "")
    where = "its kernel will stop it" if asked and owner != app.runtime.owner else "cancelled"
    print(f"run {args.id}: {where}" if asked else f"run {args.id}: nothing to cancel")
    return 0 if asked else 1


def cmd_prune(args: argparse.Namespace) -> int:
    from .durations import parse_delay
    from .records import FINISHED

    try:
        age = parse_delay(args.older_than, what="age")
    except (TypeError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    app = _open(args)
    cutoff = time.time() - age
    doomed = [r["task_id"] for r in app.store.runs()
              if r["status"] in FINISHED and (r.get("completed_at") or r["created_at"]) < cutoff]
    app.store.delete_runs(doomed)
    app.store.flush()
    print(f"pruned {len(doomed)} finished runs older than {args.older_than}")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    import datetime as dt

    from .schedules import next_due, parse_tz

    app = _open(args)
    rows = []
    for key, state in app.store.items("sched/"):
        _, app_name, name = key.split("/", 2)
        cron, tz = state.get("cron"), state.get("tz", "UTC")
        upcoming = None
        if cron and not state.get("paused"):
            upcoming = next_due(cron, parse_tz(tz), dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
        last = state.get("last_due")
        rows.append({"app": app_name, "name": name, "cron": cron, "tz": tz, "paused": bool(state.get("paused")),
                     "next": upcoming, "last": dt.datetime.fromtimestamp(last, dt.timezone.utc).isoformat(
                         timespec="seconds") if last else None, "skipped": state.get("skipped", 0)})
    lines = [f"{'NAME':<24} {'CRON':<18} {'TZ':<16} {'NEXT':<26} LAST"] + [
        f"{r['name']:<24} {r['cron'] or '?':<18} {r['tz']:<16} {('paused' if r['paused'] else r['next'] or '-'):<26} "
        f"{r['last'] or '-'}" + (f"  ({r['skipped']} skipped)" if r["skipped"] else "") for r in rows]
    _emit(args, rows, "\n".join(lines) if rows else "no schedules")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsule-nb", description="Capsule-style background tasks for Jupyter notebooks."
    )
    parser.add_argument("--home", metavar="PATH", help="the store (default: $CAPSULE_NB_HOME, else ./.capsule)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
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

    tasks = commands.add_parser("tasks", help="list runs, newest first, as a table")
    tasks.add_argument("--status", help="only runs with this status")
    tasks.add_argument("--name", help="only runs of this task")
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (0: all; default 50)")
    tasks.set_defaults(func=cmd_tasks)

    show = commands.add_parser("show", help="one run: record, messages, error, result preview")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)

    cancel = commands.add_parser("cancel", help="cancel a run (a live kernel that owns it stops it)")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)

    prune = commands.add_parser("prune", help="delete finished runs older than an age")
    prune.add_argument("--older-than", required=True, metavar="AGE", help="like 7d, 12h, 30m")
    prune.set_defaults(func=cmd_prune)

    schedules = commands.add_parser("schedules", help="the schedules defined on this store, with their next run")
    schedules.set_defaults(func=cmd_schedules)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _UsageError as exc:
        print(f"capsule-nb {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
