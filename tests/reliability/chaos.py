"""The chaos campaign: six processes on one store, one of them SIGKILLed every few seconds,
then a checker that proves the store's promises from what each process acknowledged.

    python tests/reliability/chaos.py --minutes 10     # the long mode (benchmarks, releases)
    python tests/reliability/chaos.py --minutes 1      # what CI runs (tests/reliability/test_chaos.py)

Each worker process opens ``App("chaos")`` on the shared store, defines every task and a
seconds-field cron schedule, and runs a mixed load: submits with locks in the three
``on_lock`` modes (thread, process and async runs on the same keys), ``$inc`` into one
document, thread runs, ``process=True`` runs, long runs, and cancels of runs other processes
own. It appends every acknowledged operation to its own JSON-lines history *after* the call
returned: a submit once ``await submit()`` returned, an increment once ``update_one``
returned, what it saw finish. Task bodies that hold a lock write a beat every 20 ms to a
spans journal, so a run's span is [first beat, last beat] however it ended.

The conductor starts the workers, kills a random one every 2-5 s and starts it again
(noting the kill and the dead process's descendants, which must die with it), then stops
the load, lets the survivors drain and recover, and hands everything to ``checks.py``.
Exit status 1 when any invariant is violated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve()
KEYS = ("k0", "k1", "k2")
TICK = "* * * * * */2"  # every 2 s (croniter: seconds last)
CANCELABLE = ("lock_join", "lock_queue", "lock_reject", "long_async", "long_thread", "long_proc")
KILL_EVERY = (2.0, 5.0)  # seconds between kills
CHILD_GRACE = 2.0  # a killed process's descendants must be gone within this


# ------------------------------------------------------------------ journals


class Journal:
    """An append-only JSON-lines file: one ``write`` per line, so a kill never tears one in two."""

    def __init__(self, path: Path | str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, **entry: object) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())


def read_journal(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # only a line cut by a full disk could be torn
            entries.append({"op": "torn", "file": path.name})
    return entries


def read_journals(folder: Path) -> list[dict]:
    return [entry for path in sorted(folder.glob("*.jsonl")) for entry in read_journal(path)]


def process_start(pid: int) -> str | None:
    """A live, non-zombie process's start time (clock ticks), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in (b"Z", b"X") else fields[19].decode()


# --------------------------------------------------------------- task bodies


def beats(key: str, spans: str, seconds: float):
    """A lock holder's work: a beat in this process's spans journal, then a pause (``yield``)
    until ``seconds`` have passed. The last beat is written just before the body returns."""
    token, end = uuid.uuid4().hex, time.time() + seconds
    journal = Journal(os.path.join(spans, f"{os.getpid()}.jsonl"))
    try:
        while True:
            now = time.time()
            journal.write(key=key, run=token, t=now)
            if now >= end:
                return
            yield
    finally:
        os.close(journal.fd)


def hold(key: str, spans: str, seconds: float) -> dict:
    """A lock holder's body in a thread or a worker process: a beat every 20 ms."""
    for _ in beats(key, spans, seconds):
        time.sleep(0.02)
    return {"key": key, "pid": os.getpid()}


async def hold_async(key: str, spans: str, seconds: float) -> dict:
    for _ in beats(key, spans, seconds):
        await asyncio.sleep(0.02)
    return {"key": key, "pid": os.getpid()}


def note_child(children: str) -> None:
    """A process run's worker notes itself, so the checker can see it died with its parent."""
    pid = os.getpid()
    Journal(os.path.join(children, f"{pid}.jsonl")).write(pid=pid, start=process_start(pid))


def define(app, out: Path):
    """Every task and the schedule, as each worker defines them."""
    spans, children = str(out / "spans"), str(out / "children")

    @app.task(lock="chaos:{key}", on_lock="join")
    def lock_join(key, seconds, spans=spans):
        return hold(key, spans, seconds)

    @app.task(lock="chaos:{key}", on_lock="queue", process=True)
    def lock_queue(key, seconds, spans=spans, children=children):
        note_child(children)
        return hold(key, spans, seconds)

    @app.task(lock="chaos:{key}", on_lock="reject")
    async def lock_reject(key, seconds, spans=spans):
        return await hold_async(key, spans, seconds)

    @app.task
    def thread_work(n):
        time.sleep(random.uniform(0.01, 0.1))
        return Fraction(n, 7)  # not JSON: a signed payload

    @app.task(process=True)
    def proc_work(n, children=children):
        note_child(children)
        return {n, n * n}  # not JSON: a signed payload

    @app.task(retries=1)
    async def long_async(seconds):
        await asyncio.sleep(seconds)
        return "slept"

    @app.task(retries=1)
    def long_thread(seconds):
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.02)
        return "slept"

    @app.task(process=True, retries=1)
    def long_proc(seconds, children=children):
        note_child(children)
        time.sleep(seconds)
        return "slept"

    @app.schedule(TICK)
    def chaos_tick():
        time.sleep(0.05)
        return "tick"

    return {f.__name__: f for f in (lock_join, lock_queue, lock_reject, thread_work, proc_work,
                                    long_async, long_thread, long_proc)}


