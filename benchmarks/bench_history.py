#!/usr/bin/env python
"""History costs nothing (issue 14): a store with many finished runs, side by side with an empty one.

    python benchmarks/bench_history.py                    # 1,000,000 runs (built once, then cached)
    python benchmarks/bench_history.py --runs 20000       # a quick run
    python benchmarks/bench_history.py --only open,board  # some cases (name substrings; --skip too)
    python benchmarks/bench_history.py --rebuild          # build the cached stores again
    python benchmarks/bench_history.py --json out.json    # keep the raw figures as well

Stores are built through the public API only (apps, tasks, submits, collections)
and cached under --cache; every case runs in a fresh interpreter on its own copy
of a cached store, once on the empty store and once on the big one, and the table
prints the two side by side. See benchmarks/README.md for the cases and the aims.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

APPS = ("alpha", "beta")
KEEP_ALL = 10**9  # keep_finished: retention off, so the history stays whole
CHUNK = 10_000  # runs (or documents) in flight at once while building: never a million handles
# One cycle of the workload: ("app/task", whether the run fails). 2 runs of 20 fail (10%), and the
# tasks that fail sometimes also complete, so a status filter has to pick among a task's runs.
CYCLE = ([("alpha/ingest", False)] * 8 + [("alpha/report", False)] * 5 + [("alpha/report", True)]
         + [("beta/sync", False)] * 5 + [("beta/sync", True)])
TASKS = sorted({key for key, _ in CYCLE})
QUERIED = "alpha/report"  # the task whose failed runs the query cases count and find
DOC_STATUSES = ("open", "closed", "waiting", "spam", "merged")
COLLECTION = "tickets"
WORKLOAD = 1  # kept in each cached store's manifest; change it when the workload above changes
REPEAT_CALLS = 5  # calls after the first, for the median of a query


# --------------------------------------------------------------------------- #
# the workload, through the public API (used by the builds, the cases and the soak)
# --------------------------------------------------------------------------- #


async def _body(fail: bool = False) -> None:
    """Every task's body: nothing, or an error when asked (the run is then failed: no retries)."""
    if fail:
        raise RuntimeError("this run fails on purpose")


def open_apps(home: str, keep_finished: int = KEEP_ALL) -> dict[str, Any]:
    """The two apps on one store with their tasks: ``{"alpha/ingest": Task, ..., "alpha": App}``.

    Every case opens the store this way, so a case on the empty store does the same work."""
    import capsule_nb as cpsl

    found: dict[str, Any] = {}
    for app_name in APPS:
        app = cpsl.App(app_name, home=home, keep_finished=keep_finished)
        found[app_name] = app
        for key in TASKS:
            if key.startswith(app_name + "/"):
                found[key] = app.task(name=key.split("/", 1)[1], retries=0)(_body)
    return found


def close_apps(found: dict[str, Any]) -> None:
    for app_name in APPS:
        found[app_name].close()


async def run_wave(found: dict[str, Any], n: int, chunk: int = CHUNK) -> None:
    """``n`` runs of the cycle, submitted in chunks and waited to their end (no handle outlives its chunk)."""
    cycle = [(found[key], fail) for key, fail in CYCLE]
    for start in range(0, n, chunk):
        handles = [_submit(*cycle[i % len(cycle)]) for i in range(start, min(n, start + chunk))]
        statuses = await asyncio.gather(*(h.wait(600) for h in handles))
        unfinished = [s for s in statuses if s not in ("completed", "failed")]
        if unfinished:
            raise RuntimeError(f"runs ended {sorted(set(unfinished))} instead of completed/failed")


def _submit(task: Any, fail: bool) -> Any:
    return task.submit(fail=True) if fail else task.submit()


async def census(found: dict[str, Any]) -> dict[str, int]:
    """How many runs of each task are completed and failed, as the public ``count`` says."""
    counts = {}
    for key in TASKS:
        for status in ("completed", "failed"):
            counts[f"{key}/{status}"] = int(await found[key].count(status=status))
    return counts


