"""Cron schedules: ``@cpsl.schedule("*/5 * * * *")``.

Each tick is an ordinary run (task name = schedule name), so it has a
status, output and messages, and shows on the board. What makes a tick
fire once, on time:

* **Ownership per tick, not per kernel.** Every kernel that defines the
  schedule arms a timer; at the due time each tries to claim the tick in one
  store transaction (``last_due`` moves forward only once). The winner
  submits the run. No leader to elect, and when the kernel that fired dies the
  others simply keep claiming.
* **A claim is kept.** The claim names its kernel (``claimed_by``), and the
  tick counts as settled (``settled_due``) only once its run is on disk (or it
  was skipped or paused). A kernel
  that lost the claim watches it; if the claimant dies first, the watcher (or
  the next tick's claimant) takes the claim over and submits the run, unless
  the run turns out to be on disk after all.
* **No bursts.** The next due time is computed from *now*, so a tick delayed
  by a blocking cell or a suspended laptop fires once, and a tick that comes
  while the previous run is unfinished is skipped (counted in the schedule's
  state).
* **Wall clock.** Timers re-check the wall clock at least every 30 s
  (``timers.MAX_WAIT``), never one long monotonic wait.
* **DST.** ``cron.next_due`` fires a job with a fixed hour once on the day a
  wall time repeats or is skipped.
* **One definition in force.** A schedule defined again otherwise (the cell edited in
  one notebook while an older kernel still runs the old one: another cron, zone or body)
  is in force everywhere: a kernel whose definition is not the one stored, by a live
  kernel, stops firing and says so once; it fires again if that kernel goes. Kernels
  that define it alike share its ticks, so one that hangs or sleeps holds nothing up.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import inspect
import logging
import threading
import time
import types
from typing import TYPE_CHECKING, Any, Callable

from .checks import true_or_false, whole_number
from .errors import StoreError
from .cron import last_due, next_due, parse_cron, parse_tz
from .handle import TaskHandle
from .queries import TaskQuery
from .record import FINISHED, iso_utc
from .store.owners import owner_alive
from .tasks import Task

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("capsule_nb")

WATCH_SECONDS = 1.0  # how often a kernel that lost a claim looks whether the claimant recorded the run
NEXT_RUNS_MAX = 10_000  # fire times ``next_runs`` lists at most


class Schedule:
    """A function run on a cron cadence. Call it to run it inline."""

    def __init__(self, fn: Callable[[], Any], *, app: "App", cron: str, tz: str = "UTC",
                 name: str | None = None, catchup: bool = False):
        self.cron = parse_cron(cron)
        self.tz = parse_tz(tz)
        self.name = name or getattr(fn, "__name__", None) or repr(fn)
        required = [p.name for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise TypeError(f"@schedule({self.cron!r}): {self.name}() must take no arguments, it requires {required}")
        self.fn = fn
        self.app = app
        self.catchup = true_or_false(f"@schedule({self.cron!r}): catchup", catchup)
        self.task = Task(fn, app=app, name=self.name)
        self._body = _fingerprint(fn)
        self._key = f"sched/{app.name}/{self.name}"
        self._timer: Any = None
        self._lock = threading.Lock()
        self._stopped = False
        self._refused = ""  # why the store refused the last tick's run (said once, until one runs)
        self._superseded_by: str | None = None  # the definition in force, when it is another kernel's
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        if self._superseded_by:
            state = f"not firing here: another kernel's {self._superseded_by} is in force"
        else:
            state = "paused" if self.paused else f"next {self.next_runs(1)[0].isoformat()}"
        return f"<capsule schedule {self.name!r} {self.cron!r} {self.tz.key}, {state}>"

    def __call__(self) -> Any:
        return self.fn()

    def __reduce__(self) -> tuple:
        """To a worker process (a process task that calls it inline, as Capsule's templates call
        a task's function): the same schedule, its clock left in the kernel that keeps it."""
        return _unstarted, (self.fn, self.app, self.cron, self.tz.key, self.name, self.catchup)

    # --------------------------------------------------------------- public

    def next_runs(self, n: int = 5, after: dt.datetime | None = None) -> list[dt.datetime]:
        """The next ``n`` fire times after ``after`` (default now), in the schedule's time
        zone, DST repeats left out."""
        if whole_number("n", n) > NEXT_RUNS_MAX:  # (a list of a billion datetimes hangs the kernel)
            raise ValueError(f"next_runs(n) lists at most {NEXT_RUNS_MAX:,} fire times, got n={n!r}")
        if after is not None and not isinstance(after, dt.datetime):
            raise TypeError(f"next_runs(after=...) takes a datetime, got {after!r}")
        out: list[dt.datetime] = []
        after = dt.datetime.now(self.tz) if after is None else after
        while len(out) < n:
            after = self._next_after(after)
            out.append(after)
        return out

    @property
    def paused(self) -> bool:
        return bool(self.state().get("paused"))

    def pause(self) -> None:
        """Stop firing (in every kernel on this store) until ``resume()``."""
        self._update(lambda s: {**s, "paused": True})

    def resume(self) -> None:
        self._update(lambda s: {**s, "paused": False})

    def state(self) -> dict[str, Any]:
        """What the store knows: last due time fired, skipped ticks, paused. ``skipped`` and
        ``paused`` are there from the start, so ``state()["skipped"]`` (as the docs read it)
        works before the first skip."""
        return {"skipped": 0, "paused": False, **(self.app.store.get(self._key) or {})}

    @property
    def runs(self) -> TaskQuery:
        """The ticks as runs: ``schedule.runs.find()``, ``.count(status=...)``."""
        return TaskQuery(self.app, task_name=self.name)

    # ------------------------------------------------------------- the clock

    def start(self) -> None:
        """Arm the first tick (and a catch-up run if asked for and one was missed)."""
        if self.task.is_async:
            self.app.runtime.loop  # ticks fire from the timer thread: bind the loop we are defined on
        me = self.app.runtime.owner
        self._update(lambda s: {**s, **self._definition(), "catchup": self.catchup,
                                "definers": [*_definers(s, without=me), me]})
        now = dt.datetime.now(self.tz)
        last = self.state().get("last_due")
        if self.catchup and last is not None:
            if self._next_after(dt.datetime.fromtimestamp(last, self.tz)) <= now:
                self._fire(last_due(self.cron, self.tz, now).timestamp())  # the latest missed, one step back
        self._arm(self._next_after(now))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
        if self.app.registered_schedule(self.name) is self:  # (not replaced by a re-run cell, whose it is now)
            me = self.app.runtime.owner
            self._update(lambda s: {**s, "defined_by": None if s.get("defined_by") == me else s.get("defined_by"),
                                    "definers": _definers(s, without=me)})

    def _definition(self) -> dict[str, Any]:
        return {"cron": self.cron, "tz": self.tz.key, "body": self._body, "defined_by": self.app.runtime.owner}

    def _next_after(self, after: dt.datetime) -> dt.datetime:
        return next_due(self.cron, self.tz, after)

    def _arm(self, due: dt.datetime) -> None:
        with self._lock:
            if self._stopped:
                return
            self._timer = self.app.runtime.timers.call_at(due.timestamp(), lambda: self._tick(due))

    def _tick(self, due: dt.datetime) -> None:
        try:
            self._fire(due.timestamp())
            self._refused = ""
        except StoreError as exc:  # a full disk, a database replaced under the store: said once, not per tick
            if str(exc) != self._refused:
                log.error("capsule_nb schedule %s: tick at %s not run: %s", self.name, due, exc)
            self._refused = str(exc)
        except Exception:
            log.exception("capsule_nb schedule %s: tick at %s failed", self.name, due)
        finally:  # the next tick after *now*: a late tick never turns into a burst
            try:
                self._arm(self._next_after(max(dt.datetime.now(self.tz), due)))
            except Exception:  # never let one bad computation end the schedule
                log.exception("capsule_nb schedule %s: could not arm the next tick; retrying in 1 s", self.name)
                self.app.runtime.timers.call_later(1.0, lambda: self._tick(due))

    def _fire(self, due: float) -> TaskHandle | None:
        """Claim the tick due at ``due`` (once across kernels) and submit its run."""
        if self.app.registered_schedule(self.name) is not self:
            self.stop()  # replaced by a re-run cell
            return None
        verdict: dict[str, Any] = {}
        me = self.app.runtime.owner
        self.app.store.poll()  # the previous tick may have run in another kernel

        def claim(state: dict[str, Any] | None) -> dict[str, Any]:
            state = dict(state or {})
            if (state.get("cron"), state.get("tz"), state.get("body")) != (self.cron, self.tz.key, self._body):
                definer = state.get("defined_by")  # (kernels that define it alike share its ticks)
                if definer not in (None, me) and owner_alive(definer):
                    verdict["superseded"] = f"{state.get('cron')!r} ({state.get('tz')})" + (
                        " with a different body" if (state.get("cron"), state.get("tz")) == (self.cron, self.tz.key)
                        else "")  # (else its cron and zone read as this one's: nothing said what differs)
                    return state
                state.update(self._definition())  # its definer has gone: this one is in force now
            if state.get("last_due", 0) >= due:
                verdict["taken"] = True  # another kernel fired this tick
                return state
            if _lost(state):
                verdict["lost"] = state["last_due"]
            state.update(last_due=due, claimed_by=me)
            previous = state.get("last_run") and self.app.store.get_run(state["last_run"])
            if state.get("paused"):
                verdict["paused"] = True
            elif previous and previous["status"] not in FINISHED:
                state["skipped"] = state.get("skipped", 0) + 1
                state["last_skipped_at"] = due
                verdict["skipped"] = previous["task_id"]
            else:
                verdict["fire"] = True
            if not verdict.get("fire"):
                state["settled_due"] = due  # nothing to record: nothing to take over
            return state

        self.app.store.update_value(self._key, claim)
        superseded = verdict.get("superseded")
        if superseded != self._superseded_by:
            self._superseded_by = superseded
            if superseded:
                log.warning("capsule_nb schedule %s: not firing %r (%s) here: another kernel on this store defined "
                            "it since as %s, which is in force while that kernel runs (define it here again to "
                            "make this one the definition)", self.name, self.cron, self.tz.key, superseded)
        if superseded:
            return None
        if verdict.get("lost"):
            self._rescue(verdict["lost"])
        if verdict.get("taken"):
            self.app.runtime.timers.call_later(WATCH_SECONDS, lambda: self._watch(due))
        if not verdict.get("fire"):
            if verdict.get("skipped"):
                log.info("capsule_nb schedule %s: tick skipped, run %s still going", self.name, verdict["skipped"])
            return None
        return self._submit(due)

    def _submit(self, due: float) -> TaskHandle:
        record, gen = self.app.runtime.submit(self.task, (), {}, {}, session=None, target=None,
                                              extra={"schedule": self.cron, "scheduled_for": due})
        self.app.store.flush()  # on disk before the tick counts as fired: a kill now loses nothing
        self._update(lambda s: {**s, "last_run": record["task_id"], "fired_due": max(s.get("fired_due", 0), due),
                                "settled_due": max(s.get("settled_due", 0), due)})
        return self.app._endings.add(TaskHandle(self.app, record["task_id"], gen))

    def _watch(self, due: float) -> None:
        """Another kernel claimed ``due``: once it has recorded the run, or the next tick is due
        (its claimant looks at this claim), nothing to do; if the claimant died first, take over."""
        next_due = self._next_after(dt.datetime.fromtimestamp(due, self.tz)).timestamp()
        if self._stopped or time.time() >= next_due:
            return
        try:
            state = self.state()
            if state.get("last_due") != due or state.get("settled_due", 0) >= due:
                return
            if not _lost(state):
                self.app.runtime.timers.call_later(WATCH_SECONDS, lambda: self._watch(due))
                return
            taken = {}

            def take_over(current: dict[str, Any]) -> dict[str, Any]:
                if current.get("last_due") == due and _lost(current):
                    taken["due"] = due
                    return {**current, "claimed_by": self.app.runtime.owner}
                return current

            self._update(take_over)
            if taken:
                self._rescue(due)
        except Exception:
            log.exception("capsule_nb schedule %s: watching the tick at %s failed", self.name, due)

    def _rescue(self, due: float) -> None:
        """Submit the run of a tick whose claimant died, unless its run reached the disk."""
        if self.app.store.runs({"app": self.app.name, "task_name": self.name, "scheduled_for": due}, limit=1):
            self._update(lambda s: {**s, "settled_due": max(s.get("settled_due", 0), due)})
            return
        log.info("capsule_nb schedule %s: the kernel that claimed the tick at %s died; running it here", self.name, due)
        self._submit(due)

    def _update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.app.store.update_value(self._key, lambda s: change(dict(s or {})))


def _lost(state: dict[str, Any]) -> bool:
    """The tick last claimed was never recorded, and the kernel that claimed it is dead."""
    claimant = state.get("claimed_by")
    return (claimant is not None and state.get("last_due") is not None
            and state.get("settled_due", 0) < state["last_due"] and not owner_alive(claimant))


def _fingerprint(fn: Callable[..., Any]) -> str:
    """What tells two definitions' bodies apart: their source (the same cell in two kernels
    is the same body), or their bytecode where the source cannot be read."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = _code_text(code) if code is not None else repr(fn)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _code_text(code: types.CodeType) -> str:
    """Bytecode, constants and names, nested code alike (a code object's repr has its address)."""
    consts = [_code_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names))


def _definers(state: dict[str, Any], without: str) -> list[str]:
    """The processes that define the schedule, still alive, ``without`` one."""
    found = state.get("definers")
    return [o for o in found if type(o) is str and o != without and owner_alive(o)] if type(found) is list else []


def when(row: dict[str, Any]) -> str:
    """What a listing (``%capsule``, ``capsule-nb schedules``) says of when a schedule fires."""
    if row["paused"]:
        return "paused"
    if row["next"] is None:
        return "not firing: no live kernel defines it"
    return row["next"] if row["next"].startswith("bad:") else f"next {row['next']}"


def on_store(store: Any) -> list[dict[str, Any]]:
    """Every schedule defined on ``store``, by any process or app, as it stands there: what
    ``%capsule`` and ``capsule-nb schedules`` list, also in a kernel that defines none."""
    return [_row(key, state) for key, state in store.items("sched/")]


def _row(key: str, state: dict[str, Any]) -> dict[str, Any]:
    """One schedule's line; a value the store holds but cannot use (an impossible cron, an
    unknown zone) is shown as what is wrong with it, never a crash."""
    _, app_name, name = key.split("/", 2)
    # The last tick that ran: ``last_due`` moves on with paused and skipped ticks too (w51 read
    # them as run); a store from before ``fired_due`` has only it, once a tick ran (``last_run``).
    cron, tz = state.get("cron"), str(state.get("tz", "UTC"))
    last = state.get("fired_due", state.get("last_due") if state.get("last_run") else None)
    definer = state.get("defined_by")
    defined = bool(_definers(state, without="")) or (type(definer) is str and owner_alive(definer))
    upcoming = None
    if cron and not state.get("paused"):
        try:
            due = next_due(parse_cron(cron), parse_tz(tz), dt.datetime.now(dt.timezone.utc))
            upcoming = due.isoformat(timespec="seconds") if defined else None  # (none: nothing fires it)
        except (TypeError, ValueError) as exc:
            upcoming = f"bad: {exc}"
    return {"app": app_name, "name": name, "cron": str(cron) if cron else None, "tz": tz, "defined": defined,
            "paused": bool(state.get("paused")), "next": upcoming, "last": iso_utc(last) if last else None,
            "skipped": state.get("skipped", 0)}


def _unstarted(fn: Callable[[], Any], app: "App", cron: str, tz: str, name: str, catchup: bool) -> Schedule:
    return Schedule(fn, app=app, cron=cron, tz=tz, name=name, catchup=catchup)
