"""``capsule-nb check notebook.ipynb``: the lines of a prototype that will not port to Capsule.

Reads a notebook (or a ``.py`` file) without running it and lists, cell by
cell, each capsule_nb-only extension it uses (the codes and advice of
``portable.EXTENSIONS``, which portable mode warns about at run time).
Exits 1 when it found any, 0 when the code is plain Capsule, 2 when a
file, or a cell of it, cannot be read as Python (it is named, and not checked).

It reads the code, so it sees what is written, not what runs: a task is a
function decorated with ``@<something>.task`` (or ``@task``), a handle is a
name bound to what such a task's ``submit``/``schedule``/``find`` gave, a
collection is reached through ``session.db`` or ``.collection(...)``, and the
session is named ``session``. Portable mode cannot see a missing ``await`` (the value
is only used later, if ever): this does.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from .durations import only_here
from .portable import advice
from .record import short_repr

HANDLE_CALLS = ("submit", "schedule", "find")
# Capsule's coroutines, which capsule_nb also runs without ``await``: by receiver
TASK_COROUTINES = ("submit", "schedule", "find", "count", "cancel")
HANDLE_COROUTINES = ("status", "cancel", "refresh")
SESSION_COROUTINES = ("reply", "notify", "stream", "stream_reply_from", "show_task")
COLLECTION_COROUTINES = ("insert_one", "insert_many", "find_one", "find", "update_one", "delete_one", "count")
# What takes a coroutine and runs it, so a call handed to one needs no ``await`` of its own
RUNNERS = ("gather", "create_task", "ensure_future", "run", "wait_for", "wait", "shield", "as_completed",
           "run_coroutine_threadsafe", "run_until_complete")


@dataclass(frozen=True)
class Finding:
    cell: int  # 1-based, among code cells and in order; 1 for a .py file
    line: int  # 1-based, in the cell
    code: str  # a key of ``portable.EXTENSIONS``
    source: str  # the line, stripped

    def text(self) -> str:
        return f"cell {self.cell}, line {self.line}: {self.source}\n    {advice(self.code)}"


def code_cells(path: Path) -> list[str]:
    """The code of each code cell of a notebook, or the whole of a .py file as one cell."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return [text]
    notebook = json.loads(text)
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError("it is not a notebook (a JSON object with a list of cells)")
    found = []
    for number, cell in enumerate(cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(line, str) for line in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise ValueError(f"cell {number}'s source is {short_repr(source, 40)}, not text")
        found.append(source)
    return found


# Cell magics whose body is Python, run: read as the cell's code. Others (%%bash, %%html) are no Python.
PYTHON_CELL_MAGICS = ("time", "timeit", "capture", "prun", "debug")


@dataclass(frozen=True)
class _Cell:
    tree: ast.Module | None  # None: nothing to check (a cell magic of another language), or not read
    lines: list[str]
    problem: str = ""  # why it could not be read as Python: then it is not checked, and that is said


def _parse(source: str) -> _Cell:
    """A cell as Python, top-level ``await`` allowed. IPython's own syntax (a line magic, a
    shell line, ``x?``) reads as ``pass``, so line numbers stay the cell's."""
    lines = source.splitlines()
    first = lines[0].strip() if lines else ""
    if first.startswith("%%"):
        magic = first[2:].split(maxsplit=1)
        if not magic or magic[0] not in PYTHON_CELL_MAGICS:
            return _Cell(None, lines)
        code = ["pass", *lines[1:]]
    else:
        code = list(lines)
    code = [line[: len(line) - len(line.lstrip())] + "pass" if _ipython_only(line) else line for line in code]
    try:
        tree = compile("\n".join(code), "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except (SyntaxError, ValueError) as exc:
        where = f"line {exc.lineno}: " if getattr(exc, "lineno", None) else ""
        return _Cell(None, lines, f"{where}{getattr(exc, 'msg', None) or exc}")
    return _Cell(tree, lines)


# ``obj?``, ``obj.attr??``, ``x[0]?``: IPython's help (its own pattern); a line ending in
# "?" otherwise ("# why?", "f(x)?") is no help, and stays as written.
_HELP = re.compile(r"%{0,2}(?!\d)[\w*]+(\.(?!\d)[\w*]+|\[-?[0-9]+\])*\?\??")


def _ipython_only(line: str) -> bool:
    """A line IPython reads and Python cannot: ``%magic``, ``!shell``, ``x = !ls``, ``obj?``."""
    text = line.strip()
    if text.startswith(("%", "!", "?")) or _HELP.fullmatch(text):
        return True
    target, sep, value = text.partition("=")
    return bool(sep) and target.strip().isidentifier() and value.lstrip().startswith(("%", "!"))


def unread(cells: list[str]) -> list[tuple[int, str]]:
    """The cells (1-based) that could not be read as Python, with why: they were not checked."""
    return [(number, cell.problem) for number, cell in enumerate(map(_parse, cells), start=1) if cell.problem]


def check_cells(cells: list[str], *, notebook: bool = True) -> list[Finding]:
    """Every extension used in ``cells``, in order. Tasks and handles are known across cells."""
    trees = [(cell.tree, cell.lines) for cell in map(_parse, cells)]
    functions = [fn for tree, _ in trees if tree is not None for fn in ast.walk(tree)
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and any(_decorator(d)[0] == "task" for d in fn.decorator_list)]
    tasks = {fn.name for fn in functions}
    handles = _handle_names([t for t, _ in trees if t is not None], tasks)
    parsed = [tree for tree, _ in trees if tree is not None]
    collections = {target.id for tree in parsed for node in ast.walk(tree)
                   if isinstance(node, ast.Assign) and _reaches_a_collection(node.value)
                   for target in node.targets if isinstance(target, ast.Name)}
    names = _Names(collections, _consumed(parsed), _rebinds_session(parsed), _taking_at(functions),
                   _capsule_names(parsed))
    found: list[Finding] = []
    for number, (tree, lines) in enumerate(trees, start=1):
        if tree is None:
            continue
        for line, code in sorted(set(_uses(tree, tasks, handles, names, notebook))):
            source = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            found.append(Finding(number, line, code, source))
    return found


def _decorator(node: ast.expr) -> tuple[str | None, ast.Call | None]:
    """``("task" | "schedule" | other, the call)`` for ``@x.task(...)``, ``@task``, ``@app.schedule(...)``."""
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call is not None else node
    name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else None
    return name, call


def _keywords(call: ast.Call | None) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg} if call is not None else {}


def _constant(node: ast.expr | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _receiver(call: ast.Call) -> tuple[str | None, str | None]:
    """``("t", "submit")`` for ``t.submit(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    return None, func.id if isinstance(func, ast.Name) else None


def _gives_handles(node: ast.AST, tasks: set[str], handles: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            owner, method = _receiver(sub)
            if (owner in tasks and method in HANDLE_CALLS) or method == "get_task":
                return True
        if isinstance(sub, ast.Name) and sub.id in handles:
            return True
    return False


def _handle_names(trees: list[ast.Module], tasks: set[str]) -> set[str]:
    """Names bound to handles (or lists of them), followed through ``for`` loops, to a fixed point."""
    handles: set[str] = set()
    while True:
        before = len(handles)
        for tree in trees:
            for node in ast.walk(tree):
                pairs: list[tuple[ast.AST, ast.AST]] = []
                if isinstance(node, ast.Assign):
                    pairs = [(t, node.value) for t in node.targets]
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                    pairs = [(node.target, node.value)]
                elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                    pairs = [(node.target, node.iter)]
                for target, value in pairs:
                    if _gives_handles(value, tasks, handles):
                        handles |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if len(handles) == before:
            return handles


@dataclass(frozen=True)
class _Names:
    """What the notebook's names hold, as far as a missing ``await`` goes."""

    collections: set[str]  # bound to ``app.collection(...)`` or ``session.db.x``
    consumed: set[str]  # awaited (``await c``) or handed to a runner (``gather(*coros)``) somewhere
    session_rebound: bool  # ``session`` names something else somewhere (``async with ... as session``)
    taking_at: dict[str, bool]  # task -> whether ``at=`` is its own argument: True, or only if no datetime (**kwargs)
    capsule: set[str]  # what ``.task`` and ``task`` are Capsule's on: ``cpsl``, an App, ``task`` imported from it


def _capsule_names(trees: list[ast.Module]) -> set[str]:
    """``cpsl`` (``%load_ext`` provides it), what ``capsule_nb`` or ``cpsl`` is imported as, names
    bound to an ``App(...)``, and what is imported from either (``from capsule_nb import task``):
    ``@celery_app.task`` or Prefect's ``@task`` is none of Capsule's business."""
    names = {"cpsl"}
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name in ("capsule_nb", "cpsl")}
        elif isinstance(node, ast.ImportFrom) and node.module in ("capsule_nb", "cpsl"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call) \
                and _decorator(node.value)[0] == "App":  # (``app = cpsl.App(...)``, ``app: cpsl.App = ...``)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _taking_at(functions: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> dict[str, bool]:
    """The tasks that take an argument ``at``, as ``Task._owns_at`` decides at run time: Capsule's
    ``schedule`` has no ``at=`` and hands it to such a task, which is plain Capsule code."""
    found: dict[str, bool] = {}
    for fn in functions:
        if any(a.arg == "at" for a in (*fn.args.args, *fn.args.kwonlyargs)):
            found[fn.name] = True
        elif fn.args.kwarg is not None:
            found[fn.name] = False
    return found


def _consumed(trees: list[ast.Module]) -> set[str]:
    found: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Await) and isinstance(node.value, ast.Name):
                found.add(node.value.id)
            elif isinstance(node, ast.Call) and _receiver(node)[1] in RUNNERS:
                for arg in node.args:
                    arg = arg.value if isinstance(arg, ast.Starred) else arg
                    if isinstance(arg, ast.Name):
                        found.add(arg.id)
    return found


