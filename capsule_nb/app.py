"""App: the wiring of one store, one runtime, and the tasks and schedules defined on them.

``cpsl.task`` and friends use a default app whose store is
``$CAPSULE_NB_HOME`` or ``./.capsule``. Tests and multi-project notebooks
make their own ``App(home=...)``; apps with different homes share nothing.
Apps on the same home in one process share the store object (one writer
thread, one mirror per folder).
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import portable as _portable
from .checks import true_or_false, whole_number
from .collections import Collection, Database
from .cron import parse_cron, parse_tz
from .engine.runtime import Runtime, Settings
from .engine.upkeep import stored_arguments
from .handle import Endings, TaskHandle
from .notebook import kernel
from .notebook.messages import KernelDisplay
from .queries import TaskQuery
from .record import RunRecord
from .schedules import Schedule
from .session import Session, local_user
from .store import open_store, retention
from .tables import TableSpec
from .tasks import Task, note_options

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("capsule_nb")

EXECUTORS = ("default", "immediate")
_TASK_POSITIONAL = ("retries", "timeout", "lock", "retry_for", "callback_url", "process")  # Capsule's order
_TASK_OPTIONS = frozenset(inspect.signature(Task).parameters) - {"fn", "app"}


def _home(home: str | os.PathLike[str] | None) -> Path:
    """The store folder ``home`` names, as the store knows it (absolute, links resolved)."""
    if home is None:
        env = os.environ.get("CAPSULE_NB_HOME")
        home = env if env else Path.cwd() / ".capsule"
    if not isinstance(home, (str, os.PathLike)) or not str(home):
        raise TypeError(f"home is the path of a store folder, not {home!r}")
    return Path(home).expanduser().resolve()


class Image:
    """Capsule's container image: ``cpsl.Image(python_packages=[...])``, and its chained
    ``.add_...(...)`` steps. Accepted so Capsule app templates run unchanged; it does
    nothing locally, where the notebook's own environment is the image."""

    def __init__(self, *args: Any, **options: Any):
        self.args = args
        self.options = options
        self.steps: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Callable[..., "Image"]:
        if not name.startswith(("add_", "with_")):
            raise AttributeError(f"'Image' object has no attribute {name!r}")

        def step(*args: Any, **options: Any) -> "Image":
            self.steps.append((name, args, options))
            return self

        return step

    def __repr__(self) -> str:
        return f"Image({', '.join(f'{k}={v!r}' for k, v in self.options.items())})  # not used locally"


