#!/usr/bin/env python
"""Throughput and latency of capsule_nb's runtime, side by side with SqliteHuey.

    python benchmarks/bench_runtime.py                 # the default run (< ~60 s)
    python benchmarks/bench_runtime.py --n 50000       # bigger bursts
    python benchmarks/bench_runtime.py --only capsule  # skip Huey
    python benchmarks/bench_runtime.py --profile capsule-async  # cProfile one case

Every case runs in a fresh subprocess (a fresh interpreter, a fresh temp
store), so no case inherits threads, memory or warm caches from another.
See benchmarks/README.md for what is measured and what the aims are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

AIM_RATE = 10_000  # persisted no-op tasks per second on 2 cores (the aim)
AIM_RATIO = 5.0  # at least 5x SqliteHuey

# --------------------------------------------------------------------------- #
# capsule_nb cases (run inside a child process)
# --------------------------------------------------------------------------- #


def _capsule_app(home: str):
    import capsule_nb as cpsl

    return cpsl.App(name="bench", home=home, keep_finished=10**9)  # count every run on disk: no retention


def _count_completed_on_disk(home: str, task_name: str) -> int:
    """Completed run records in the store's SQLite file, read through a separate connection
    (each record's own JSON, not the columns copied out beside it)."""
    db = os.path.join(home, "db", "cache.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT record FROM capsule_runs").fetchall()
    finally:
        con.close()
    done = 0
    for (value,) in rows:
        record = json.loads(value)
        done += record.get("task_name") == task_name and record.get("status") == "completed"
    return done


def capsule_throughput(n: int, kind: str, awaited: bool, timeout: float = 60.0,
                       waits: bool = False) -> dict[str, Any]:
    """N no-op runs submitted in a burst; the clock stops when all N are completed and flushed.

    ``waits``: completion is seen as users see it, ``await asyncio.gather(*(h.wait() ...))``,
    instead of from a store subscription.
    """
    import asyncio

    home = tempfile.mkdtemp(prefix="bench-capsule-")
    try:
        async def main() -> dict[str, Any]:
            app = _capsule_app(home)
            if kind == "async":
                @app.task
                async def noop() -> None:
                    pass
            else:
                @app.task
                def noop() -> None:
                    pass

            loop = asyncio.get_running_loop()
            all_done: asyncio.Future[None] = loop.create_future()
            completed = 0
            count_lock = threading.Lock()

            def on_change(record: dict[str, Any]) -> None:  # store events, from any thread
                nonlocal completed
                if record["status"] == "completed" and record["task_name"] == "noop":
                    with count_lock:
                        completed += 1
                        last = completed == n
                    if last:
                        loop.call_soon_threadsafe(_resolve, all_done)

            if not waits:  # with waits, the waits alone see completion: no listener of our own
                app.store.events.subscribe(on_change)
            await asyncio.sleep(0)  # let the runtime settle on this loop

            async def submit_durable():
                return await noop.submit()

            t0 = time.perf_counter()
            if awaited:
                handles = await asyncio.gather(*(submit_durable() for _ in range(n)))
            else:
                handles = [noop.submit() for _ in range(n)]
            t_submitted = time.perf_counter()
            try:
                if waits:
                    statuses = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), timeout)
                    assert set(statuses) == {"completed"}, set(statuses)
                else:
                    await asyncio.wait_for(asyncio.shield(all_done), timeout)
            except asyncio.TimeoutError:
                statuses: dict[str, int] = {}
                for record in app.store.runs():
                    statuses[record["status"]] = statuses.get(record["status"], 0) + 1
                raise RuntimeError(f"stuck: {completed}/{n} completed after {timeout:g} s; "
                                   f"statuses in the store: {statuses}") from None
            t_completed = time.perf_counter()
            app.store.flush()  # completed *and on disk*
            t_flushed = time.perf_counter()

            on_disk = _count_completed_on_disk(home, "noop")
            assert len({h.task_id for h in handles}) == n
            app.close()
            return {
                "n": n,
                "seconds": t_flushed - t0,
                "rate": n / (t_flushed - t0),
                "submit_seconds": t_submitted - t0,
                "complete_seconds": t_completed - t0,
                "flush_seconds": t_flushed - t_completed,
                "completed_on_disk": on_disk,
            }

        return asyncio.run(main())
    finally:
        shutil.rmtree(home, ignore_errors=True)