def _rebinds_session(trees: list[ast.Module]) -> bool:
    """Whether ``session`` is bound by an assignment, ``with ... as`` or ``for`` (not the notebook's)."""
    for tree in trees:
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.optional_vars] if isinstance(node, ast.withitem) and node.optional_vars
                       else [node.target] if isinstance(node, (ast.For, ast.AsyncFor, ast.AnnAssign)) else [])
            if any(isinstance(t, ast.Name) and t.id == "session" for t in targets):
                value = getattr(node, "value", None)
                if not (isinstance(value, ast.Call) and _receiver(value)[1] == "current_session"):
                    return True
    return False


def _uses(tree: ast.Module, tasks: set[str], handles: set[str], names: _Names,
          notebook: bool) -> Iterator[tuple[int, str]]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                yield from _decorator_uses(decorator, notebook, names.capsule)
        elif isinstance(node, ast.Call):
            yield from _call_uses(node, tasks, handles, names.taking_at)
            if _capsule_coroutine(node, tasks, handles, names) and not _awaited(node, parents, names.consumed):
                yield node.lineno, "no_await"
            if _beyond_capsules_collections(node, _collection_method(node, names)):
                yield node.lineno, "doc_options"


def _reaches_a_collection(node: ast.expr) -> bool:
    """``app.collection("x")``, ``session.db.x``, ``session.db["x"]`` (not pymongo's ``client.db.x``)."""
    reached = ast.unparse(node)
    return reached.startswith(("session.db.", "session.db[")) or ".collection(" in reached