class App:
    """A named group of tasks with its store.

    ``image`` (a ``cpsl.Image``) is accepted as Capsule's ``App`` takes it and
    does nothing locally. ``executor="immediate"`` runs each submitted run to its end in the
    caller, with no threads and no timers (retries follow at once, timeouts
    are not enforced, a run scheduled for later stays ``scheduled``): a mode
    for tests of task logic, as huey's immediate mode is.
    """

    def __new__(cls, name: str = "default", home: str | os.PathLike[str] | None = None, **options: Any) -> "App":
        """A re-run ``app = cpsl.App(...)`` cell gives the app it made before (same name and
        store, still open): a new one would leave the old one's schedules firing their old
        bodies beside the new ones, and its upkeep running, for the rest of the kernel."""
        same = _apps.get((str(_home(home)), name)) if isinstance(name, str) else None
        if (same is not None and type(same) is cls and not same._closed
                and same.runtime.settings.immediate == (options.get("executor") == "immediate")):
            return same
        return super().__new__(cls)

    def __init__(self, name: str = "default", home: str | os.PathLike[str] | None = None, *,
                 image: Any = None, max_threads: int | None = None, keep_finished: int | None = None,
                 executor: str = "default"):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"App name must be a non-empty string, got {name!r}")
        if "/" in name:  # (the store's keys join app and schedule names with it: "a" + "b/c" is "a/b" + "c")
            raise ValueError(f"App name cannot contain '/', got {name!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        # Every option is checked before anything changes: a bad one opens nothing, and a re-run
        # cell with one bad value leaves the app it made before as it was.
        threads = None if max_threads is None else whole_number("max_threads", max_threads, minimum=1)
        if keep_finished is not None:
            whole_number("keep_finished", keep_finished)
        if "runtime" in self.__dict__:  # the same app again (``__new__``): the cell's options apply
            self.image = image
            if threads is not None:  # (not given: as it was, not back to the default)
                self.runtime.max_threads = threads
            self._set_retention(keep_finished)
            return
        self.name = name
        self.image = image
        self.store = open_store(_home(home))
        self._tasks: dict[str, Task] = {}
        self._schedules: dict[str, Schedule] = {}
        self._pages: dict[str, Callable[..., Any]] = {}
        self.tasks = TaskQuery(self)
        self._endings = Endings(self.store)
        user = local_user()
        self.owner_session = Session(self, id=f"owner:{user.id}", user=user)
        notebook = kernel.notebook_name()
        self.session = Session(self, id=f"notebook:{notebook}" if notebook else f"local:{user.id}", user=user)
        settings = Settings(app=name, max_threads=32 if threads is None else threads,
                            immediate=executor == "immediate")
        self._set_retention(keep_finished)
        self.runtime = Runtime(self.store, settings, tasks=self.tasks_defined, default_session=self.owner_session,
                               session_for=self._session_for, display=KernelDisplay())
        self._closed = False
        _apps[(str(self.store.path), name)] = self
        atexit.register(self.close)
        kernel.on_exit(_close_all)
        self.runtime.recover()
        self.runtime.start_maintenance()

    def __repr__(self) -> str:
        return f"App({self.name!r}, home={str(self.store.path)!r})"

    def __reduce__(self) -> tuple:
        """To a worker process (a ``process=True`` run using the notebook's app): the app of
        the same name on the same store, opened there."""
        return _app_at, (self.name, str(self.home))

    @property
    def home(self) -> Path:
        return self.store.path

    def _set_retention(self, keep_finished: int | None) -> None:
        """``keep_finished`` is the app's, on its store, for every process: the one set last
        holds (a second notebook or a script opening the app with the default used to cut
        the history the first kept); not given, it is left as it is."""
        if keep_finished is not None:
            retention.keep(self.store, self.name, whole_number("keep_finished", keep_finished))

    @property
    def keep_finished(self) -> int:
        """Finished runs kept for this app; older ones are pruned (``configure`` sets it)."""
        return retention.kept(self.store, self.name)

    @property
    def max_result_bytes(self) -> int:
        """The largest pickled result kept; a bigger one keeps only its repr."""
        return self.runtime.settings.max_result_bytes

    def _session_for(self, session_id: str | None) -> Session | None:
        return self.session if session_id == self.session.id else None

    def for_run(self, record: RunRecord) -> "App":
        """The app of this process that owns ``record`` (its tasks, its runtime): the record's app on
        this store when it is defined here, else this one. Boards show every app of a store, so a
        Cancel or Retry on one must reach the runtime that runs it."""
        if record.get("app") == self.name:
            return self
        other = _apps.get((str(self.store.path), record.get("app", "")))
        return other if other is not None and not other._closed else self

    def apps_on_store(self) -> list["App"]:
        """The apps of this process on this app's store, by name (``%capsule`` lists their schedules)."""
        path = str(self.store.path)
        return sorted((a for (p, _), a in list(_apps.items()) if p == path and not a._closed), key=lambda a: a.name)

    # ----------------------------------------------------------- declaring

    def task(self, *args: Any, **options: Any) -> Any:
        """``@app.task``, ``@app.task(retries=2, lock="report:{report_id}", ...)``, or Capsule's
        options by position, ``@app.task(2, 120)``, since its SDK takes them that way."""
        fn = args[0] if args and callable(args[0]) else None  # bare @app.task (retries is never callable)
        options = _task_options(args[1:] if fn is not None else args, options)
        if fn is not None:
            _portable.note("bare_task")

        def decorate(function: F) -> Task:
            task = Task(function, app=self, **options)
            self._one_name(task.name, "task", self._schedules)
            note_options(task, options)
            old = self._tasks.get(task.name)
            self._tasks[task.name] = task  # a re-run cell replaces, never doubles
            if old is not None:
                old.replaced_by = task  # its runs that start from now on run the new body
            if task.process and self.runtime.cluster is None and not self.runtime.settings.immediate:
                self.runtime.processes.warm(1)  # the first run should not pay a process start
            self.runtime.adopt(task)  # waiting runs a dead kernel left for this task
            return task

        return decorate(fn) if fn is not None else decorate

    def schedule(self, cron: str, *, tz: str = "UTC", name: str | None = None,
                 catchup: bool = False) -> Callable[[F], Schedule]:
        """``@app.schedule("*/5 * * * *", tz="Europe/Paris")``: run a no-argument function on a cron cadence."""
        parse_cron(cron)  # a bad cron fails here, before there is a function
        parse_tz(tz)
        true_or_false(f"@schedule({cron!r}): catchup", catchup)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"@schedule({cron!r}): name must be a non-empty string, got {name!r}")
        _note_schedule(cron, tz, name, catchup)

        def decorate(function: F) -> Schedule:
            schedule = Schedule(function, app=self, cron=cron, tz=tz, name=name, catchup=catchup)
            self._one_name(schedule.name, "schedule", self._tasks)
            old = self._schedules.get(schedule.name)
            self._schedules[schedule.name] = schedule  # a re-run cell replaces, never doubles
            if old is not None:
                old.stop()
            schedule.start()
            return schedule

        return decorate

    def _one_name(self, name: str, kind: str, others: dict[str, Any]) -> None:
        """A task and a schedule of one app never share a name: their runs, kept by name, would
        be one list (each one's ``find``, ``count`` and ``runs`` giving the other's too)."""
        if name in others:
            other = "schedule" if kind == "task" else "task"
            raise ValueError(f"app {self.name!r} has a {other} named {name!r}: a {kind} of that name would share "
                             f"its runs; give one of them another name (name=...)")

    def page(self, title: str, icon: str | None = None) -> Callable[[F], F]:
        """``@app.page("Tasks", icon="layout-grid")``: a Capsule page. In a notebook, call the
        function: its result (``cpsl.ui.Page([...])``) shows its components stacked, and the
        boards in it read this app's store. ``icon`` has no effect locally."""
        if not isinstance(title, str) or not title:
            raise ValueError(f"a page needs a title, got {title!r}")

        def decorate(function: F) -> F:
            if inspect.iscoroutinefunction(function):
                async def render(*args: Any, **kwargs: Any) -> Any:
                    with _using(self):
                        return await function(*args, **kwargs)
            else:
                def render(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                    with _using(self):
                        return function(*args, **kwargs)
            page = functools.wraps(function)(render)
            page.title, page.icon = title, icon  # type: ignore[attr-defined]
            self._pages[title] = page  # a re-run cell replaces, never doubles
            return page  # type: ignore[return-value]

        return decorate

    def pages(self) -> dict[str, Callable[..., Any]]:
        return dict(self._pages)

    def registered_schedule(self, name: str) -> Schedule | None:
        return self._schedules.get(name)

    def schedules(self) -> list[Schedule]:
        return list(self._schedules.values())

    def registered(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def tasks_defined(self) -> list[Task]:
        """What this kernel can run, so what it adopts from a dead one: its tasks and its
        schedules' ticks (a tick claimed by a kernel that died before it started)."""
        return [*self._tasks.values(), *(s.task for s in self._schedules.values())]

    # --------------------------------------------------------------- runs

    def get_task(self, task_id: str) -> TaskHandle | None:
        """A handle for any run in this app's store, from this kernel or an earlier one."""
        record = self.store.get_run(_run_id(task_id))
        return None if record is None else TaskHandle(self.for_run(record), task_id)

    def resubmit(self, task_id: str) -> TaskHandle:
        """Run a finished run's task again with the same arguments (a card's Retry button)."""
        record = self.store.get_run(_run_id(task_id))
        if record is None:
            raise KeyError(f"no run {task_id!r} in {self.home}")
        owner = self.for_run(record)
        task = owner._tasks.get(record["task_name"]) if owner.name == record["app"] else None
        if task is None:
            raise LookupError(f"task {record['task_name']!r} of app {record['app']!r} is not defined in this "
                              "kernel; define it to retry")
        args, kwargs = stored_arguments(self.store, record)
        return task.submit(*args, session=owner._session_for(record.get("session_id")), **kwargs)

    def load_result(self, record: RunRecord) -> Any:
        return self.runtime.results.load(record)

    def collection(self, name: str, *, columns: list[Any] | None = None, scope: str = "app",
                   sortable: bool = False, filterable: bool = False, paginate: int = 0) -> Collection:
        """A document collection in this app's store (the same as ``session.db[name]``).

        Capsule's options are accepted: ``columns`` (names, ``cpsl.Column``s or dicts) and
        ``paginate`` shape the table a collection displays as; ``scope`` is checked, but a
        notebook has one user and one owner, so every scope is the same collection here."""
        spec = TableSpec(columns, scope, sortable, filterable, paginate)
        declared = columns is not None or paginate or sortable or filterable or scope != "app"
        return Collection(self.store, name, spec if declared else None)

    @property
    def db(self) -> Database:
        return Database(self.store)

    # ---------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Record live runs as interrupted and flush; called at exit and on unload."""
        if self._closed:
            return
        self._closed = True
        for schedule in self._schedules.values():
            schedule.stop()
        self._endings.close()
        try:
            self.runtime.shutdown()
        except Exception:  # (at exit too) not raised, so every app closes; but never passed over in silence
            log.exception("capsule_nb: app %r could not record how its live runs end in %s", self.name, self.home)


def _app_at(name: str, home: str) -> App:
    return App(name, home=home)


def _close_all() -> None:
    """The kernel is shut down or restarted: every app records its live runs as the exit
    leaves them and flushes, and the worker processes and their helpers go, all before
    ipykernel ends its children (the forkserver among them) and well before exit handlers."""
    for app in list(_apps.values()):
        app.close()
    if "capsule_nb.workers.forkserver" in sys.modules:  # (imported with the first pool: none, nothing to stop)
        from .workers.forkserver import stop_children

        stop_children()


def _note_schedule(cron: str, tz: str, name: str | None, catchup: bool) -> None:
    """Portable mode: what Capsule's ``@app.schedule(cron)`` has not."""
    if tz != "UTC":
        _portable.note("cron_tz")
    if len(str(cron).split()) == 6:
        _portable.note("cron_seconds")
    if name is not None or catchup:
        _portable.note("schedule_options")


_default: App | None = None
_default_lock = threading.Lock()
_apps: "weakref.WeakValueDictionary[tuple[str, str], App]" = weakref.WeakValueDictionary()
_in_use: contextvars.ContextVar[App | None] = contextvars.ContextVar("capsule_nb_page_app", default=None)


class _using:
    """While a page function runs, widgets made without an app belong to the page's app."""

    def __init__(self, app: App):
        self._app = app

    def __enter__(self) -> None:
        self._token = _in_use.set(self._app)

    def __exit__(self, *exc: Any) -> None:
        _in_use.reset(self._token)


def app_in_use() -> App:
    """The app a widget made without one shows: the page's inside a page function, else the default."""
    return _in_use.get() or default_app()


def default_app() -> App:
    global _default
    with _default_lock:
        if _default is None:
            _default = App()
        return _default


_UNSET: Any = object()


def configure(*, home: str | os.PathLike[str] | None = None, max_threads: int | None = None,
              max_result_bytes: int | None = None, keep_finished: int | None = None,
              cluster: Any = _UNSET, portable: bool | None = None) -> App:
    """Set up the default app and return it.

    ``home`` moves the default app to another store (do it before defining
    tasks: the app it replaces is closed when nothing was defined on it, else it
    stays, with a warning); the others tune it in place: the thread pool size, the largest
    result kept (bigger ones keep only a repr), finished runs kept per app,
    and ``cluster``: a ``distributed.Client`` that ``process=True`` runs go to
    (``None``: back to this machine's worker processes; runs in flight end where they run). ``portable=True``
    makes each capsule_nb-only extension warn once with the Capsule way to
    write it (for the whole process).
    """
    # Every value is checked before anything changes: a bad one leaves the app as it was.
    threads = None if max_threads is None else whole_number("max_threads", max_threads, minimum=1)
    result_bytes = None if max_result_bytes is None else whole_number("max_result_bytes", max_result_bytes)
    keep = None if keep_finished is None else whole_number("keep_finished", keep_finished)
    if cluster is not _UNSET and cluster is not None:
        from .workers.dask import check_client

        check_client(cluster)
    if portable is not None:
        _portable.check_portable(portable)
    global _default
    with _default_lock:
        old = _default
        if old is None or (home is not None and _home(home) != old.home):
            _default = App(home=home)
        app = _default
    if old is not None and old is not app:
        kernel.follow_default_session(old.session, app.session)
        if old.tasks_defined():  # they stay on the old store: say so, once, instead of moving them
            log.warning("capsule_nb: configure(home=%s) made a new default app; the %d task(s) defined before "
                        "it stay on %s. Call configure(home=...) before defining tasks.",
                        app.home, len(old.tasks_defined()), old.home)
        else:  # nothing was defined on it: it goes, and its maintenance of the old store with it
            old.close()
    if threads is not None:
        app.runtime.max_threads = threads
    if result_bytes is not None:
        app.runtime.settings.max_result_bytes = result_bytes
    app._set_retention(keep)
    if cluster is not _UNSET:
        app.runtime.cluster = cluster
    if portable is not None:
        _portable.set_portable(portable)
    return app


def task(*args: Any, **options: Any) -> Any:
    """``@cpsl.task(retries=0, timeout=0, lock=None, retry_for=None, callback_url=None, process=False)``."""
    return default_app().task(*args, **options)


def _task_options(args: tuple[Any, ...], options: dict[str, Any]) -> dict[str, Any]:
    """Options given by position, in the order of Capsule's ``App.task``, as keywords."""
    if len(args) > len(_TASK_POSITIONAL):
        raise TypeError(f"@task takes at most {len(_TASK_POSITIONAL)} options by position "
                        f"({', '.join(_TASK_POSITIONAL)}), got {len(args)}: {args!r}")
    for name, value in zip(_TASK_POSITIONAL, args):
        if name in options:
            raise TypeError(f"@task got {name}= twice: {value!r} by position and {options[name]!r} by name")
        options[name] = value
    unknown = sorted(options.keys() - _TASK_OPTIONS)
    if unknown:
        raise TypeError(f"@task: unknown option {unknown[0]!r}; Capsule's are {', '.join(_TASK_POSITIONAL)}, "
                        f"and capsule_nb adds {', '.join(sorted(_TASK_OPTIONS - set(_TASK_POSITIONAL)))}")
    return options


def schedule(cron: str, *, tz: str = "UTC", name: str | None = None, catchup: bool = False) -> Callable[[F], Schedule]:
    """``@cpsl.schedule("*/5 * * * *")``: 5 fields, or 6 with seconds last; ``tz`` any IANA zone."""
    return default_app().schedule(cron, tz=tz, name=name, catchup=catchup)


def _run_id(task_id: Any) -> str:
    """A run id as users pass it: the text ``handle.task_id`` is (a handle itself names the fix)."""
    if isinstance(task_id, str):
        return task_id
    hint = f"; pass its .task_id ({task_id.task_id!r})" if isinstance(task_id, TaskHandle) else ""
    raise TypeError(f"a run id is a string, not {task_id!r} ({type(task_id).__name__}){hint}")


def get_task(task_id: str) -> TaskHandle | None:
    _portable.note("get_task")
    return default_app().get_task(task_id)


def current_session() -> Session:
    """The session code runs for: the run's own inside a task, else the notebook's."""
    from .engine.context import bound_session

    return bound_session.get() or default_app().session
