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
import heapq
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any, Coroutine, Generator

from . import portable
from .awaitables import ReadyBool, ReadyStr, Steps, resolve
from .durations import parse_delay
from .errors import TaskCancelled, TaskFailed
from .queries import newest_in_series
from .record import CANCELLED, COMPLETED, FINISHED

if TYPE_CHECKING:
    from .app import App


_SWEEP_FROM = 4096  # handles held before the first sweep of dropped ones
ANSWER_SECONDS = 2.0  # how long an awaited cancel of another process's run waits for its owner


class TaskHandle(Steps):
    __slots__ = ("_app", "task_id", "_generation", "_final", "_steps", "_speaks_for_series", "__weakref__")

    def __init__(self, app: "App", task_id: str, generation: int = 0):
        self._app = app
        self.task_id = task_id
        self._generation = generation
        self._final: dict[str, Any] | None = None  # the finished record, once seen: retention may prune it
        self._steps = None
        self._speaks_for_series = False  # the handle ``schedule("every ...")`` gave: its status is the series'

    # ----------------------------------------------------------- the record

    def snapshot(self) -> dict[str, Any]:
        """The run's current record (a copy), without awaiting."""
        return dict(self._record())

    def _record(self) -> dict[str, Any]:
        """The store's snapshot itself: records are immutable, so reading one needs no copy."""
        record = self._final or self._app.store.get_run(self.task_id)  # a finished record never changes
        if record is None:
            raise KeyError(f"run {self.task_id} is not in the store at {self._app.store.path}")
        if record["status"] in FINISHED:
            self._final = record
        return record

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

    # The times are ISO 8601 text in UTC, "" until there is one, as Capsule's handles give them
    # (Capsule code slices them and stores them in documents); ``snapshot()`` has the numbers.

    @property
    def created_at(self) -> str:
        return _iso(self._get("created_at"))

    @property
    def started_at(self) -> str:
        return _iso(self._get("started_at"))

    @property
    def completed_at(self) -> str:
        return _iso(self._get("completed_at"))

    # ------------------------------------------------------------- actions

    def __await__(self) -> Generator[Any, None, "TaskHandle"]:
        """``await task.submit(...)``: returns once the submit is durable in the store."""
        yield from self._app.store.flushed(self._generation).__await__()
        return self

    def status(self) -> ReadyStr:
        """The run's status. The handle ``schedule("every ...")`` gave, once its run has ended,
        says its series' (the newest run's), as its card does: Capsule's server queues the one
        task again after each run, so "completed" would say the series is over. A handle
        ``find`` gives of a run of the series says that run's own."""
        self._app.store.poll()
        record = self._record()
        if self._speaks_for_series and record["status"] in FINISHED:
            record = newest_in_series(self._app.store, record) or record
        return ReadyStr(record["status"])

    def cancel(self) -> ReadyBool:
        """Stop the run in whatever state it is; for a repeating schedule, stop the repetition.

        A run another live process owns is only asked, and its owner answers at its next pass:
        awaited, as Capsule code awaits the call, the answer comes back with it (up to
        ``ANSWER_SECONDS``), so the status read next says ``cancelled``, as in Capsule, where
        the server has marked the run by then."""
        runtime = self._app.runtime
        here = runtime.holder(self.task_id) is not None
        asked = runtime.cancel(self.task_id)
        return ReadyBool(asked) if here or not asked else _Answered(asked, self._answer)

    async def _answer(self) -> None:
        try:
            await self._wait(ANSWER_SECONDS)
        except TimeoutError:  # its owner is slow to stop it (a thread blocked in a call): asked is all we know
            pass

    def refresh(self) -> ReadyBool:
        """Push a running run's timeout deadline to now + timeout."""
        return ReadyBool(self._app.runtime.refresh(self.task_id))

    def wait(self, timeout: float | str | None = None) -> Coroutine[Any, Any, str]:
        """Wait until the run is finished; returns the final status.

        A plain method giving a coroutine, so that portable mode's warning names the
        caller's line and a bad ``timeout`` is an error at the call, also when the
        coroutine is handed to ``asyncio.run`` or ``create_task``, which await it later
        from frames of their own.
        """
        portable.note("wait_result")
        return self._wait(None if timeout is None else parse_delay(timeout, what="timeout"))

    async def _wait(self, timeout: float | None) -> str:
        """A waiter costs one entry in the app's ``Endings``, which hears every
        finished record the store publishes. A run another process owns reaches
        those events through the runtime's watch, one store poll per tick however
        many runs are waited on."""
        if self._final is not None:
            return self._final["status"]
        endings = self._app._endings
        ended = endings.expect(self.task_id)  # listening before looking: an ending meanwhile is heard
        deadlines = None
        try:
            record = self._record()
            if record["status"] not in FINISHED:
                with self._app.runtime.watch(record):
                    deadlines = endings.deadline(ended, timeout)
                    record = await ended
        except asyncio.TimeoutError:
            record = self._record()
            if record["status"] not in FINISHED:
                raise TimeoutError(f"run {self.task_id} is still {record['status']} after {timeout:g}s") from None
        finally:
            endings.forget(self.task_id, ended, deadlines)
        self._final = record
        return record["status"]

    def result(self, timeout: float | str | None = None) -> Coroutine[Any, Any, Any]:
        """The return value; raises ``TaskFailed`` (with the task's traceback) or ``TaskCancelled``.
        A plain method giving a coroutine, as ``wait``."""
        portable.note("wait_result")
        return self._result(None if timeout is None else parse_delay(timeout, what="timeout"))

    async def _result(self, timeout: float | None) -> Any:
        status = await self._wait(timeout)
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
        """What the run was doing, and when that was: text does not change as the run goes.
        In a list or a dict (the printer holds more than this handle) it is one line, its repr:
        a run's lines and "(as of …)" after each item made a list of handles hard to read."""
        from .ui.live import as_of
        from .ui.text import run_text

        if len(getattr(printer, "stack", ())) > 1:
            printer.text(repr(self))
            return
        try:
            record = self._record()
        except KeyError:  # pruned by retention: a cell showing it must not fail
            printer.text(repr(self))
            return
        printer.text(run_text(record) + as_of(live=False))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """In a kernel, a cell ending in a handle shows the run's live card; elsewhere (and for a
        run no longer in the store) None, and IPython shows ``_repr_pretty_``'s text."""
        from .notebook.kernel import kernel

        if kernel() is None or self._app.store.get_run(self.task_id) is None:
            return None
        from .ui import TaskCard

        return TaskCard(self)._repr_mimebundle_(include=include, exclude=exclude)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(self.task_id)