def _capsule_coroutine(call: ast.Call, tasks: set[str], handles: set[str], names: _Names) -> bool:
    """Whether ``call`` is one of Capsule's coroutine methods, as far as the code says."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    owner, method = _receiver(call)
    if method in TASK_COROUTINES and owner in tasks or method in HANDLE_COROUTINES and owner in handles:
        return True
    if method in SESSION_COROUTINES and owner == "session":
        return not names.session_rebound
    return method in COLLECTION_COROUTINES and _collection_method(call, names) is not None


def _collection_method(call: ast.Call, names: _Names) -> str | None:
    """The method of a call on one of Capsule's collections, as far as the code says; else None."""
    owner, method = _receiver(call)
    if method in COLLECTION_COROUTINES and isinstance(call.func, ast.Attribute) \
            and (owner in names.collections or _reaches_a_collection(call.func.value)):
        return method
    return None


def _beyond_capsules_collections(call: ast.Call, method: str | None) -> bool:
    """``find(sort="x")`` or a list of pairs (Capsule's takes a dict), ``update_one(upsert=...)``."""
    options = _keywords(call)
    sort = options.get("sort", call.args[3] if method == "find" and len(call.args) > 3 else None)
    if method == "find" and sort is not None:
        return isinstance(sort, (ast.List, ast.Tuple)) or isinstance(_constant(sort), str)
    return method == "update_one" and "upsert" in options


def _awaited(call: ast.Call, parents: dict[ast.AST, ast.AST], consumed: set[str]) -> bool:
    """Awaited, handed to what runs coroutines (``gather``, ``create_task``), an argument of an
    awaited call, returned (its caller may await it), or bound to a name that is awaited or
    handed on (``coros = [...]`` then ``gather(*coros)``); not a bare statement, nor a print."""
    node: ast.AST = call
    while (parent := parents.get(node)) is not None:
        if isinstance(parent, ast.Await) or isinstance(parent, (ast.Return, ast.Lambda)):
            return True
        if isinstance(parent, ast.Assign):
            return any(isinstance(t, ast.Name) and t.id in consumed for t in parent.targets)
        if isinstance(parent, ast.Call) and node is not parent.func:
            if _receiver(parent)[1] in RUNNERS or isinstance(parents.get(parent), ast.Await):
                return True
        if isinstance(parent, ast.stmt):
            return False
        node = parent
    return False


