"""``@task``: a function plus its run policy, checked once at decoration.

Everything a submit could get wrong is checked here or at submit: the lock
template against the signature, the retry policy, the arguments against
the signature. A task that is going to fail because of how it was declared
or called never gets as far as a run record.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import inspect
import math
import random
import re
import sys
import time
import urllib.parse
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import portable
from .awaitables import ReadyInt, ReadyList
from .checks import true_or_false, whole_number
from .durations import MAX_DELAY, only_here, parse_delay, parse_when
from .engine.context import current_run
from .engine.executors import LoopClosed
from .handle import TaskHandle
from .notebook import kernel
from .queries import TaskQuery
from .session import Session
from .store.rows import CELL_REPEATS
from .workers.outcome import WorkerCrashed

if TYPE_CHECKING:
    from .app import App

ON_LOCK = ("join", "reject", "queue")
_UNKEPT_WARNED: set[str] = set()  # tasks told their runs' arguments cannot be kept
MAX_RETRY_DELAY = 3600.0  # the cap of exponential backoff
_REQUIRED = object()  # a parameter without a default, in ``_plain_params``


class Task:
    """A decorated function. ``await`` a call to run it inline; ``submit``/``schedule`` to run in the background."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        app: "App",
        retries: int = 0,
        timeout: float = 0,
        lock: str | None = None,
        retry_for: Iterable[type[BaseException]] | type[BaseException] | None = None,
        callback_url: str | None = None,
        process: bool = False,
        retry_delay: float | str | dt.timedelta = 0,
        backoff: float = 1.0,
        name: str | None = None,
        on_lock: str = "join",
        display_name: str | None = None,
        memory_limit: int | str | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {fn!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"@task: name must be a non-empty string, got {name!r}")
        self.fn = fn
        self.app = app
        self.name = name or getattr(fn, "__name__", None) or repr(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@task({self.name}): a task is a function or an async function, not a generator "
                            "function, whose body would never run (return a list instead)")
        if display_name is not None and not isinstance(display_name, str):
            raise TypeError(f"@task({self.name}): display_name must be a string, got {display_name!r}")
        self.display_name = display_name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.retries = whole_number(f"@task({self.name}): retries", retries)
        self.timeout = parse_delay(timeout, what="timeout") if timeout else 0.0
        self.retry_delay = parse_delay(retry_delay, what="retry_delay") if retry_delay else 0.0
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 1 <= backoff < math.inf:
            raise ValueError(f"@task({self.name}): backoff must be a number >= 1, got {backoff!r}")
        self.backoff = float(backoff)
        self.retry_for = _exception_types(retry_for, self.name)
        if on_lock not in ON_LOCK:
            raise ValueError(f"@task({self.name}): on_lock must be one of {ON_LOCK}, got {on_lock!r}")
        self.on_lock = on_lock
        if callback_url not in (None, "") and not _web_address(callback_url):
            raise ValueError(f"@task({self.name}): callback_url must be an http(s) URL with a host, "
                             f"got {callback_url!r}")
        self.callback_url = callback_url or None  # "" is no callback, as lock="" is no lock
        self.process = true_or_false(f"@task({self.name}): process", process)
        if memory_limit is not None and not self.process:
            raise ValueError(f"@task({self.name}): memory_limit needs process=True")
        self.memory_limit = _parse_size(memory_limit, self.name) if memory_limit is not None else None
        self.signature = inspect.signature(fn)
        if next(iter(self.signature.parameters), None) in ("self", "cls"):  # it would fail at every submit
            raise TypeError(f"@task({self.name}): a method of a class is no task here (Capsule's @app.cls "
                            f"classes are not supported); define {self.name} as a function")
        self.session_param = _session_param(self.signature)
        self.var_keyword = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        self._plain_params = _plain_params(self.signature, self.session_param)
        if lock is not None and not isinstance(lock, str):
            raise TypeError(f"@task({self.name}): lock must be a template string, got {lock!r}")
        self.lock = lock or None  # "" is no lock, as in Capsule
        if self.lock is not None:
            _check_lock_template(lock, self.signature, self.name)
        self.replaced_by: Task | None = None  # set when a re-run cell defines the name again
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<capsule task {self.name!r}>"

    def newest(self) -> "Task":
        """The definition now in force under this name: a re-run cell's edited body is what
        runs that start later (queued, scheduled, retried, a series' next) use, as Capsule's
        runner looks the handler up by name at each dispatch."""
        task = self
        while task.replaced_by is not None:
            task = task.replaced_by
        return task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``await task(x=1)``: run the function inline, no queue and no handle, as Capsule's
        task descriptor does. The call is always awaitable; a sync function runs in the
        loop's executor, so it does not block the loop. The plain function is ``task.fn``."""
        if self.is_async:
            return self.fn(*args, **kwargs)
        return _in_executor(functools.partial(self.fn, *args, **kwargs))

    # ------------------------------------------------------------- running

    def submit(self, *args: Any, session: "Session | None" = None, display_name: str | None = None,
               **kwargs: Any) -> TaskHandle:
        """Start a run now. Returns its handle at once; ``await`` it to wait until it is durable.

        ``display_name`` names this run on its card and the board (Capsule's ``submit`` has it).
        A Session given first is the session, as Capsule's ``submit(session, ...)`` takes it."""
        if args and _is_session(args[0]):
            if session is not None:
                raise TypeError(f"{self.name}.submit(): session was provided twice")  # (the SDK's words)
            session, args = args[0], args[1:]
        return self._submit(args, kwargs, session=session, display_name=display_name)

    def schedule(
        self,
        when: str | float | dt.timedelta | None = None,
        *,
        delay: str | float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
        session: "Session | None" = None,
        display_name: str | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        """Run later (``delay="5m"``, ``at=datetime``) or repeatedly (``"every 5m"``); told no
        time (``delay=None``), at once, as in Capsule.

        A session given first is the session, as in Capsule's older ``schedule(session, delay=...)``,
        which its SDK still takes."""
        if _is_session(when):
            if session is not None:
                raise TypeError(f"{self.name}.schedule(): session was provided twice")  # (the SDK's words)
            when, session = None, when
        if at is not None and self._owns_at(at):  # Capsule's schedule has no at=: it goes to the task
            kwargs, at = {**kwargs, "at": at}, None
        if when is not None and delay is not None:
            raise ValueError(f"{self.name}.schedule(): provide either when or delay, not both")  # (the SDK's)
        first_delay, every = parse_when(when if delay is None else delay)  # (the SDK reads "every 5m" in both)
        if at is not None:
            if first_delay is not None:
                raise ValueError(f"{self.name}.schedule(): provide either at or a delay, not both")
            if not isinstance(at, dt.datetime):
                raise TypeError(f"{self.name}.schedule(): `at` must be a datetime, got {at!r}")
            start = at.timestamp()
            if start - time.time() > MAX_DELAY:  # (as a delay: its date no longer fits a datetime here)
                raise ValueError(f"{self.name}.schedule(): `at` is at most 100 years ahead, got {at!r}")
        elif first_delay is not None:
            start = time.time() + first_delay
        elif every is not None:
            start = time.time() + every
        else:  # Capsule's SDK then sends no time: the run is a submit's, pending and due at once
            start = None
        _note_when(when, delay, at)  # (once they are good: a bad one is an error, not a warning as well)
        handle = self._submit((), kwargs, session=session, display_name=display_name, start_at=start, every=every)
        if every is not None:
            handle._speaks_for_series = True
            if current_run.get() is None:
                self._replace_the_cells_earlier_repeats(handle.task_id)
        return handle

    def _owns_at(self, value: Any) -> bool:
        """Whether ``at=`` is the task's argument, as Capsule code means it: the task has a
        parameter ``at``, or takes ``**kwargs`` and ``value`` is no datetime (no start time)."""
        named = self.signature.parameters.get("at")
        if named is not None and named.kind not in (named.VAR_POSITIONAL, named.POSITIONAL_ONLY):
            return True
        return self.var_keyword is not None and not isinstance(value, dt.datetime)

    def _replace_the_cells_earlier_repeats(self, series: str) -> None:
        """A notebook cell that starts a repeat, run again (edited, or after a restart and "Run
        all"), replaces the repeats of this task its earlier run started, as a re-run cell
        replaces the schedule it defines: before, each run of the cell added a series. The
        repeats one run of the cell starts (a loop over regions) all stay. Without a cell id
        (a script, the classic notebook) each call starts a repeat of its own."""
        target = kernel.cell_target()
        cell = kernel.notebook_cell(target)
        if cell is None:
            return
        execution = kernel.cell_id(target)
        earlier: list[str] = []

        def note(row: dict[str, Any] | None) -> dict[str, Any]:  # (a row of another shape reads as None)
            nonlocal earlier
            row = row or {}
            started = [s for s in row.get("series") or () if type(s) is str] if type(row.get("series")) is list else []
            if row.get("execution") == execution:
                return {"execution": execution, "series": [*started, series]}
            earlier = started
            return {"execution": execution, "series": [series]}

        self.app.store.update_value(f"{CELL_REPEATS}{cell}/{self.app.name}/{self.name}", note)
        for old in earlier:
            self.app.runtime.cancel_series({"series": old})

    def _submit(self, args: tuple, kwargs: dict, *, session: "Session | None", display_name: str | None,
                **when: Any) -> TaskHandle:
        if args:
            portable.note("positional")
        params = self.bind(args, kwargs)
        if session is not None and not isinstance(getattr(session, "id", None), str):
            raise TypeError(f"{self.name}.submit(): session must be a Session (a handler's, or "
                            f"cpsl.current_session()), got {session!r}")
        if display_name is not None and not isinstance(display_name, str):
            raise TypeError(f"{self.name}.submit(): display_name must be a string, got {display_name!r}")
        extra = {"display_name": display_name} if display_name else None
        run = current_run.get()  # a submit from inside a run shows under the cell that run shows under
        target = getattr(run, "target", None) if run is not None else kernel.cell_target()
        record, gen = self.app.runtime.submit(
            self, args, kwargs, params, session=session, target=target, extra=extra, **when
        )
        if "args_payload" in record:  # (only a run whose arguments are not all JSON has it)
            self._note_arguments(record)
        return self.app._endings.add(TaskHandle(self.app, record["task_id"], gen))

    def _note_arguments(self, record: dict[str, Any]) -> None:
        portable.note("json_args")
        if not record["args_payload"] and self.name not in _UNKEPT_WARNED:
            _UNKEPT_WARNED.add(self.name)
            warnings.warn(f"{self.name}: the arguments of run {record['task_id']} are neither JSON nor picklable, so "
                          "the store cannot keep them: the run goes ahead in this kernel, but if the kernel dies "
                          "first, no other kernel can resume it (it fails saying so). Said once per task.",
                          RuntimeWarning, stacklevel=4)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults included; a TypeError names a bad one.

        What lands in ``**kwargs`` is spread out by name, so a lock template and
        ``find(user_id=...)`` see a submit's keywords as Capsule does."""
        if self._plain_params is not None:  # on the submit path: Signature.bind costs ~10 µs
            names, defaults, required = self._plain_params
            if not kwargs and len(args) == len(names):  # every parameter given by position
                return dict(zip(names, args))
            params = {**defaults, **dict(zip(names, args)), **kwargs} if args else {**defaults, **kwargs}
            if len(args) <= len(names) and params.keys() == defaults.keys() \
                    and not (args and kwargs.keys() & names[: len(args)]) \
                    and not (required and any(params[name] is _REQUIRED for name in required)):
                return params  # else Signature.bind says what is wrong
        extra = {self.session_param: None} if self.session_param and self.session_param not in kwargs else {}
        try:
            bound = self.signature.bind(*args, **kwargs, **extra)
        except TypeError as exc:
            raise TypeError(f"{self.name}.submit(): {exc}") from None
        bound.apply_defaults()
        params = {k: v for k, v in bound.arguments.items() if k not in (self.session_param, self.var_keyword)}
        if self.var_keyword:
            params.update(bound.arguments.get(self.var_keyword) or {})
        return params

    def invoke(self, args: tuple, kwargs: dict, session: "Session") -> Any:
        """Call the function for a run, handing the session to a ``session`` parameter."""
        if self.session_param:
            kwargs = {**kwargs, self.session_param: session}
        return self.fn(*args, **kwargs)

    def lock_key(self, params: dict[str, Any]) -> str | None:
        """The template filled from the call by Capsule's rule: each ``{name}`` is ``str()`` of
        that argument (with ``**kwargs``, a keyword not given reads as ""); all else is literal."""
        if self.lock is None:
            return None
        return _PLACEHOLDER.sub(lambda m: str(params.get(m.group(1), "")), self.lock)

    # ---------------------------------------------------------- retry policy

    def should_retry(self, exc: BaseException) -> bool:
        """Capsule's rule: ``retry_for`` names exact types, so a subclass of a listed error
        (``ConnectionRefusedError`` of ``ConnectionError``) fails at once; list it too. An
        attempt that was interrupted (a worker killed by a signal, a closing loop) did not
        fail by itself: it is retried whatever ``retry_for`` says, as Capsule's runner does."""
        if not isinstance(exc, Exception):
            return False
        if isinstance(exc, LoopClosed) or isinstance(exc, WorkerCrashed) and getattr(exc, "by_signal", False):
            return True
        return self.retry_for is None or type(exc) in self.retry_for

    def retry_wait(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``: exponential, capped, with equal jitter."""
        if not self.retry_delay:
            return 0.0
        base = min(MAX_RETRY_DELAY, self.retry_delay * self.backoff ** max(0, attempt - 1))
        return base / 2 + random.uniform(0, base / 2) if self.backoff > 1 else base

    # -------------------------------------------------------------- queries

    @property
    def _query(self) -> TaskQuery:
        return TaskQuery(self.app, task_name=self.name)

    def find(self, status: str | None = None, session_id: str | None = None, limit: int = 100, offset: int = 0,
             **kwarg_filters: Any) -> ReadyList:
        """Runs of this task, newest first (use plainly or ``await``)."""
        return self._query.find(status=status, session_id=session_id, limit=limit, offset=offset, **kwarg_filters)

    def count(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        return self._query.count(status=status, session_id=session_id, **kwarg_filters)

    def cancel(self, status: str | None = None, session_id: str | None = None, **kwarg_filters: Any) -> ReadyInt:
        """Cancel matching unfinished runs; returns how many."""
        return self._query.cancel(status=status, session_id=session_id, **kwarg_filters)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_size(value: int | str, name: str) -> int:
    """Bytes from an int or "512MB" / "2GiB": at least one, and no more than an address space holds."""
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match:
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    else:
        raise ValueError(f"@task({name}): memory_limit must be bytes or like '512MB', got {value!r}")
    if not 0 < size < 2**63:
        raise ValueError(f"@task({name}): memory_limit must be from 1 byte to 8 EiB, got {value!r}")
    return size


def _plain_params(signature: inspect.Signature, session_param: str | None) -> tuple[tuple, dict, tuple] | None:
    """For a signature of plain parameters (no ``*args``, ``**kwargs``, keyword- or
    positional-only ones): their names, a dict of them in order holding the defaults
    (``_REQUIRED`` where none), which ``bind`` fills without ``Signature.bind``, and the
    names of those without a default. None otherwise."""
    params = [p for name, p in signature.parameters.items() if name != session_param]
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params) or (
            session_param is not None and list(signature.parameters).index(session_param) < len(params)):
        return None
    defaults = {p.name: (_REQUIRED if p.default is p.empty else p.default) for p in params}
    return tuple(defaults), defaults, tuple(name for name, value in defaults.items() if value is _REQUIRED)


def _session_param(signature: inspect.Signature) -> str | None:
    for name, param in signature.parameters.items():
        annotation = param.annotation
        # With ``from __future__ import annotations`` the annotation is the text "cpsl.Session | None".
        if name == "session" or annotation is Session or "Session" in str(annotation):
            return name
    return None


def _exception_types(value: Any, name: str) -> tuple[type[BaseException], ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, (type, str, bytes)) else value  # a name is no list of letters
    try:
        items = tuple(items)
    except TypeError:
        items = (value,)
    bad = [x for x in items if not (isinstance(x, type) and issubclass(x, BaseException))]
    if bad:
        raise TypeError(f"@task({name}): retry_for must be exception types, got {bad[0]!r}")
    return items or None  # empty: not set, as Capsule's runner reads it (every failure retries)


def _is_session(value: Any) -> bool:
    """A Session where Capsule takes one first (``submit(session, ...)``); a task's own
    argument that merely has an ``id`` is none."""
    return isinstance(value, Session)


async def _in_executor(call: Callable[[], Any]) -> Any:
    """A sync task called inline: in the loop's executor, with the caller's context (its run, its session)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(None, context.run, call)


def note_options(task: Task, options: dict[str, Any]) -> None:
    """Portable mode: the ``@task`` options a user gave that Capsule's decorator has not."""
    if {"retry_delay", "backoff"} & options.keys():
        portable.note("retry_policy")
    if "on_lock" in options:
        portable.note("on_lock")
    if {"name", "display_name", "memory_limit"} & options.keys():
        portable.note("task_options")
    if isinstance(options.get("timeout"), (str, dt.timedelta)):
        portable.note("timeout_text")
    if task.process and getattr(task.fn, "__module__", None) == "__main__" and _in_ipython():
        portable.note("process_cell")


def _in_ipython() -> bool:
    """A cell's ``__main__``, not a script's (Capsule imports a script's functions as they are)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None


def _web_address(url: Any) -> bool:
    """An http(s) URL with a host (and a port that can be), as ``urllib`` will post to."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        return bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # "[::1" (a bracket not closed), a port past 65535
        return False


def _note_when(when: Any, delay: Any, at: Any) -> None:
    """Portable mode: the ways to say when that Capsule's ``schedule`` has not."""
    if not portable.is_portable():
        return  # (``only_here`` parses the delay again: not on every schedule() when nobody asked)
    if at is not None:
        portable.note("schedule_at")
    if only_here(when) or only_here(delay):
        portable.note("delay_number")


_PLACEHOLDER = re.compile(r"\{(\w+)\}")  # what Capsule's runner fills in a lock template
_BRACED = re.compile(r"\{[^{}]*\}")


def _check_lock_template(template: str, signature: inspect.Signature, name: str) -> None:
    """Each ``{name}`` must be a parameter (unless the function takes ``**kwargs``). Other
    braces (``{x.id}``, ``{x!r}``) stay as written, as in Capsule: said once, here."""
    literal = [b for b in _BRACED.findall(template) if not _PLACEHOLDER.fullmatch(b)]
    literal += [repr(brace) for brace in "{}" if brace in _BRACED.sub("", template)]  # one left open: "x:{a"
    if literal:
        warnings.warn(f"@task({name}): lock {template!r} keeps {', '.join(literal)} as written: only "
                      f"{{name}} placeholders are filled from the arguments (Capsule's rule)",
                      stacklevel=portable.user_level())
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return  # filled from the submit's keywords, as Capsule does
    for field in _PLACEHOLDER.findall(template):
        if field not in signature.parameters:
            raise ValueError(
                f"@task({name}): lock {template!r} names {{{field}}}, which is not a parameter of "
                f"{name}{signature}"
            )
