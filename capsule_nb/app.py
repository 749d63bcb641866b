"""App: the wiring of one store, one runtime, and the tasks and schedules defined on them.

``cpsl.task`` and friends use a default app whose store is
``$CAPSULE_NB_HOME`` or ``./.capsule``. Tests and multi-project notebooks
make their own ``App(home=...)``; apps with different homes share nothing.
Apps on the same home in one process share the store object (one writer
thread, one mirror per folder).
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from .checks import whole_number
from .collections import Collection, Database
from .cron import parse_cron, parse_tz
from .engine.runtime import Runtime, Settings
from .engine.upkeep import stored_arguments
from .handle import TaskHandle
from .notebook import kernel
from .notebook.messages import KernelDisplay
from .queries import TaskQuery
from .record import RunRecord
from .schedules import Schedule
from .session import Session, local_user
from .store import open_store
from .tasks import Task

F = TypeVar("F", bound=Callable[..., Any])

EXECUTORS = ("default", "immediate")


def _home(home: str | os.PathLike[str] | None) -> Path:
    if home is not None:
        return Path(home)
    env = os.environ.get("CAPSULE_NB_HOME")
    return Path(env) if env else Path.cwd() / ".capsule"


class App:
    """A named group of tasks with its store.

    ``executor="immediate"`` runs each submitted run to its end in the
    caller, with no threads and no timers (retries follow at once, timeouts
    are not enforced, a run scheduled for later stays ``scheduled``): a mode
    for tests of task logic, as huey's immediate mode is.
    """

    def __init__(self, name: str = "default", home: str | os.PathLike[str] | None = None, *,
                 max_threads: int = 32, keep_finished: int = 10_000, executor: str = "default"):
        if not isinstance(name, str) or not name:
            raise ValueError(f"App name must be a non-empty string, got {name!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.name = name
        self.store = open_store(_home(home))
        self._tasks: dict[str, Task] = {}
        self._schedules: dict[str, Schedule] = {}
        self.tasks = TaskQuery(self)
        user = local_user()
        self.owner_session = Session(self, id=f"owner:{user.id}", user=user)
        notebook = kernel.notebook_name()
        self.session = Session(self, id=f"notebook:{notebook}" if notebook else f"local:{user.id}", user=user)
        settings = Settings(app=name, max_threads=whole_number("max_threads", max_threads, minimum=1),
                            keep_finished=whole_number("keep_finished", keep_finished),
                            immediate=executor == "immediate")
        self.runtime = Runtime(self.store, settings, tasks=self.tasks_defined, default_session=self.owner_session,
                               session_for=self._session_for, display=KernelDisplay())
        self._closed = False
        atexit.register(self.close)
        self.runtime.recover()
        self.runtime.start_maintenance()

    def __repr__(self) -> str:
        return f"App({self.name!r}, home={str(self.store.path)!r})"

    @property
    def home(self) -> Path:
        return self.store.path

    @property
    def keep_finished(self) -> int:
        """Finished runs kept for this app; older ones are pruned (``configure`` sets it)."""
        return self.runtime.settings.keep_finished

    @property
    def max_result_bytes(self) -> int:
        """The largest pickled result kept; a bigger one keeps only its repr."""
        return self.runtime.settings.max_result_bytes

    def _session_for(self, session_id: str | None) -> Session | None:
        return self.session if session_id == self.session.id else None

    # ----------------------------------------------------------- declaring

    def task(self, fn: F | None = None, /, **options: Any) -> Any:
        """``@app.task`` or ``@app.task(retries=2, lock="report:{report_id}", ...)``."""

        def decorate(function: F) -> Task:
            task = Task(function, app=self, **options)
            self._tasks[task.name] = task  # a re-run cell replaces, never doubles
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

        def decorate(function: F) -> Schedule:
            schedule = Schedule(function, app=self, cron=cron, tz=tz, name=name, catchup=catchup)
            old = self._schedules.get(schedule.name)
            self._schedules[schedule.name] = schedule  # a re-run cell replaces, never doubles
            if old is not None:
                old.stop()
            schedule.start()
            return schedule

        return decorate

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
        record = self.store.get_run(task_id)
        return None if record is None else TaskHandle(self, task_id)

    def resubmit(self, task_id: str) -> TaskHandle:
        """Run a finished run's task again with the same arguments (a card's Retry button)."""
        record = self.store.get_run(task_id)
        if record is None:
            raise KeyError(f"no run {task_id!r} in {self.home}")
        task = self._tasks.get(record["task_name"])
        if task is None:
            raise LookupError(f"task {record['task_name']!r} is not defined in this kernel; define it to retry")
        args, kwargs = stored_arguments(self.store, record)
        return task.submit(*args, session=self._session_for(record.get("session_id")), **kwargs)

    def load_result(self, record: RunRecord) -> Any:
        return self.runtime.results.load(record)

    def collection(self, name: str) -> Collection:
        """A document collection in this app's store (the same as ``session.db[name]``)."""
        return Collection(self.store, name)

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
        try:
            self.runtime.shutdown()
        except Exception:  # at interpreter exit, best effort
            pass


_default: App | None = None
_default_lock = threading.Lock()


def default_app() -> App:
    global _default
    with _default_lock:
        if _default is None:
            _default = App()
        return _default


_UNSET: Any = object()


def configure(*, home: str | os.PathLike[str] | None = None, max_threads: int | None = None,
              max_result_bytes: int | None = None, keep_finished: int | None = None,
              cluster: Any = _UNSET) -> App:
    """Set up the default app and return it.

    ``home`` moves the default app to another store (do it before defining
    tasks); the others tune it in place: the thread pool size, the largest
    result kept (bigger ones keep only a repr), finished runs kept per app,
    and ``cluster``: a ``distributed.Client`` that ``process=True`` runs go to
    (``None``: back to this machine's worker processes).
    """
    global _default
    with _default_lock:
        if _default is None or home is not None:
            _default = App(home=home)
        app = _default
    if max_threads is not None:
        app.runtime.max_threads = whole_number("max_threads", max_threads, minimum=1)
    if max_result_bytes is not None:
        app.runtime.settings.max_result_bytes = whole_number("max_result_bytes", max_result_bytes)
    if keep_finished is not None:
        app.runtime.settings.keep_finished = whole_number("keep_finished", keep_finished)
    if cluster is not _UNSET:
        app.runtime.cluster = cluster
    return app


def task(fn: F | None = None, /, **options: Any) -> Any:
    """``@cpsl.task(retries=0, timeout=0, lock=None, retry_for=None, callback_url=None, process=False)``."""
    return default_app().task(fn, **options)


def schedule(cron: str, *, tz: str = "UTC", name: str | None = None, catchup: bool = False) -> Callable[[F], Schedule]:
    """``@cpsl.schedule("*/5 * * * *")``: 5 fields, or 6 with seconds last; ``tz`` any IANA zone."""
    return default_app().schedule(cron, tz=tz, name=name, catchup=catchup)


def get_task(task_id: str) -> TaskHandle | None:
    return default_app().get_task(task_id)


def current_session() -> Session:
    """The session code runs for: the run's own inside a task, else the notebook's."""
    from .engine.context import bound_session

    return bound_session.get() or default_app().session
