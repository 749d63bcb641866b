"""Four processes, one store, 2,000 queued runs over 20 lock keys: each runs once, none overlap."""

import time

from ..test_durability import lines_until, spawn

import capsule_nb as cpsl

WORKER = """
import asyncio
N, KEYS = int(os.environ["RUNS"]), int(os.environ["KEYS"])

@app.task(lock="key:{key}", on_lock="queue")
def guarded(key, n):
    start = time.time()
    time.sleep(0.001)
    return {"key": key, "n": n, "pid": os.getpid(), "start": start, "end": time.time()}

go = os.environ["GO"]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
handles = [guarded.submit(f"k{i % KEYS}", n=i) for i in range(N)]

async def all_done():
    return [await h.result(timeout=300) for h in handles]

results = asyncio.run(all_done())
app.store.flush()
print(len(results), flush=True)
print("done", flush=True)
"""


def test_queued_runs_over_shared_keys_run_once_and_never_overlap(tmp_path):
    go = tmp_path / "go"
    procs = [spawn(WORKER, tmp_path / "store", RUNS="500", KEYS="20", GO=str(go)) for _ in range(4)]
    for proc in procs:
        lines_until(proc, "ready")
    started = time.monotonic()
    go.touch()
    for proc in procs:
        assert lines_until(proc, "done", timeout=400) == ["500"]
    took = time.monotonic() - started
    app = cpsl.App(home=tmp_path / "store")
    records = [r for r in app.store.runs() if r["task_name"] == "guarded"]
    assert len(records) == 2000
    assert {r["status"] for r in records} == {"completed"}
    assert all(r["attempt"] == 1 for r in records)  # each ran exactly once
    by_key: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        by_key.setdefault(r["result"]["key"], []).append((r["result"]["start"], r["result"]["end"]))
    assert len(by_key) == 20
    for key, spans in by_key.items():
        spans.sort()
        overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
        assert overlaps == [], f"{key}: runs overlapped {overlaps[:3]}"
    assert len({r["result"]["pid"] for r in records}) == 4
    print(f"2,000 queued runs over 20 keys in 4 processes: {took:.1f}s")
    for proc in procs:
        proc.wait(30)
