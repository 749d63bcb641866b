"""TaskHandle: a run id plus a live view of its record.

The handle holds no state of its own beyond the id, so a handle made from
``get_task(id)`` in a new kernel is as good as the one ``submit`` returned.
Waiting is event-driven: the store publishes the finished record, for runs
of this process as they change and for runs of others when a poll folds
their writes in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import weakref
from typing import TYPE_CHECKING, Any, Generator

from . import portable
from .awaitables import ReadyBool, ReadyStr, resolve
from .errors import TaskCancelled, TaskFailed
from .record import CANCELLED, COMPLETED, FINISHED

if TYPE_CHECKING:
    from .app import App


class TaskHandle:
    def __init__(self, app: "App", task_id: str, generation: int = 0):
        self._app = app
        self.task_id = task_id
        self._generation = generation
        self._final: dict[str, Any] | None = None  # the finished record, once seen: retention may prune it

    # ----------------------------------------------------------- the record

    def snapshot(self) -> dict[str, Any]:
        """The run's current record (a copy), without awaiting."""
        record = self._final or self._app.store.get_run(self.task_id)  # a finished record never changes
        if record is None:
            raise KeyError(f"run {self.task_id} is not in the store at {self._app.store.path}")
        if record["status"] in FINISHED:
            self._final = record  # records are immutable snapshots: keeping one costs no copy
        return dict(record)

    def _get(self, field: str) -> Any:
        return self.snapshot().get(field)

    @property
    def task_name(self) -> str:
        return self._get("task_name")

    @property
    def display_name(self) -> str:
        """The name the run shows under: ``submit(display_name=...)``, else the task's; "" when none was given."""
        return self._get("display_name") or ""

    @property
    def session_id(self) -> str:
        """The id of the session the run is bound to; "" for a run submitted without one (as Capsule)."""
        return self._get("session_id") or ""

    @property
    def args(self) -> Any:
        return self._get("args")

    @property
    def kwargs(self) -> Any:
        return self._get("kwargs")

    @property
    def attempt(self) -> int:
        return self._get("attempt")

    @property
    def error(self) -> str | None:
        return self._get("error")

    @property
    def created_at(self) -> dt.datetime | None:
        return _datetime(self._get("created_at"))

    @property
    def started_at(self) -> dt.datetime | None:
        return _datetime(self._get("started_at"))

    @property
    def completed_at(self) -> dt.datetime | None:
        return _datetime(self._get("completed_at"))

    # ------------------------------------------------------------- actions

    def __await__(self) -> Generator[Any, None, "TaskHandle"]:
        """``await task.submit(...)``: returns once the submit is durable in the store."""
        yield from self._app.store.flushed(self._generation).__await__()
        return self

    def status(self) -> ReadyStr:
        self._app.store.poll()
        return ReadyStr(self._get("status"))

    def cancel(self) -> ReadyBool:
        """Stop the run in whatever state it is; for a repeating schedule, stop the repetition."""
        return ReadyBool(self._app.runtime.cancel(self.task_id))

    def refresh(self) -> ReadyBool:
        """Push a running run's timeout deadline to now + timeout."""
        return ReadyBool(self._app.runtime.refresh(self.task_id))

    async def wait(self, timeout: float | None = None) -> str:
        """Wait until the run is finished; returns the final status.

        Waiting costs nothing per waiter: the store's change events wake it.
        A run another process owns reaches those events through the runtime's
        watch, one store poll per tick however many runs are waited on.
        """
        portable.note("wait_result")
        record = self.snapshot()
        if record["status"] in FINISHED:
            return record["status"]
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        loop_thread = threading.get_ident()

        def on_change(changed: dict[str, Any]) -> None:  # from whatever thread wrote
            if changed["status"] in FINISHED:
                self._final = changed
                if threading.get_ident() == loop_thread:
                    resolve(finished)
                else:
                    loop.call_soon_threadsafe(resolve, finished)

        unsubscribe = self._app.store.events.subscribe(on_change, task_id=self.task_id)
        try:
            with self._app.runtime.watch(record):
                if self.snapshot()["status"] not in FINISHED:  # it may have ended before we listened
                    await asyncio.wait_for(finished, timeout)
        except asyncio.TimeoutError:
            record = self.snapshot()
            if record["status"] not in FINISHED:
                raise TimeoutError(f"run {self.task_id} is still {record['status']} after {timeout}s") from None
        finally:
            unsubscribe()
        return self.snapshot()["status"]

    async def result(self, timeout: float | None = None) -> Any:
        """The return value; raises ``TaskFailed`` (with the task's traceback) or ``TaskCancelled``."""
        portable.note("wait_result")
        status = await self.wait(timeout)
        record = self.snapshot()
        if status == COMPLETED:
            return self._app.load_result(record)
        if status == CANCELLED:
            raise TaskCancelled(self.task_id)
        raise TaskFailed(self.task_id, status, record.get("error"), record.get("traceback"))

    # --------------------------------------------------------------- display

    def __repr__(self) -> str:
        try:
            record = self.snapshot()
        except KeyError:
            return f"<TaskHandle {self.task_id} (not in store)>"
        return f"<TaskHandle {record['task_name']} {self.task_id} {record['status']}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        from .ui.text import run_text

        printer.text(run_text(self.snapshot()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(self.task_id)


class Submitted:
    """The handles submits returned, held weakly: each learns its run's final record as it is
    published, so waiting on a run that retention pruned first still tells how it ended."""

    def __init__(self, events: Any):
        self._handles: weakref.WeakValueDictionary[str, TaskHandle] = weakref.WeakValueDictionary()
        self.close = events.subscribe(self._published)

    def add(self, handle: TaskHandle) -> TaskHandle:
        self._handles[handle.task_id] = handle
        return handle

    def _published(self, record: dict[str, Any]) -> None:
        if record["status"] in FINISHED:
            handle = self._handles.get(record["task_id"])
            if handle is not None:
                handle._final = record


def _datetime(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