def _doc(i: int) -> dict[str, Any]:
    return {"n": i, "status": DOC_STATUSES[i % len(DOC_STATUSES)], "owner": f"user{i % 100:02d}",
            "at": i, "title": f"ticket {i}"}


def expected_docs_find(n: int) -> list[int]:
    """What the collection case must find in a store of ``n`` documents: the 25 newest open ones."""
    return sorted((i for i in range(n) if _doc(i)["status"] == "open"), reverse=True)[:25]


# --------------------------------------------------------------------------- #
# builds (each in its own interpreter, writing into the cache)
# --------------------------------------------------------------------------- #


def build_history(home: str, runs: int) -> dict[str, Any]:
    """A store with ``runs`` finished runs of two apps (10% failed), retention off."""
    async def main() -> dict[str, Any]:
        found = open_apps(home)
        t0 = time.perf_counter()
        done = 0
        while done < runs:
            wave = min(runs - done, 100_000)
            await run_wave(found, wave)
            done += wave
            print(f"  built {done:,} of {runs:,} runs ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        counts = await census(found)
        close_apps(found)
        return {"seconds": time.perf_counter() - t0, "counts": counts, "total": sum(counts.values())}

    return asyncio.run(main())


def build_docs(home: str, docs: int) -> dict[str, Any]:
    """A store with ``docs`` documents in one collection, inserted in chunks with ``insert_many``."""
    async def main() -> dict[str, Any]:
        found = open_apps(home)
        tickets = found["alpha"].collection(COLLECTION)
        t0 = time.perf_counter()
        for start in range(0, docs, CHUNK):
            await tickets.insert_many([_doc(i) for i in range(start, min(docs, start + CHUNK))])
        seconds = time.perf_counter() - t0
        total = int(await tickets.count())
        close_apps(found)
        return {"seconds": seconds, "total": total}

    return asyncio.run(main())


def settle(home: str) -> dict[str, Any]:
    """Open the cached store once and close it, so a one-time migration happens here, not in a case."""
    async def main() -> dict[str, Any]:
        t0 = time.perf_counter()
        close_apps(open_apps(home))
        return {"seconds": time.perf_counter() - t0}

    return asyncio.run(main())


# --------------------------------------------------------------------------- #
# the cases (each in its own interpreter, on its own copy of a store)
# --------------------------------------------------------------------------- #


def case_open(home: str) -> dict[str, Any]:
    """Open the store and see one new run completed: what a kernel pays before its first result."""
    import resource

    async def main() -> dict[str, Any]:
        t0 = time.perf_counter()
        found = open_apps(home)
        t_open = time.perf_counter()
        handle = await found["alpha/ingest"].submit()
        status = await handle.wait(600)
        t_done = time.perf_counter()
        if status != "completed":
            raise RuntimeError(f"the first run ended {status}")
        result = {"seconds": t_done - t0, "open_seconds": t_open - t0,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_mb": _vm_rss_mb()}
        t_close = time.perf_counter()
        close_apps(found)
        result["close_seconds"] = time.perf_counter() - t_close
        return result

    return asyncio.run(main())


def case_cli_tasks(home: str) -> dict[str, Any]:
    """``capsule-nb tasks`` as a user types it: a whole new process, default limit, newest first."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "capsule_nb", "--home", home, "tasks"],
                          capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"capsule-nb tasks exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    lines = proc.stdout.strip().splitlines()
    rows = 0 if lines == ["no runs"] else len(lines) - 1  # a header line, then one line per run
    return {"seconds": seconds, "answer": rows}


async def _timed_calls(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """The first call's time, the median of the next REPEAT_CALLS, and the first call's answer."""
    t0 = time.perf_counter()
    answer = await call()
    first = time.perf_counter() - t0
    later = []
    for _ in range(REPEAT_CALLS):
        t0 = time.perf_counter()
        await call()
        later.append(time.perf_counter() - t0)
    return first, statistics.median(later), answer


def _query_case(home: str, query: Callable[[dict[str, Any]], Callable[[], Any]],
                answer: Callable[[Any], Any]) -> dict[str, Any]:
    """Open the store (not timed), then time only ``query``: its first call and the median of more."""
    async def main() -> dict[str, Any]:
        found = open_apps(home)
        first, median, result = await _timed_calls(query(found))
        close_apps(found)
        return {"first_ms": 1e3 * first, "median_ms": 1e3 * median, "answer": answer(result)}

    return asyncio.run(main())


def case_count_failed(home: str) -> dict[str, Any]:
    return _query_case(home, lambda found: lambda: found[QUERIED].count(status="failed"), int)


def case_find_failed(home: str) -> dict[str, Any]:
    return _query_case(home, lambda found: lambda: found[QUERIED].find(status="failed", limit=50),
                       lambda handles: [len(handles), sum(h.status() == "failed" for h in handles)])


def case_docs_find(home: str) -> dict[str, Any]:
    """An equality filter, a sort and a page of 25, as a notebook's table asks for it."""
    def query(found: dict[str, Any]) -> Callable[[], Any]:
        tickets = found["alpha"].collection(COLLECTION)
        return lambda: tickets.find({"status": "open"}, sort={"at": -1}, limit=25)

    return _query_case(home, query, lambda docs: [d["n"] for d in docs])


def case_board(home: str) -> dict[str, Any]:
    """A board's first render: constructing it computes the state its view is first sent."""
    async def main() -> dict[str, Any]:
        from capsule_nb.ui import TaskBoard

        found = open_apps(home)
        t0 = time.perf_counter()
        board = TaskBoard(app=found["alpha"])
        seconds = time.perf_counter() - t0
        total, cards = board.total, sum(len(lane["cards"]) for lane in board.lanes)
        board.close()
        close_apps(found)
        return {"seconds": seconds, "answer": total, "cards": cards}

    return asyncio.run(main())


def case_soak(home: str, runs: int, wave: int, keep: int) -> dict[str, Any]:
    """Steady load with retention on: the store folder's size after each wave of runs."""
    async def main() -> dict[str, Any]:
        found = open_apps(home, keep_finished=keep)
        base = _folder_sizes(Path(home))
        rows, done, t0 = [], 0, time.perf_counter()
        while done < runs:
            n = min(wave, runs - done)
            # Chunks well under keep_finished: a run pruned before its waiter looks is a KeyError.
            await run_wave(found, n, chunk=max(1, min(CHUNK, keep // 2)))
            done += n
            waited = await _until_pruned(found, keep)
            rows.append({"runs": done, "seconds": time.perf_counter() - t0, "retention_wait": waited,
                         "kept": sum((await _kept(found)).values()),
                         "rss_mb": _vm_rss_mb(), **_folder_sizes(Path(home))})
            print(f"  soak: {done:,} runs, store {rows[-1]['store_mb']:.1f} MB", file=sys.stderr, flush=True)
        close_apps(found)
        return {"empty": base, "waves": rows}

    return asyncio.run(main())


async def _until_pruned(found: dict[str, Any], keep: int, deadline: float = 120.0) -> float | None:
    """Seconds until every app keeps at most ``keep`` runs (a maintenance pass prunes); None: never."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline:
        if all(n <= keep for n in (await _kept(found)).values()):
            return time.perf_counter() - t0
        await asyncio.sleep(0.1)
    return None


async def _kept(found: dict[str, Any]) -> dict[str, int]:
    """Runs each app has in the store, as ``app.tasks.count()`` says."""
    return {name: int(await found[name].tasks.count()) for name in APPS}


def _folder_sizes(home: Path) -> dict[str, float]:
    """Bytes on disk of the store folder, and the part in SQLite write-ahead logs (``*-wal``)."""
    files = [p for p in home.rglob("*") if p.is_file()]
    return {"store_mb": sum(p.stat().st_size for p in files) / 2**20,
            "wal_mb": sum(p.stat().st_size for p in files if p.name.endswith("-wal")) / 2**20}


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- #
# the case table and the aims
# --------------------------------------------------------------------------- #


class Case(NamedTuple):
    store: str  # which cached store the case reads: "history" or "docs"
    run: Callable[[str], dict[str, Any]]


CASES: dict[str, Case] = {
    "open": Case("history", case_open),
    "cli-tasks": Case("history", case_cli_tasks),
    "count-failed": Case("history", case_count_failed),
    "find-failed": Case("history", case_find_failed),
    "board": Case("history", case_board),
    "docs-find": Case("docs", case_docs_find),
}


class Aim(NamedTuple):
    text: str
    met: Callable[[float, float], bool]  # (empty, big) -> aim met


def at_most_times(x: float) -> Aim:
    return Aim(f"<= {x:g}x empty", lambda empty, big: big <= x * empty)


def at_most(limit: float, unit: str) -> Aim:
    return Aim(f"<= {limit:g} {unit}", lambda empty, big: big <= limit)


def at_most_over(extra: float, unit: str) -> Aim:
    return Aim(f"<= +{extra:g} {unit}", lambda empty, big: big - empty <= extra)


# (case, figure, label, unit, aim or None); figures are seconds, ms or MB as their names say
ROWS = [
    ("open", "seconds", "open -> first run completed", "s", at_most_times(2)),
    ("open", "open_seconds", "  of which opening the two apps", "s", None),
    ("open", "close_seconds", "  closing them afterwards (not in the aim)", "s", None),
    ("open", "maxrss_mb", "peak RSS of the opening process", "MB", at_most_over(50, "MB")),
    ("open", "rss_mb", "  its RSS after the first run", "MB", None),
    ("cli-tasks", "seconds", "capsule-nb tasks (50 newest), whole process", "s", at_most_times(2)),
    ("count-failed", "first_ms", 'await t.count(status="failed"), first call', "ms", at_most(50, "ms")),
    ("count-failed", "median_ms", f"  median of the next {REPEAT_CALLS}", "ms", at_most(50, "ms")),
    ("find-failed", "first_ms", 'await t.find(status="failed", limit=50), first', "ms", at_most(50, "ms")),
    ("find-failed", "median_ms", f"  median of the next {REPEAT_CALLS}", "ms", at_most(50, "ms")),
    ("board", "seconds", "TaskBoard(app=app): first state", "s", Aim("< 1 s", lambda empty, big: big < 1)),
    ("docs-find", "first_ms", "collection find(eq, sort, limit=25), first", "ms", at_most(100, "ms")),
    ("docs-find", "median_ms", f"  median of the next {REPEAT_CALLS}", "ms", at_most(100, "ms")),
]
SOAK_GROWTH = 0.10  # the later waves' median store size within 10% of the earlier waves' (after warm-up)


# What each case must answer on a store, from the manifest of what its build counted (public API).
EXPECTED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "cli-tasks": lambda built: min(50, built["total"]),
    "count-failed": lambda built: built["counts"][f"{QUERIED}/failed"],
    "find-failed": lambda built: [min(50, built["counts"][f"{QUERIED}/failed"])] * 2,  # found, of them failed
    "board": lambda built: built["total"],
    "docs-find": lambda built: expected_docs_find(built["total"]),
}


# --------------------------------------------------------------------------- #
# the parent: cached stores, copies, children, the table
# --------------------------------------------------------------------------- #


def _child(args: argparse.Namespace, *extra: str, timeout: float | None = None,
           quiet: bool = True) -> dict[str, Any]:
    """Run this file in a fresh interpreter with ``extra`` arguments; its last stdout line is JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines() or [f"exit {proc.returncode}"]
        return {"error": tail[-1]}
    return json.loads(lines[-1])


def cached_store(args: argparse.Namespace, kind: str, size: int) -> tuple[Path, dict[str, Any]]:
    """The cached store ``<kind>-<size>``, built first when missing (or with --rebuild).

    A build goes to a ``.partial`` folder that is renamed once its manifest is written, so an
    interrupted build is never taken for a finished one; a store built for another WORKLOAD is
    built again."""
    root = Path(args.cache).expanduser()
    final = root / f"{kind}-{size}"
    manifest = final / "manifest.json"
    if final.exists() and (args.rebuild or not manifest.exists()
                           or json.loads(manifest.read_text()).get("workload") != WORKLOAD):
        shutil.rmtree(final)
    if not manifest.exists():
        partial = root / f"{kind}-{size}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        print(f"building {final.name} (through the public API) ...", file=sys.stderr, flush=True)
        built = _child(args, "--build", kind, "--size", str(size), "--home", str(partial / "store"), quiet=False)
        if "error" in built:
            raise SystemExit(f"building {final.name} failed: {built['error']}")
        import capsule_nb

        built.update(kind=kind, size=size, workload=WORKLOAD, capsule_nb=capsule_nb.__version__, built_at=dt.datetime.now().isoformat(timespec="seconds"))
        (partial / "manifest.json").write_text(json.dumps(built, indent=1))
        partial.rename(final)
    return final / "store", json.loads(manifest.read_text())


def _copy(store: Path, scratch: Path) -> Path:
    """A private copy of a cached store (``cp -a``): opening may write, and the cache stays as built."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(store), str(scratch / "store")], check=True)
    os.sync()  # a store at rest: the copy's pages on disk, not pending for the case's first fsync
    return scratch / "store"


def run_case(args: argparse.Namespace, name: str, store: Path) -> dict[str, Any]:
    """``--repeat`` runs of one case on fresh copies of ``store``; the one with the median figure."""
    runs = []
    for _ in range(args.repeat):
        home = _copy(store, Path(args.cache).expanduser() / "scratch")
        result = _child(args, "--case", name, "--home", str(home), timeout=args.case_timeout)
        shutil.rmtree(home.parent, ignore_errors=True)
        if "error" in result:
            return result
        runs.append(result)
    figure = next(key for case, key, *_ in ROWS if case == name)
    return sorted(runs, key=lambda r: r[figure])[len(runs) // 2]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if unit == "MB" else f"{value:,.3f}" if unit == "s" else f"{value:,.2f}"


def report(results: dict[str, dict[str, dict[str, Any]]], manifests: dict[str, dict[str, Any]]) -> None:
    """The side-by-side table: every figure on the big store next to the empty store's, aims marked."""
    print()
    print(f"capsule_nb history benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    for key, built in manifests.items():
        if key.endswith("-big"):
            print(f"  {_described(built)}\n    built in {built['seconds']:.0f} s ({built['built_at']}, "
                  f"capsule_nb {built['capsule_nb']}); first open in this run {built['first_open_seconds']:.1f} s "
                  f"(with the migration, if an older version built it)")
    print()
    head = f"{'':50} {'empty':>9} {'big':>10} {'big/empty':>10}   {'aim':<14}"
    print(head + "\n" + "-" * len(head))
    for name, key, label, unit, aim in ROWS:
        if name not in results:
            continue
        empty, heavy = results[name]["empty"], results[name]["big"]
        if "error" in empty or "error" in heavy:
            print(f"{label + f' ({unit})':50} ERROR {empty.get('error') or heavy.get('error')}")
            continue
        e, b = empty[key], heavy[key]
        ratio = f"{b - e:+,.1f}" if unit == "MB" else f"{b / e:.1f}x" if e else ""
        mark = f"{aim.text:<14} {'ok' if aim.met(e, b) else '--'}" if aim else ""
        print(f"{label + f' ({unit})':50} {_fmt(e, unit):>9} {_fmt(b, unit):>10} {ratio:>10}   {mark}")
    for line in wrong_answers(results, manifests):
        print(f"  WRONG ANSWER: {line}")
    print()
    print("ok = aim met, -- = missed. The empty store is built the same way, with no runs and no documents.")


def _described(built: dict[str, Any]) -> str:
    if built["kind"] == "docs":
        return f"docs store: {built['total']:,} documents in the collection {COLLECTION!r}:"
    failed = sum(v for k, v in built["counts"].items() if k.endswith("/failed"))
    return (f"history store: {built['total']:,} finished runs ({failed:,} failed) of apps {', '.join(APPS)}, "
            f"tasks {', '.join(TASKS)}:")


def wrong_answers(results: dict[str, dict[str, dict[str, Any]]], manifests: dict[str, dict[str, Any]]) -> list[str]:
    """Cases whose answer (a count, a page, a board's total) differs from what the build stored:
    a fast wrong answer is no answer."""
    wrong = []
    for name, sides in results.items():
        for side, result in sides.items():
            if name in EXPECTED and "error" not in result:
                expected = EXPECTED[name](manifests[f"{CASES[name].store}-{side}"])
                if result["answer"] != expected:
                    wrong.append(f"{name} on the {side} store answered {result['answer']!r}, expected {expected!r}")
    return wrong


def report_soak(soak: dict[str, Any], args: argparse.Namespace) -> None:
    """One line per wave: the store's size (and its WAL part) next to the empty store's, then the aim."""
    if "error" in soak:
        print(f"\nsoak: ERROR {soak['error']}")
        return
    waves, empty = soak["waves"], soak["empty"]
    print()
    print(f"steady load: {args.soak_runs:,} runs in waves of {args.soak_wave:,}, keep_finished={args.soak_keep:,} "
          f"per app; empty store {empty['store_mb']:.1f} MB")
    head = f"{'runs':>10} {'seconds':>8} {'kept':>7} {'prune s':>8} {'store MB':>9} {'of it WAL':>10} {'RSS MB':>8}"
    print(head + "\n" + "-" * len(head))
    for w in waves:
        wait = "never" if w["retention_wait"] is None else f"{w['retention_wait']:.1f}"
        print(f"{w['runs']:>10,} {w['seconds']:>8.1f} {w['kept']:>7,} {wait:>8} {w['store_mb']:>9.1f} "
              f"{w['wal_mb']:>10.1f} {w['rss_mb']:>8.1f}")
    # The store fills up to its working size first (kept runs, the change feed's window): skip that.
    warmup = args.soak_runs // 3 if args.soak_warmup is None else args.soak_warmup
    # One wave's size moves with how much the change feed's window holds just then, so the
    # aim compares the median of the later waves with the median of the earlier ones: a trend.
    steady = [w["store_mb"] for w in waves if w["runs"] > warmup] or [w["store_mb"] for w in waves]
    half = len(steady) // 2
    earlier, later = statistics.median(steady[: max(1, half)]), statistics.median(steady[half:])
    growth = later / earlier - 1
    print(f"store size after {warmup:,} runs of warm-up: {min(steady):.1f} to {max(steady):.1f} MB; median of the "
          f"later waves vs the earlier: {growth:+.1%} (aim: within {SOAK_GROWTH:.0%}, flat) "
          f"{'ok' if abs(growth) <= SOAK_GROWTH else '--'}")


def _selected(args: argparse.Namespace, names: list[str]) -> list[str]:
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    return [n for n in names if (not only or any(s in n for s in only)) and not any(s in n for s in skip)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1_000_000, help="finished runs in the big store (default 1,000,000)")
    p.add_argument("--docs", type=int, default=100_000, help="documents in the collection case (default 100,000)")
    p.add_argument("--cache", default="~/.cache/capsule_nb_bench",
                   help="folder of the built stores (history-<runs>, docs-<docs>) and the scratch copies")
    p.add_argument("--rebuild", action="store_true", help="build the cached stores the chosen cases use again")
    p.add_argument("--soak-runs", type=int, default=100_000, help="runs of the steady-load case (default 100,000)")
    p.add_argument("--soak-wave", type=int, default=10_000, help="runs per wave of the steady-load case")
    p.add_argument("--soak-keep", type=int, default=1_000, help="keep_finished per app in the steady-load case")
    p.add_argument("--soak-warmup", type=int, default=None,
                   help="runs of the steady-load case before its size counts (default: a third of --soak-runs)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case and store; the median is shown")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds before a case counts as hung")
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run "
                                              f"({', '.join([*CASES, 'soak'])})")
    p.add_argument("--skip", default="", help="comma-separated substrings of case names to skip")
    p.add_argument("--json", help="also write all raw results to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case on --home, print JSON
    p.add_argument("--build", help=argparse.SUPPRESS)  # internal: build a store of --size into --home
    p.add_argument("--settle", action="store_true", help=argparse.SUPPRESS)  # internal: open --home once
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case or args.build or args.settle:
        print(json.dumps(_in_child(args)), flush=True)
        os._exit(0)  # do not wait for the libraries' exit hooks: the figures are out

    started = time.perf_counter()
    names = _selected(args, list(CASES))
    stores, manifests = prepare_stores(args, {CASES[n].store for n in names})
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        for side in ("empty", "big"):
            t = time.perf_counter()
            results.setdefault(name, {})[side] = run_case(args, name, stores[f"{CASES[name].store}-{side}"])
            print(f"  {name:14} {side:6} ({time.perf_counter() - t:.1f} s) {results[name][side].get('error', '')}",
                  file=sys.stderr, flush=True)
    if names:
        report(results, manifests)
    soak = None
    if _selected(args, ["soak"]):
        soak = _soak(args)
        report_soak(soak, args)
    print(f"(total {time.perf_counter() - started:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "stores": manifests, "results": results, "soak": soak}, fh, indent=1)


def prepare_stores(args: argparse.Namespace, kinds: set[str]) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The cached stores the chosen cases read (``history-empty``, ``history-big``, ``docs-...``), each
    opened once in place (see ``settle``), and their manifests: what their builds counted."""
    stores: dict[str, Path] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for kind, size in (("history", args.runs), ("docs", args.docs)):
        if kind not in kinds:
            continue
        for side, n in (("empty", 0), ("big", size)):
            store, manifests[f"{kind}-{side}"] = cached_store(args, kind, n)
            settled = _child(args, "--settle", "--home", str(store), timeout=args.case_timeout)
            if "error" in settled:
                raise SystemExit(f"opening the cached store {store} failed: {settled['error']}")
            manifests[f"{kind}-{side}"]["first_open_seconds"] = settled["seconds"]
            stores[f"{kind}-{side}"] = store
    return stores, manifests


def _soak(args: argparse.Namespace) -> dict[str, Any]:
    """The steady-load case, in its own interpreter on a fresh store beside the cache."""
    scratch = Path(args.cache).expanduser() / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        return _child(args, "--case", "soak", "--home", str(scratch / "store"), "--soak-runs", str(args.soak_runs),
                      "--soak-wave", str(args.soak_wave), "--soak-keep", str(args.soak_keep),
                      timeout=args.case_timeout, quiet=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _in_child(args: argparse.Namespace) -> dict[str, Any]:
    """What a child interpreter was started for; an exception becomes ``{"error": ...}``."""
    try:
        if args.build == "history":
            return build_history(args.home, args.size)
        if args.build == "docs":
            return build_docs(args.home, args.size)
        if args.settle:
            return settle(args.home)
        if args.case == "soak":
            return case_soak(args.home, args.soak_runs, args.soak_wave, args.soak_keep)
        return CASES[args.case].run(args.home)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    main()
