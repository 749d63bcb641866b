"""Cancel among many processes on one store: the request reaches the run's owner, or settles
the run when the owner is dead; never a ``True`` that nothing follows."""

import os
import signal

import capsule_nb as cpsl

from ..conftest import process_gone, until_sync
from ..test_durability import lines_until, spawn

IDLE = """
print("ready", flush=True)
threading.Event().wait()
"""

TASKS = """
import asyncio

@app.task(retries=2)
async def async_forever():
    await asyncio.sleep(3600)

@app.task(retries=2)
def thread_forever():
    while True:
        time.sleep(0.01)

@app.task(process=True, retries=2)
def process_forever(path):
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    while True:
        time.sleep(0.01)
"""

OWNER = TASKS + """
rounds = int(os.environ.get("ROUNDS", "1"))
handles = [h for _ in range(rounds)
           for h in (async_forever.submit(), thread_forever.submit(), process_forever.submit(os.environ["PIDS"]))]
while any(h.snapshot()["status"] != "running" for h in handles) or (
        not os.path.exists(os.environ["PIDS"]) or len(open(os.environ["PIDS"]).read().split()) < rounds):
    time.sleep(0.01)
app.store.flush()
print(*(h.task_id for h in handles), flush=True)
print("running", flush=True)
while any(h.snapshot()["status"] != "cancelled" for h in handles):
    time.sleep(0.01)
print("stopped", flush=True)
threading.Event().wait()
"""

CANCELLER = """
import asyncio

async def cancel_one_by_one():
    for task_id in os.environ["IDS"].split():
        handle = app.get_task(task_id)
        asked = await handle.cancel()
        print(task_id, asked, await handle.wait(float(os.environ["WAIT"])), flush=True)

asyncio.run(cancel_one_by_one())
print("done", flush=True)
"""


def _stop(procs):
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(10)


def test_cancel_reaches_the_owner_among_ten_processes(tmp_path):
    """8 idle processes with an App open, 1 owner of async, thread and process runs (two of
    each), 1 canceller asking for one at a time: every run stops, and ``await h.wait()`` in
    the canceller shows it. Each request is a new race against the 8 idle pollers."""
    home, pids = tmp_path / "store", tmp_path / "pids"
    procs = []
    try:
        procs += [spawn(IDLE, home) for _ in range(8)]
        for proc in procs:
            lines_until(proc, "ready")
        owner = spawn(OWNER, home, PIDS=str(pids), ROUNDS="2")
        procs.append(owner)
        (ids,) = lines_until(owner, "running", timeout=60)
        canceller = spawn(CANCELLER, home, IDS=ids, WAIT="20")
        procs.append(canceller)
        outcomes = lines_until(canceller, "done", timeout=200)
        assert outcomes == [f"{task_id} True cancelled" for task_id in ids.split()]
        lines_until(owner, "stopped")  # the owner saw its own runs stop
        for child in map(int, pids.read_text().split()):
            until_sync(lambda child=child: process_gone(child), what="the process runs' workers were killed")
        app = cpsl.App(home=home)
        # answered requests are dropped by the next maintenance pass (every 0.5 s) that sees the run finished
        until_sync(lambda: not [key for key, _ in app.store.items("cancel/")], what="the requests were consumed")
        assert not [key for key, _ in app.store.items("cancel/")]
    finally:
        _stop(procs)


def test_a_request_to_an_owner_that_dies_before_acting_settles_the_run(tmp_path):
    """The owner is stopped (SIGSTOP) so it cannot act, asked to cancel, then killed: the runs
    end ``cancelled``, not ``retry``; an idle process that defines the tasks never reruns them."""
    home, pids = tmp_path / "store", tmp_path / "pids"
    procs = []
    try:
        adopter = spawn(TASKS + IDLE, home, PIDS=str(pids))
        procs.append(adopter)
        lines_until(adopter, "ready")
        owner = spawn(OWNER, home, PIDS=str(pids))
        procs.append(owner)
        (ids,) = lines_until(owner, "running", timeout=60)
        os.kill(owner.pid, signal.SIGSTOP)
        app = cpsl.App(home=home)
        handles = [app.get_task(task_id) for task_id in ids.split()]
        assert [h.cancel() for h in handles] == [True] * 3  # asked: the owner is alive, if stopped
        assert {h.status() for h in handles} == {"running"}
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        for h in handles:
            until_sync(lambda h=h: h.status() in ("cancelled", "failed", "completed", "timeout"), timeout=20)
        assert [h.status() for h in handles] == ["cancelled"] * 3
        assert [h.snapshot()["attempt"] for h in handles] == [1, 1, 1]  # never run again
        assert len(pids.read_text().split()) == 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        _stop(procs)


def test_a_cancel_from_another_process_stops_a_repeat_whose_run_ends_before_the_owner_acts(tmp_path):
    """A repeat's run that finishes between the request and its owner's next pass (a fast
    body, a tick just due) has already armed the next run: the request still ends the series."""
    go = tmp_path / "go"
    owner = spawn(f"""
        @app.task
        def tick():
            while not os.path.exists({str(go)!r}):  # ends as soon as the cancel has been asked
                time.sleep(0.001)

        series = tick.schedule("every 1s")
        app.store.flush()
        print(series.task_id, flush=True)
        print("scheduled", flush=True)
        threading.Event().wait()
        """, tmp_path)
    (first,) = lines_until(owner, "scheduled")
    app = cpsl.App(home=tmp_path)
    handle = app.get_task(first)
    until_sync(lambda: handle.status() == "running", what="the first run to start")
    assert handle.cancel()  # asked: its owner lives
    go.touch()

    def series_over():
        app.store.poll()
        return not [r for r in app.store.unfinished_runs() if r["task_name"] == "tick"] \
            and not app.store.items("cancel/")

    until_sync(series_over, timeout=10, what="no run of the series left to run, and the request answered")
    # The first run ended before the owner acted (completed; the next run it armed is cancelled),
    # or, on a loaded machine, the owner's pass came within the millisecond before its body saw
    # "go" (cancelled, and no next run: seen once in a full run). Either way the series is over.
    statuses = sorted(h.snapshot()["status"] for h in app.tasks.find())
    assert statuses in (["cancelled", "completed"], ["cancelled"]), statuses
    app.close()