def _decorator_uses(decorator: ast.expr, notebook: bool, capsule: set[str]) -> Iterator[tuple[int, str]]:
    kind, call = _decorator(decorator)
    options = _keywords(call)
    line = decorator.lineno
    if kind == "task":
        on = decorator.value if isinstance(decorator, ast.Attribute) else decorator
        if call is None and isinstance(on, ast.Name) and on.id in capsule:
            yield line, "bare_task"
        if {"retry_delay", "backoff"} & options.keys():
            yield line, "retry_policy"
        if "on_lock" in options:
            yield line, "on_lock"
        if {"name", "display_name", "memory_limit"} & options.keys():
            yield line, "task_options"
        if isinstance(_constant(options.get("timeout")), str):
            yield line, "timeout_text"
        if notebook and _constant(options.get("process")) is True:
            yield line, "process_cell"
    elif kind == "schedule" and call is not None:
        if "tz" in options and _constant(options["tz"]) != "UTC":
            yield line, "cron_tz"
        cron = _constant(call.args[0]) if call.args else _constant(options.get("cron"))
        if isinstance(cron, str) and len(cron.split()) == 6:
            yield line, "cron_seconds"
        if {"name", "catchup"} & options.keys():
            yield line, "schedule_options"


def _call_uses(call: ast.Call, tasks: set[str], handles: set[str],
               taking_at: dict[str, bool]) -> Iterator[tuple[int, str]]:
    owner, method = _receiver(call)
    line = call.lineno
    if owner in tasks and method in ("submit", "schedule"):
        options = _keywords(call)
        if method == "submit" and call.args:
            yield line, "positional"
        if method == "schedule":
            if "at" in options and not _the_tasks_at(options["at"], taking_at.get(owner)):
                yield line, "schedule_at"
            delays = [*call.args[:1], *(v for k, v in options.items() if k in ("when", "delay"))]
            if any(type(_constant(d)) in (int, float, str) and only_here(_constant(d)) for d in delays):
                yield line, "delay_number"
    elif method in ("wait", "result") and isinstance(call.func, ast.Attribute):
        if _gives_handles(call.func.value, tasks, handles):
            yield line, "wait_result"
    elif method in ("progress", "log") and owner == "session":
        yield line, "progress_log"
    if method == "get_task":
        yield line, "get_task"


def _the_tasks_at(value: ast.expr, taking: bool | None) -> bool:
    """Whether ``schedule(at=value)`` hands ``value`` to the task (see ``_taking_at``): always
    when the task names ``at``; with only ``**kwargs``, when ``value`` is written as no datetime."""
    return taking is True or taking is False and isinstance(value, (ast.Constant, ast.JoinedStr, ast.Dict, ast.List))


def cmd_check(args: argparse.Namespace) -> int:
    """``capsule-nb check PATH...``: list the capsule_nb-only extensions, cell by cell."""
    reports = []
    for name in args.paths:
        path = Path(name)
        try:
            cells = code_cells(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"capsule-nb check: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        notebook = path.suffix == ".ipynb"
        reports.append((path, notebook, check_cells(cells, notebook=notebook), unread(cells)))
    if getattr(args, "json", False):
        print(json.dumps([{"path": str(path), "python": notebook or not not_read,
                           "extensions": [{**asdict(f), "advice": advice(f.code)} for f in found],
                           "not_checked": [{"cell": number, "why": problem} for number, problem in not_read]}
                          for path, notebook, found, not_read in reports], indent=2))
    else:
        for path, notebook, found, not_read in reports:
            _say(path, notebook, found, not_read)
    total = sum(len(found) for _, _, found, _ in reports)
    return 1 if total else 2 if any(not_read for *_, not_read in reports) else 0


def _say(path: Path, notebook: bool, found: list[Finding], not_read: list[tuple[int, str]]) -> None:
    if not notebook and not_read:
        print(f"{path}: not checked: it is not Python ({not_read[0][1]})")
        return
    if found:
        print(f"{path}: {len(found)} capsule_nb-only extension(s) in {len({f.cell for f in found})} cell(s)")
    elif not_read:
        print(f"{path}: no capsule_nb-only extensions in the cells that could be read")
    else:
        print(f"{path}: plain Capsule code, no capsule_nb-only extensions")
    for finding in found:
        print("  " + finding.text())
    for number, problem in not_read:
        print(f"  cell {number} was not checked: it is not Python ({problem})")


def add_parser(commands: Any) -> None:
    check = commands.add_parser(
        "check", help="list the capsule_nb-only extensions a notebook uses, cell by cell (exit 1 if any)",
        description="Read notebooks (or .py files) without running them and list each capsule_nb-only "
                    "extension they use, with the way to write it for Capsule. Exit code 1 when any is found.",
    )
    check.add_argument("paths", nargs="+", metavar="NOTEBOOK")
    check.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text")
    check.set_defaults(func=cmd_check)

