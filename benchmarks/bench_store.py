"""Store benchmarks: locks, lock contention between processes, collections.

    python benchmarks/bench_store.py [--docs 10000]

Prints each figure next to a reference measured in the same run:
- lock acquire+release against a bare diskcache transaction doing the same
  get/set/delete (the floor for a lock kept in SQLite);
- two processes contending for one key: runs started per second, and that
  runs never overlapped;
- collection insert and filtered find over N documents against a plain
  Python list comprehension over the same dicts (the floor for an in-memory
  filter). Aim: a filtered find over 10,000 documents under 50 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import diskcache

import capsule_nb as cpsl
from capsule_nb.store.owners import owner_id


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - start


def bench_locks(n: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        app = cpsl.App(home=home)
        store, me = app.store, owner_id()

        def capsule() -> None:
            for i in range(n):
                store.locks.acquire("k", f"t{i}", me)
                store.locks.release("k", f"t{i}")

        ours = n / timed(capsule)
        app.close()
    with tempfile.TemporaryDirectory() as home:
        cache = diskcache.Cache(home)

        def bare() -> None:
            for i in range(n):
                with cache.transact():
                    cache.get("lock/k")
                    cache.set("lock/k", i)
                with cache.transact():
                    cache.get("lock/k")
                    cache.delete("lock/k")

        floor = n / timed(bare)
        cache.close()
    print(f"lock acquire+release     capsule_nb {ours:9,.0f}/s   bare diskcache {floor:9,.0f}/s   ratio {ours / floor:.2f}")


def _contender(home: str, seconds: float, queue: "mp.Queue[tuple[int, list[tuple[float, float]]]]") -> None:
    app = cpsl.App(home=home)

    @app.task(lock="shared", on_lock="reject")
    def work() -> tuple[float, float]:
        start = time.time()
        time.sleep(0.001)
        return start, time.time()

    import asyncio

    spans = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            handle = work.submit()
        except cpsl.LockedError:
            continue
        spans.append(asyncio.run(handle.result(timeout=30)))
    app.close()
    queue.put((os.getpid(), spans))


def bench_contention(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as home:
        cpsl.App(home=home).close()
        queue: mp.Queue = mp.get_context("spawn").Queue()
        procs = [mp.get_context("spawn").Process(target=_contender, args=(home, seconds, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
    spans = sorted(s for _, runs in results for s in runs)
    overlaps = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    per = [len(runs) for _, runs in results]
    print(f"two processes, one key   {sum(per) / seconds:9,.0f} runs/s (split {per[0]}/{per[1]}), overlapping runs: {overlaps}")


def bench_collections(docs: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        app = cpsl.App(home=home)
        coll = app.collection("bench")
        rows = [{"n": i, "kind": "odd" if i % 2 else "even", "score": i % 97} for i in range(docs)]
        insert_many = docs / timed(lambda: coll.insert_many(rows))
        one_by_one = 500 / timed(lambda: [coll.insert_one({"extra": i}) for i in range(500)])
        query = {"kind": "even", "score": {"$gte": 50}, "n": {"$lt": docs // 2}}
        times = [timed(lambda: coll.find(query)) for _ in range(20)]
        plain = list(app.store.docs("bench"))
        floor = [timed(lambda: [d for d in plain if d.get("kind") == "even" and d.get("score", -1) >= 50
                                 and d.get("n", docs) < docs // 2]) for _ in range(20)]
        count_ms = statistics.median(timed(lambda: coll.count(query)) for _ in range(20)) * 1000
        app.close()
    p50 = statistics.median(times) * 1000
    print(f"insert_many              {insert_many:9,.0f} docs/s   insert_one {one_by_one:,.0f} docs/s")
    print(f"find with filter, {docs:,} docs  p50 {p50:.1f} ms (aim < 50 ms)   count {count_ms:.1f} ms   "
          f"plain list comprehension {statistics.median(floor) * 1000:.1f} ms   ratio {p50 / (statistics.median(floor) * 1000):.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locks", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--docs", type=int, default=10_000)
    args = parser.parse_args(argv)
    print(f"capsule_nb store benchmarks (python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    bench_locks(args.locks)
    bench_contention(args.seconds)
    bench_collections(args.docs)


if __name__ == "__main__":
    main()