def asyncio_throughput(n: int) -> dict[str, Any]:
    """The floor: N bare asyncio tasks doing nothing, gathered (no record, no store)."""
    import asyncio

    async def noop() -> None:
        pass

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(asyncio.ensure_future(noop()) for _ in range(n)))
        return time.perf_counter() - t0

    seconds = asyncio.run(main())
    return {"n": n, "seconds": seconds, "rate": n / seconds, "submit_seconds": seconds,
            "complete_seconds": seconds, "flush_seconds": 0.0, "completed_on_disk": n}


def capsule_latency(n: int, kind: str) -> dict[str, Any]:
    """Sequential submits, each waited to the end: time from the submit call to the body's first line."""
    import asyncio

    home = tempfile.mkdtemp(prefix="bench-capsule-")
    starts: dict[int, float] = {}
    try:
        async def main() -> dict[str, Any]:
            app = _capsule_app(home)
            if kind == "async":
                @app.task
                async def probe(i: int) -> None:
                    starts[i] = time.perf_counter()
            else:
                @app.task
                def probe(i: int) -> None:
                    starts[i] = time.perf_counter()

            lat = []
            warmup = min(20, n)
            for i in range(-warmup, n):
                t0 = time.perf_counter()
                handle = probe.submit(i)
                status = await handle.wait(timeout=30)
                if status != "completed":
                    raise RuntimeError(f"probe run ended {status}")
                if i >= 0:
                    lat.append(starts[i] - t0)
            app.store.flush()
            app.close()
            return _latency_summary(lat)

        return asyncio.run(main())
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _resolve(future: Any) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------------- #
# Huey cases (run inside a child process)
# --------------------------------------------------------------------------- #


def _make_huey(home: str, sync_mode: str):
    """A file-backed SqliteHuey. ``sync_mode``: 'default' (SQLite's own, FULL) or 'normal'."""
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):
        # PRAGMA synchronous=NORMAL in WAL mode: what capsule_nb's diskcache store uses.
        def _create_connection(self):
            conn = super()._create_connection()
            conn.execute("pragma synchronous=1")
            return conn

    kwargs: dict[str, Any] = {}
    if sync_mode == "normal":
        kwargs["storage_class"] = NormalSyncStorage
    # store_none=True: a finished no-op leaves a result row, i.e. its completion is persisted,
    # as a capsule_nb run leaves a completed record.
    return SqliteHuey("bench", filename=os.path.join(home, "huey.db"), store_none=True, **kwargs)


class _Consumer:
    """Huey's own consumer, run in this process with thread workers (no CLI, no fork)."""

    def __init__(self, huey, workers: int, poll: float | None):
        options: dict[str, Any] = dict(workers=workers, worker_type="thread", periodic=False,
                                       check_worker_health=False)
        if poll is not None:  # None = huey's defaults (0.1 s, backoff 1.15, max 10 s)
            options.update(initial_delay=poll, backoff=1.0, max_delay=poll)
        self.consumer = huey.create_consumer(**options)

    def __enter__(self):
        # Consumer.start() installs signal handlers; put ours back afterwards.
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.consumer.start()
        for s, handler in saved.items():
            signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        self.consumer.stop(graceful=True)