# -------------------------------------------------------------------- worker


async def work(slot: int, out: Path, seed: int) -> None:
    import capsule_nb as cpsl
    from capsule_nb.record import FINISHED

    pid, conductor = os.getpid(), os.getppid()
    rng = random.Random(seed * 1000 + pid)
    history = Journal(out / "history" / f"{slot}-{pid}.jsonl")
    app = cpsl.App("chaos", home=out / "store", keep_finished=10**7)
    tasks = define(app, out)
    me = app.runtime.owner
    inc_id, inc_seq = f"{slot}_{pid}", 0
    mine: list = []
    history.write(op="ready", slot=slot, pid=pid, owner=me, at=time.time())

    async def seen_finished(handle, status: str) -> None:
        result = None
        if status == "completed":
            result = repr(await handle.result())
        # What the store promises: a change is on disk once flushed (write-behind: a process
        # killed within the writer's window loses its last changes, and recovery settles the
        # run). So a finish is journaled as seen once flushed: from then on it must stay.
        await asyncio.get_running_loop().run_in_executor(None, app.store.flush)
        history.write(op="finished", id=handle.task_id, status=status, result=result, at=time.time())

    async def submit(name: str, *args) -> None:
        handle = await tasks[name].submit(*args)
        history.write(op="submit", task=name, id=handle.task_id, at=time.time())
        mine.append(handle)

    async def one_operation() -> None:
        nonlocal inc_seq
        roll = rng.random()
        if roll < 0.30:
            name = rng.choice(["lock_join", "lock_queue", "lock_reject"])
            try:
                await submit(name, rng.choice(KEYS), rng.uniform(0.05, 0.4))
            except cpsl.LockedError:
                history.write(op="rejected", task=name, at=time.time())
        elif roll < 0.45:
            inc_seq += 1
            k = rng.randint(1, 5)
            history.write(op="inc_intent", inc=inc_id, seq=inc_seq, k=k)
            app.collection("chaos").update_one(
                {"_id": "total"}, {"$inc": {"total": k, f"by.{inc_id}.n": k}, "$set": {f"by.{inc_id}.last": inc_seq}})
            history.write(op="inc", inc=inc_id, seq=inc_seq, k=k, at=time.time())
        elif roll < 0.60:
            await submit("thread_work", rng.randint(1, 10**6))
        elif roll < 0.70:
            await submit("proc_work", rng.randint(1, 10**6))
        elif roll < 0.82:
            await submit(rng.choice(["long_async", "long_thread", "long_proc"]), rng.uniform(1.0, 5.0))
        else:
            theirs = [r for r in app.store.unfinished_runs() if r["app"] == "chaos"
                      and r["task_name"] in CANCELABLE and r.get("owner") != me]
            if theirs:
                target = rng.choice(theirs)["task_id"]
                at = time.time()
                asked = bool(await app.get_task(target).cancel())
                history.write(op="cancel", id=target, asked=asked, at=at)

    def orphaned() -> bool:  # the conductor died: the campaign is void, leave nothing behind
        if os.getppid() != conductor:
            os._exit(3)
        return False

    stop = out / "stop"
    while not stop.exists() and not orphaned():
        try:
            await one_operation()
        except Exception as exc:  # noted, and the load goes on: the checker judges the store
            history.write(op="error", error=f"{type(exc).__name__}: {exc}", at=time.time())
        for handle in [h for h in mine if h.snapshot()["status"] in FINISHED]:
            mine.remove(handle)
            await seen_finished(handle, handle.snapshot()["status"])
        await asyncio.sleep(rng.uniform(0.02, 0.15))
    for handle in mine:  # drain: what this process submitted, to its end
        try:
            await seen_finished(handle, await handle.wait(90))
        except TimeoutError:
            history.write(op="stuck", id=handle.task_id, status=handle.snapshot()["status"])
    history.write(op="idle", at=time.time())
    while not (out / "exit").exists() and not orphaned():
        await asyncio.sleep(0.1)
    app.close()