_Waiter = tuple[asyncio.Future[dict[str, Any]], int]  # the future and the thread of its loop


def _listed(waiters: "_Waiter | list[_Waiter] | None") -> list[_Waiter]:
    """What ``Endings`` keeps for a run (one waiter, a list of them or None) as a list."""
    return [] if waiters is None else waiters if type(waiters) is list else [waiters]  # type: ignore[list-item]


class Endings:
    """How this app's runs end, told to whoever asked: the handles submits returned (held
    weakly, so waiting on a run that retention pruned first still tells how it ended) and
    the futures of ``wait()``. One subscription serves them all, so a waiter costs a dict
    entry, and thousands of waiters cost nothing per change."""

    def __init__(self, store: Any):
        # Plain references without callbacks (a ``WeakValueDictionary`` entry cost three Python
        # calls at each submit): an entry goes when its run's end is told, or, its handle
        # dropped, at the sweep once the entries have doubled.
        self._handles: dict[str, weakref.ref[TaskHandle]] = {}
        self._sweep_at = _SWEEP_FROM
        self._waiters: dict[str, _Waiter | list[_Waiter]] = {}  # a run's one waiter, or a list of them
        self._outboxes: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[dict[str, Any]], Any]]] = {}
        self._deadlines: dict[asyncio.AbstractEventLoop, _Deadlines] = {}  # each touched on its loop's thread only
        self._lock = threading.Lock()
        self._store = store
        offs = (store.events.subscribe(self._published, ends=True), store.events.on_vanished(self._vanished))
        self.close = lambda: [off() for off in offs]

    def add(self, handle: TaskHandle) -> TaskHandle:
        """Hold ``handle`` for its run's end, or give the handle held already for the run (a
        submit that joined a run under its lock key gets the same handle as the first).

        A run may have ended in another thread before its submit got here (its end told to
        nobody): the store, which holds a record it has just changed, gives that end, which
        retention may prune from the disk later."""
        ref = self._handles.setdefault(handle.task_id, weakref.ref(handle))  # (one step: two joins at once)
        held = ref()
        if held is not None and held is not handle:
            return held
        if held is None:  # the first handle was dropped: this one takes its place
            self._handles[handle.task_id] = weakref.ref(handle)
        if len(self._handles) > self._sweep_at:
            self._sweep()
        record = self._store.finished_run(handle.task_id)  # (after the entry: an end from now on finds it)
        if record is not None:
            handle._final = record
            self._handles.pop(handle.task_id, None)
        return handle

    def _sweep(self) -> None:
        """Drop the entries of handles gone (their runs unfinished: a finished run's entry is gone)."""
        with self._lock:
            # A copy made in one step: ``list(items())`` walks the entries one by one, and a garbage
            # collection on the way runs finalizers, which let in threads that add or drop entries.
            for task_id, ref in self._handles.copy().items():
                if ref() is None:
                    now = self._handles.pop(task_id, None)
                    if now is not None and now is not ref:  # a new handle for the run came meanwhile
                        self._handles.setdefault(task_id, now)
            self._sweep_at = max(_SWEEP_FROM, 2 * len(self._handles))

    def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future, on the running loop, that gets the run's finished record."""
        ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = (ended, threading.get_ident())
        with self._lock:
            known = self._waiters.get(task_id)  # most runs have one waiter: no list for it
            self._waiters[task_id] = waiter if known is None else [*_listed(known), waiter]
        return ended

    def forget(self, task_id: str, ended: asyncio.Future[dict[str, Any]], deadlines: "_Deadlines | None") -> None:
        """The wait on ``ended`` is over (``deadlines``: where ``deadline`` put its timeout)."""
        with self._lock:
            rest = [waiter for waiter in _listed(self._waiters.get(task_id)) if waiter[0] is not ended]
            if rest:
                self._waiters[task_id] = rest[0] if len(rest) == 1 else rest
            else:
                self._waiters.pop(task_id, None)
        if deadlines is not None:
            deadlines.over()

    def deadline(self, ended: asyncio.Future[dict[str, Any]], timeout: float | None) -> "_Deadlines | None":
        """Fail ``ended`` with ``asyncio.TimeoutError`` after ``timeout`` s (None: never); gives
        what to hand ``forget``."""
        if timeout is None:
            return None
        loop = ended.get_loop()
        deadlines = self._deadlines.get(loop)
        if deadlines is None:
            deadlines = self._deadlines[loop] = _Deadlines(loop, self._deadlines)
        deadlines.add(ended, timeout)
        return deadlines

    def _published(self, record: dict[str, Any]) -> None:  # a finished record, from whatever thread published
        ref = self._handles.pop(record["task_id"], None)  # a finished run never changes again
        handle = ref() if ref is not None else None
        if handle is not None:
            handle._final = record
        if self._waiters:
            self._tell(record["task_id"], record)

    def _vanished(self, task_id: str) -> None:
        """The run was deleted (pruned, or by ``capsule-nb prune``) before this process saw how
        it ended: its waiters get a ``KeyError`` saying so, not a wait for ever."""
        self._handles.pop(task_id, None)
        self._tell(task_id, KeyError(f"run {task_id} was deleted from the store at {self._store.path} before this "
                                     "process saw how it ended (another process pruned it)"))

    def _tell(self, task_id: str, outcome: dict[str, Any] | BaseException) -> None:
        """Settle the run's waiters with ``outcome`` (its finished record, or an error), each on its loop."""
        with self._lock:
            waiters = self._waiters.pop(task_id, None)
        here = threading.get_ident()
        for ended, thread in _listed(waiters):
            if thread == here:
                _settle([(ended, outcome)])
            else:
                self._post(ended, outcome)

    def _post(self, ended: asyncio.Future[dict[str, Any]], record: dict[str, Any] | BaseException) -> None:
        """Settle ``ended`` on its loop: runs ending in other threads in a burst wake the loop
        once, not once each (a wake-up is a write to the loop's self-pipe)."""
        loop = ended.get_loop()
        if loop.is_closed():  # nobody is waiting any more (and what it left is dropped)
            with self._lock:
                self._outboxes.pop(loop, None)
            return
        with self._lock:
            outbox = self._outboxes.setdefault(loop, [])
            outbox.append((ended, record))
            if len(outbox) > 1:
                return  # the wake-up that takes it is on its way
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # that loop is closed; nobody is waiting any more
            with self._lock:
                self._outboxes.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            outbox = self._outboxes.pop(loop, [])
        _settle(outbox)