def huey_throughput(n: int, sync_mode: str, workers: int, poll: float | None) -> dict[str, Any]:
    from huey import signals

    home = tempfile.mkdtemp(prefix="bench-huey-")
    try:
        huey = _make_huey(home, sync_mode)

        @huey.task()
        def noop() -> None:
            pass

        completed = 0
        count_lock = threading.Lock()
        all_done = threading.Event()

        @huey.signal(signals.SIGNAL_COMPLETE)  # sent after the result row is written
        def on_complete(signal_name, task, *args):
            nonlocal completed
            with count_lock:
                completed += 1
                if completed == n:
                    all_done.set()

        with _Consumer(huey, workers, poll):
            time.sleep(0.05)  # workers up and polling
            t0 = time.perf_counter()
            results = [noop() for _ in range(n)]  # each enqueue is one committed INSERT
            t_submitted = time.perf_counter()
            if not all_done.wait(timeout=600):
                raise RuntimeError(f"huey finished only {completed}/{n}")
            t_done = time.perf_counter()

        con = sqlite3.connect(f"file:{os.path.join(home, 'huey.db')}?mode=ro", uri=True)
        try:
            results_on_disk = con.execute("SELECT count(*) FROM kv WHERE queue = 'bench'").fetchone()[0]
            left = con.execute("SELECT count(*) FROM task WHERE queue = 'bench'").fetchone()[0]
        finally:
            con.close()
        assert len(results) == n
        return {
            "n": n,
            "seconds": t_done - t0,
            "rate": n / (t_done - t0),
            "submit_seconds": t_submitted - t0,
            "complete_seconds": t_done - t0,
            "flush_seconds": 0.0,
            "completed_on_disk": results_on_disk if left == 0 else -left,
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


def huey_latency(n: int, sync_mode: str, workers: int, poll: float | None) -> dict[str, Any]:
    from huey import signals

    home = tempfile.mkdtemp(prefix="bench-huey-")
    starts: dict[int, float] = {}
    try:
        huey = _make_huey(home, sync_mode)

        @huey.task()
        def probe(i: int) -> None:
            starts[i] = time.perf_counter()

        finished = threading.Event()

        @huey.signal(signals.SIGNAL_COMPLETE)
        def on_complete(signal_name, task, *args):
            finished.set()

        lat = []
        with _Consumer(huey, workers, poll):
            time.sleep(0.05)
            warmup = min(5, n)
            for i in range(-warmup, n):
                finished.clear()
                t0 = time.perf_counter()
                probe(i)
                if not finished.wait(timeout=30):
                    raise RuntimeError("huey probe did not finish")
                if i >= 0:
                    lat.append(starts[i] - t0)
        return _latency_summary(lat)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _latency_summary(lat: list[float]) -> dict[str, Any]:
    lat = sorted(lat)
    return {
        "n": len(lat),
        "p50_ms": 1e3 * _pct(lat, 50),
        "p99_ms": 1e3 * _pct(lat, 99),
        "mean_ms": 1e3 * statistics.fmean(lat),
        "max_ms": 1e3 * lat[-1],
    }


def _pct(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# --------------------------------------------------------------------------- #
# the case table
# --------------------------------------------------------------------------- #

# name -> (group, label, runner(args) -> result dict)
CASES: dict[str, tuple[str, str, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "capsule-async": ("throughput", "capsule_nb async, t.submit() x N",
                      lambda a: capsule_throughput(a.n, "async", awaited=False)),
    "capsule-async-awaited": ("throughput", "capsule_nb async, gather(await t.submit()) x N",
                              lambda a: capsule_throughput(a.n, "async", awaited=True)),
    "capsule-async-waits": ("throughput", "capsule_nb async, t.submit() x N, gather(h.wait())",
                            lambda a: capsule_throughput(a.n, "async", awaited=False, waits=True)),
    "asyncio-bare": ("throughput", "bare asyncio tasks, gathered (no store)",
                     lambda a: asyncio_throughput(a.n)),
    "capsule-thread": ("throughput", "capsule_nb thread, t.submit() x N",
                       lambda a: capsule_throughput(a.n, "thread", awaited=False)),
    "capsule-thread-awaited": ("throughput", "capsule_nb thread, gather(await t.submit()) x N",
                               lambda a: capsule_throughput(a.n, "thread", awaited=True)),
    "huey-normal": ("throughput", "SqliteHuey synchronous=NORMAL (like capsule_nb)",
                    lambda a: huey_throughput(a.huey_n, "normal", a.huey_workers, a.huey_poll)),
    "huey-normal-2w": ("throughput", "SqliteHuey NORMAL, 2 workers (issue 15's setup)",
                       lambda a: huey_throughput(a.huey_n, "normal", 2, a.huey_poll)),
    "huey-default": ("throughput", "SqliteHuey defaults (synchronous=FULL)",
                     lambda a: huey_throughput(a.huey_n, "default", a.huey_workers, a.huey_poll)),
    "capsule-async-latency": ("latency", "capsule_nb async",
                              lambda a: capsule_latency(a.latency_n, "async")),
    "capsule-thread-latency": ("latency", "capsule_nb thread",
                               lambda a: capsule_latency(a.latency_n, "thread")),
    "huey-latency": ("latency", "SqliteHuey NORMAL, poll {poll}",
                     lambda a: huey_latency(a.latency_n, "normal", a.huey_workers, a.huey_poll)),
    "huey-latency-default-poll": ("latency", "SqliteHuey NORMAL, default poll (0.1 s)",
                                  lambda a: huey_latency(a.huey_default_poll_n, "normal", a.huey_workers, None)),
}


def _run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name,
           "--n", str(args.n), "--huey-n", str(args.huey_n), "--latency-n", str(args.latency_n),
           "--huey-workers", str(args.huey_workers), "--huey-poll", str(args.huey_poll),
           "--huey-default-poll-n", str(args.huey_default_poll_n)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {args.case_timeout:g} s (hung?)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(lines[-1])


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    def best(name: str) -> dict[str, Any] | None:
        runs = [r for r in results.get(name, []) if "error" not in r]
        if not runs:
            return None
        if CASES[name][0] == "throughput":
            return sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
        return sorted(runs, key=lambda r: r["p50_ms"])[len(runs) // 2]

    cpus = os.cpu_count()
    print()
    print(f"capsule_nb runtime benchmark  (python {sys.version.split()[0]}, {cpus} cpus, "
          f"repeat={args.repeat}, median run shown)")
    print()
    huey_n = best("huey-normal")
    huey_d = best("huey-default")

    def ratio(r: dict[str, Any], base: dict[str, Any] | None) -> str:
        if base is None:
            return ""
        x = r["rate"] / base["rate"]
        return f"{x:.1f}x {'ok' if x >= AIM_RATIO else '--'}"

    head = (f"{'no-op tasks: submitted, completed, on disk':48} {'N':>6} {'tasks/s':>9} {'>=10k':>5}"
            f" {'x huey NORMAL':>13} {'x huey FULL':>12}")
    print(head)
    print("-" * len(head))
    for name, (group, label, _) in CASES.items():
        if group != "throughput" or name not in results:
            continue
        r = best(name)
        if r is None:
            err = next((x["error"] for x in results[name] if "error" in x), "?")
            print(f"{label:48} ERROR {err}")
            continue
        mine = name.startswith("capsule")
        aim = ("ok" if r["rate"] >= AIM_RATE else "--") if mine else ""
        bad = "" if r["completed_on_disk"] == r["n"] else f"  (only {r['completed_on_disk']} on disk!)"
        print(f"{label:48} {r['n']:>6} {_fmt_rate(r['rate']):>9} {aim:>5}"
              f" {ratio(r, huey_n) if mine else '':>13} {ratio(r, huey_d) if mine else '':>12}{bad}")
    print()
    print("  phases (s from first submit): submitted / all completed / flushed")
    for name, (group, label, _) in CASES.items():
        r = best(name) if group == "throughput" and name in results else None
        if r:
            print(f"  {name:24} {r['submit_seconds']:7.3f} {r['complete_seconds']:7.3f} {r['seconds']:7.3f}")

    def paired(top: str, bottom: str) -> tuple[float, str] | None:
        """The median of ``top``'s rate over ``bottom``'s, round by round (the two measured
        seconds apart, so drift in the machine's speed cancels), and the rounds' ratios."""
        pairs = [(a["rate"] / b["rate"]) for a, b in zip(results.get(top, []), results.get(bottom, []))
                 if "error" not in a and "error" not in b]
        if not pairs:
            return None
        rounds = f" (rounds: {', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else ""
        return statistics.median(pairs), rounds

    # (top, bottom, what the ratio is, its aim as (at least?, value), and what the aim says)
    ratios = [
        ("capsule-async-waits", "capsule-async", "gather(h.wait()) vs the same runs seen from a subscription",
         (True, 0.8), "aim >= 0.8x"),
        ("capsule-async-waits", "huey-normal", "with waits vs SqliteHuey NORMAL", (True, AIM_RATIO), "aim >= 5x"),
        ("capsule-async-waits", "huey-normal-2w", "with waits vs SqliteHuey NORMAL with 2 workers, as issue 15 "
         "measured it", (True, AIM_RATIO), "the line above is the aim: Huey's fastest setting"),
        ("asyncio-bare", "capsule-async-waits", "bare asyncio vs capsule_nb with waits", (False, 10.0), "aim <= 10x"),
    ]
    if "capsule-async-waits" in results:
        print()
        print("  waiting on many runs (the hot path users take), median of the rounds' ratios:")
        for top, bottom, what, (at_least, aim), said in ratios:
            if r := paired(top, bottom):
                met = r[0] >= aim if at_least else r[0] <= aim
                print(f"    {what}: {r[0]:.2f}x {'ok' if met else '--'} ({said}){r[1]}")

    lat_rows = [(n, c) for n, c in CASES.items() if c[0] == "latency" and n in results]
    if lat_rows:
        print()
        head = f"{'submit -> body starts (sequential)':48} {'N':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'max ms':>8}"
        print(head)
        print("-" * len(head))
        for name, (_, label, _) in lat_rows:
            r = best(name)
            label = label.format(poll=f"{args.huey_poll * 1e3:g} ms")
            if r is None:
                err = next((x["error"] for x in results[name] if "error" in x), "?")
                print(f"{label:48} ERROR {err}")
                continue
            print(f"{label:48} {r['n']:>6} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f} {r['max_ms']:8.3f}")
        h = best("huey-latency")
        for name in ("capsule-async-latency", "capsule-thread-latency"):
            c = best(name) if name in results else None
            if c and h:
                print(f"  {name}: p50 {h['p50_ms'] / c['p50_ms']:.1f}x, p99 {h['p99_ms'] / c['p99_ms']:.1f}x "
                      f"lower than SqliteHuey (poll {args.huey_poll * 1e3:g} ms)")
    print()
    print(f"aims: >= {AIM_RATE:,} persisted tasks/s on 2 cores, and >= {AIM_RATIO:g}x SqliteHuey "
          f"(ok = aim met, -- = missed). Huey NORMAL = same SQLite durability as capsule_nb "
          f"(WAL, synchronous=NORMAL); FULL = SqliteHuey's defaults (fsync per commit).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="tasks per capsule_nb throughput case (default 20000)")
    p.add_argument("--huey-n", type=int, default=None, help="tasks per Huey throughput case (default: --n)")
    p.add_argument("--latency-n", type=int, default=1000, help="sequential submits per latency case")
    p.add_argument("--huey-workers", type=int, default=1,
                   help="Huey consumer worker threads (default 1: its fastest setting for no-op tasks "
                        "on 2 cores; more workers contend for the queue's write lock)")
    p.add_argument("--huey-poll", type=float, default=0.001,
                   help="Huey worker poll interval, s, for the main Huey cases (default 0.001)")
    p.add_argument("--huey-default-poll-n", type=int, default=100,
                   help="samples for the latency case with Huey's default 0.1 s polling (0 = skip)")
    p.add_argument("--case-timeout", type=float, default=120.0, help="seconds before a case counts as hung")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median is shown")
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument("--skip", default="", help="comma-separated substrings of case names to skip")
    p.add_argument("--json", help="also write all raw results to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--profile", metavar="CASE", help="run CASE in this process under cProfile")
    p.add_argument("--profile-sort", default="tottime", help="pstats sort key (default tottime)")
    args = p.parse_args()
    if args.huey_n is None:
        args.huey_n = args.n

    if args.case:
        try:
            result = CASES[args.case][2](args)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        os._exit(0)  # do not wait for the libraries' exit hooks: the figures are out

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        result = CASES[args.profile][2](args)
        prof.disable()
        print(json.dumps(result))
        pstats.Stats(prof).strip_dirs().sort_stats(args.profile_sort).print_stats(30)
        return

    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    names = [n for n in CASES
             if (not only or any(s in n for s in only)) and not any(s in n for s in skip)
             and not (n == "huey-latency-default-poll" and args.huey_default_poll_n <= 0)]
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for _ in range(args.repeat):  # in rounds, each case once a round: peers are measured minutes apart at most
        for name in names:
            t = time.perf_counter()
            r = _run_child(name, args)
            results.setdefault(name, []).append(r)
            what = r.get("error") or (f"{r['rate']:,.0f} tasks/s" if "rate" in r else f"p50 {r['p50_ms']:.3f} ms")
            print(f"  {name:28} {what:>22}   ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    _report(results, args)
    print(f"(total {time.perf_counter() - started:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