# ----------------------------------------------------------------- conductor


class Conductor:
    def __init__(self, out: Path, processes: int, seed: int):
        self.out, self.processes, self.seed = out, processes, seed
        self.procs: dict[int, subprocess.Popen] = {}
        self.kills = Journal(out / "kills.jsonl")
        self.survivors: list[dict] = []  # per descendant of a killed process: how long it outlived it
        self._watchers: list[threading.Thread] = []
        self.started = 0

    def start(self, slot: int) -> None:
        log = open(self.out / "logs" / f"{slot}-{self.started}.log", "w")
        self.started += 1
        self.procs[slot] = subprocess.Popen(
            [sys.executable, str(HERE), "--worker", str(slot), "--dir", str(self.out), "--seed", str(self.seed)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, slot: int) -> None:
        proc = self.procs[slot]
        family = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        at = time.time()
        proc.wait()
        self.kills.write(slot=slot, pid=proc.pid, at=at, descendants=len(family))
        watcher = threading.Thread(target=self._outlived, args=(proc.pid, at, family), daemon=True)
        watcher.start()
        self._watchers.append(watcher)

    def _outlived(self, parent: int, at: float, family: dict[int, str]) -> None:
        left = dict(family)
        deadline = at + CHILD_GRACE + 8
        while left and time.time() < deadline:
            for pid, start in list(left.items()):
                if process_start(pid) != start:
                    self.survivors.append({"parent": parent, "pid": pid, "outlived": time.time() - at})
                    del left[pid]
            time.sleep(0.01)
        self.survivors += [{"parent": parent, "pid": pid, "outlived": None} for pid in left]

    def ready(self) -> set[int]:
        return {e["pid"] for e in read_journals(self.out / "history") if e.get("op") == "ready"}

    def run(self, seconds: float) -> None:
        rng = random.Random(self.seed)
        for slot in range(self.processes):
            self.start(slot)
        wait_for(lambda: {p.pid for p in self.procs.values()} <= self.ready(), 120, "every worker ready")
        self.t0 = time.time()
        end = self.t0 + seconds
        while (now := time.time()) < end:
            time.sleep(min(rng.uniform(*KILL_EVERY), max(0.0, end - now)))
            if time.time() < end:
                slot = rng.randrange(self.processes)
                self.kill(slot)
                self.start(slot)
        self.t1 = time.time()
        (self.out / "stop").touch()

    def drain(self) -> None:
        """Every worker has drained what it submitted, then recovery has had its time."""
        wait_for(lambda: sum(1 for e in read_journals(self.out / "history") if e.get("op") == "idle")
                 >= self.processes, 180, "every worker idle")

    def finish(self) -> None:
        (self.out / "exit").touch()
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for watcher in self._watchers:
            watcher.join()


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> start time (so a reused pid is not mistaken)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        start = process_start(pid)
        if start is not None:
            found[pid] = start
            todo += parents.get(pid, [])
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def campaign(args: argparse.Namespace) -> int:
    import chaos_check

    out = Path(args.dir or tempfile.mkdtemp(prefix="capsule-chaos-")).resolve()
    for sub in ("history", "spans", "children", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    from capsule_nb.collections import Collection
    from capsule_nb.store import open_store

    store = open_store(out / "store")
    Collection(store, "chaos").insert_one({"_id": "total", "total": 0, "by": {}})
    store.flush()
    conductor = Conductor(out, args.processes, args.seed)
    print(f"chaos: {args.processes} processes on {out / 'store'} for {args.minutes:g} min, seed {args.seed}",
          flush=True)
    try:
        conductor.run(args.minutes * 60)
        conductor.drain()
        report = chaos_check.check(out, store, conductor)
    finally:
        conductor.finish()
    report.children_after_exit(out)
    print(report.text(), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(report.summary(), indent=1))
    return 1 if report.violations() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long the load and the kills go on")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dir", help="where the store, histories and logs go (default: a new temp folder)")
    parser.add_argument("--summary", help="also write the figures as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(10**6)
    if args.worker is not None:
        asyncio.run(work(args.worker, Path(args.dir), args.seed))
        return 0
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