class _Deadlines:
    """The timeouts of one loop's waits behind one loop timer. A timer each would put a
    ``TimerHandle`` per waiter in the loop's heap, ordered by a Python ``__lt__``: with
    thousands of waits, a burst of process runs went 10-20% slower for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: dict[asyncio.AbstractEventLoop, "_Deadlines"]):
        self._loop = loop
        self._registry = registry  # which lets go of this once no deadline is left
        self._heap: list[tuple[float, int, asyncio.Future[dict[str, Any]]]] = []
        self._order = itertools.count()  # ties never compare futures
        self._timer: asyncio.TimerHandle | None = None
        self._over = 0  # waits over since the heap was last cleared of them

    def add(self, ended: asyncio.Future[dict[str, Any]], timeout: float) -> None:
        when = self._loop.time() + timeout
        heapq.heappush(self._heap, (when, next(self._order), ended))
        if self._timer is None or when < self._timer.when():
            self._arm(when)

    def over(self) -> None:
        """A wait has ended: its entry goes when its deadline comes, or sooner, once most
        of the heap is such entries (so a long timeout holds no finished record for long)."""
        self._over += 1
        if 2 * self._over > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
            self._over = 0
            self._next()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._expire, when)

    def _expire(self, when: float) -> None:
        """The timer for ``when`` is due (the loop runs it up to its clock resolution early)."""
        self._timer = None
        due = max(when, self._loop.time())
        while self._heap and self._heap[0][0] <= due:
            resolve(heapq.heappop(self._heap)[2], asyncio.TimeoutError())
        self._next()

    def _next(self) -> None:
        """Arm the timer for the first deadline still waited on; none left: let go."""
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        if self._heap:
            if self._timer is None or self._timer.when() != self._heap[0][0]:
                self._arm(self._heap[0][0])
        else:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._registry.get(self._loop) is self:
                del self._registry[self._loop]


def _settle(endings: list[tuple[asyncio.Future[dict[str, Any]], dict[str, Any] | BaseException]]) -> None:
    for ended, outcome in endings:
        if not ended.done():
            if isinstance(outcome, BaseException):
                ended.set_exception(outcome)
            else:
                ended.set_result(outcome)


def _iso(value: float | None) -> str:
    return "" if value is None else dt.datetime.fromtimestamp(value, tz=dt.timezone.utc).isoformat()


class _Answered(ReadyBool):
    """``h.cancel()`` of a run another process owns: True at once, and awaited, True once the
    owner has answered (``TaskHandle.cancel``)."""

    __slots__ = ("_answer",)

    def __init__(self, value: bool, answer: Any):
        super().__init__(value)
        self._answer = answer

    def __await__(self) -> Generator[Any, None, bool]:
        yield from self._answer().__await__()
        return self.value
