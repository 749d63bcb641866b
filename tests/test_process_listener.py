"""One listener thread reads every worker of a pool: what several workers send at the
same moment, a death among them, and the thread's own life, against real processes."""

from __future__ import annotations

import os
import threading
import time

import pytest

from capsule_nb.workers.pool import ProcessPool

from .conftest import process_gone, until_sync
from .test_processes import Recorder

WORKERS = 4
LINES = 300


@pytest.fixture
def four():
    with ProcessPool(max_workers=WORKERS) as pool:
        yield pool


def _meet(folder: str, count: int) -> None:
    """Return once ``count`` workers are in here at once, so that they then send together."""
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(folder)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers never came")
        time.sleep(0.002)


def _print_together(folder: str, index: int, exit_code: int | None = None) -> int:
    _meet(folder, WORKERS)
    for line in range(LINES):
        print(f"job {index} line {line}", flush=True)
    if exit_code is not None:
        os._exit(exit_code)
    return index


def _printed(recorder: Recorder) -> list[str]:
    return "".join(data["text"] for kind, data in recorder.calls if kind == "capture").splitlines()


def listeners() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "capsule-process-listener"}


def test_messages_from_many_workers_at_once_each_reach_their_job_in_order(four, tmp_path):
    before = listeners()
    recorders = [Recorder() for _ in range(WORKERS)]
    jobs = [four.run(_print_together, (str(tmp_path), i), on_message=recorders[i]) for i in range(WORKERS)]
    assert [job.wait(60).value for job in jobs] == list(range(WORKERS))
    assert len({job.pid for job in jobs}) == WORKERS  # they did run side by side
    for i, recorder in enumerate(recorders):
        assert recorder.kinds()[0] == "started"
        assert _printed(recorder) == [f"job {i} line {line}" for line in range(LINES)]
    assert len(listeners() - before) == 1  # one thread read all four


def test_a_worker_dying_while_the_others_send_is_reported_and_theirs_arrive_whole(four, tmp_path):
    recorders = [Recorder() for _ in range(WORKERS)]
    jobs = [four.run(_print_together, (str(tmp_path), i, 9 if i == 1 else None), on_message=recorders[i])
            for i in range(WORKERS)]
    outcomes = [job.wait(60) for job in jobs]
    dead = outcomes[1]
    assert dead.kind == "crashed" and dead.message == "worker process died: exited with code 9"
    assert process_gone(dead.pid)  # reaped before its job was settled
    assert _printed(recorders[1]) == [f"job 1 line {line}" for line in range(LINES)]  # all it sent first
    for i in (0, 2, 3):
        assert outcomes[i].ok and outcomes[i].value == i
        assert _printed(recorders[i]) == [f"job {i} line {line}" for line in range(LINES)]
    assert four.run(os.getpid).wait(30).ok  # and the pool carries on


def test_the_listener_ends_with_its_pool_and_a_new_pool_gets_its_own(tmp_path):
    before = listeners()
    pool = ProcessPool(max_workers=2)
    assert pool.run(os.getpid).wait(30).ok
    (mine,) = listeners() - before
    workers = [pool.run(os.getpid).wait(30).value for _ in range(2)]
    pool.shutdown()
    assert all(process_gone(pid) for pid in workers)  # shutdown(wait=True) waited for the reaping
    until_sync(lambda: not mine.is_alive(), timeout=10)
    with ProcessPool(max_workers=1) as again:
        assert again.run(sum, ([1, 2],)).wait(30).value == 3


def _print_until(path: str) -> str:
    line = "more " * 4000
    while not os.path.exists(path):
        print(line, flush=True)
    return "stopped"


def _wait_for(path: str) -> int:
    while not os.path.exists(path):
        time.sleep(0.002)
    return os.getpid()


def test_a_done_callback_runs_while_other_workers_keep_sending(four, tmp_path):
    """The listener holds the done callbacks while more keeps arriving, so that a batch of
    runs ending together is told together; workers that never stop printing must not
    hold another job's callback for ever. (Each of their lines takes the listener a
    millisecond, so their pipes never run dry.)"""
    stop, go = tmp_path / "stop", tmp_path / "go"
    lines = [0]

    def slowly(kind: str, data: dict) -> None:
        lines[0] += kind == "capture"
        time.sleep(0.001)

    chatty = [four.run(_print_until, (str(stop),), on_message=slowly) for _ in range(WORKERS - 1)]
    try:
        until_sync(lambda: lines[0] > 100, timeout=30)  # printing by now
        called = threading.Event()
        quick = four.run(_wait_for, (str(go),))
        quick.add_done_callback(lambda outcome: called.set())  # (before it can have ended)
        go.touch()
        assert called.wait(30), "the quick job's done callback never ran while the others printed"
        assert not any(job.done() for job in chatty)
    finally:
        stop.touch()
    assert [job.wait(30).value for job in chatty] == ["stopped"] * (WORKERS - 1)
