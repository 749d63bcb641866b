"""200 process runs, a third segfault and a third time out: the rest complete, nothing is orphaned."""

import os
import time

from ..conftest import process_gone, until, worker_pids


async def test_crash_storm(app):
    pids = app.home / "pids"

    @app.task(process=True, timeout=0.3)
    def storm(n, path):
        import ctypes

        with open(path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if n % 3 == 0:
            ctypes.string_at(0)  # segfault
        elif n % 3 == 1:
            while True:  # past the timeout
                time.sleep(0.01)
        return n

    started = time.monotonic()
    handles = [storm.submit(n, str(pids)) for n in range(200)]
    statuses = [await h.wait(300) for h in handles]
    took = time.monotonic() - started
    assert [s for n, s in enumerate(statuses) if n % 3 == 2] == ["completed"] * len(range(2, 200, 3))
    assert [s for n, s in enumerate(statuses) if n % 3 == 1] == ["timeout"] * len(range(1, 200, 3))
    crashed = [h.snapshot() for n, h in enumerate(handles) if n % 3 == 0]
    assert {r["status"] for r in crashed} == {"failed"} and all("SIGSEGV" in r["error"] for r in crashed)
    assert [await h.result() for n, h in enumerate(handles) if n % 3 == 2] == list(range(2, 200, 3))

    @app.task(process=True, name="after")
    def after():
        return "pool recovered"

    assert await after.submit().result(timeout=60) == "pool recovered"
    live_workers = set(worker_pids(app.runtime.processes))
    used = {int(p) for p in pids.read_text().split()}
    await until(lambda: not [p for p in used - live_workers if not process_gone(p)], timeout=10)
    print(f"crash storm of 200 process runs: {took:.1f}s, {len(used)} worker processes used")
