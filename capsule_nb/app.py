"""App: one store, one runtime, and the registry of tasks defined against them.

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

from . import _kernel
from .collections import Collection, Database
from .handle import TaskHandle
from .queries import TaskQuery
from .runtime import Runtime
from .schedules import Schedule, parse_cron, parse_tz
from .session import Session, _local_user
from .store import Store
from .tasks import Task

F = TypeVar("F", bound=Callable[..., Any])

_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def _open_store(home: Path) -> Store:
    with _stores_lock:
        key = home.expanduser().resolve()
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(key)
        return store


def _home(home: str | os.PathLike[str] | None) -> Path:
    if home is not None:
        return Path(home)
    env = os.environ.get("CAPSULE_NB_HOME")
    return Path(env) if env else Path.cwd() / ".capsule"


class App:
    """A named group of tasks with its store."""

    def __init__(self, name: str = "default", home: str | os.PathLike[str] | None = None, *,
                 max_threads: int = 32, keep_finished: int = 10_000):
        if not isinstance(name, str) or not name:
            raise ValueError(f"App name must be a non-empty string, got {name!r}")
        self.name = name
        self.store = _open_store(_home(home))
        self.max_result_bytes = 64 * 2**20
        self.runtime = Runtime(self, max_threads=_whole("max_threads", max_threads, minimum=1))
        self._tasks: dict[str, Task] = {}
        self._schedules: dict[str, Schedule] = {}
        self.tasks = TaskQuery(self)
        user = _local_user()
        self.owner_session = Session(self, id=f"owner:{user.id}", user=user)
        notebook = _kernel.notebook_name()
        self.session = Session(self, id=f"notebook:{notebook}" if notebook else f"local:{user.id}", user=user)
        self.keep_finished = _whole("keep_finished", keep_finished)  # older finished runs are pruned
        self._closed = False
        atexit.register(self.close)
        self.runtime.recover()
        self.runtime.start_maintenance()

    def __repr__(self) -> str:
        return f"App({self.name!r}, home={str(self.store.path)!r})"

    @property
    def home(self) -> Path:
        return self.store.path

    # ----------------------------------------------------------- declaring

    def task(self, fn: F | None = None, /, **options: Any) -> Any:
        """``@app.task`` or ``@app.task(retries=2, lock="report:{report_id}", ...)``."""

        def decorate(function: F) -> Task:
            task = Task(function, app=self, **options)
            self._tasks[task.name] = task  # a re-run cell replaces, never doubles
            if task.process and self.runtime.cluster is None:
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
        return list(self._tasks.values())

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
        args, kwargs = self.runtime.stored_arguments(record)
        session = self.session if record.get("session_id") == self.session.id else None
        return task.submit(*args, session=session, **kwargs)

    def load_result(self, record: dict[str, Any]) -> Any:
        found, value = self.runtime.recent_result(record["task_id"])
        if found:
            return value
        kind = record.get("result_kind")
        if kind == "payload":
            return self.store.get_payload(record["task_id"], "result")
        if kind == "repr":
            raise ValueError(
                f"run {record['task_id']}'s result was not kept ({record.get('result_note')}); "
                f"its repr: {record.get('result_repr')}"
            )
        return record.get("result")

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
        app.runtime.max_threads = _whole("max_threads", max_threads, minimum=1)
    if max_result_bytes is not None:
        app.max_result_bytes = _whole("max_result_bytes", max_result_bytes)
    if keep_finished is not None:
        app.keep_finished = _whole("keep_finished", keep_finished)
    if cluster is not _UNSET:
        app.runtime.cluster = cluster
    return app


def _whole(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def task(fn: F | None = None, /, **options: Any) -> Any:
    """``@cpsl.task(retries=0, timeout=0, lock=None, retry_for=None, callback_url=None, process=False)``."""
    return default_app().task(fn, **options)


def schedule(cron: str, *, tz: str = "UTC", name: str | None = None, catchup: bool = False) -> Callable[[F], Schedule]:
    """``@cpsl.schedule("*/5 * * * *")``: 5 fields, or 6 with seconds last; ``tz`` any IANA zone."""
    return default_app().schedule(cron, tz=tz, name=name, catchup=catchup)


def get_task(task_id: str) -> TaskHandle | None:
    return default_app().get_task(task_id)
