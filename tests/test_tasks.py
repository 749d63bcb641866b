"""Tasks end to end in a plain asyncio program: submit, statuses, results, retries, timeouts."""

import asyncio
import os
import threading
import time

import pytest

import capsule_nb as cpsl

from .conftest import record_on_disk, until


async def test_async_task_runs_on_the_running_loop_and_returns(app):
    loops = []

    @app.task
    async def add(x, y=2):
        loops.append(asyncio.get_running_loop())
        return x + y

    handle = await add.submit(1)
    assert isinstance(handle, cpsl.TaskHandle)
    assert await handle.result(timeout=5) == 3
    assert await handle.status() == "completed"
    assert loops == [asyncio.get_running_loop()]
    record = handle.snapshot()
    assert record["args"] == [1] and record["params"] == {"x": 1, "y": 2}
    assert record["attempt"] == 1 and record["started_at"] <= record["completed_at"]


async def test_sync_task_runs_in_a_thread_not_the_loop(app):
    @app.task()
    def where():
        return threading.current_thread().name

    handle = where.submit()
    assert (await handle.result(timeout=5)).startswith("capsule-task")


async def test_submit_without_await_gives_a_handle_and_await_gives_the_same(app):
    @app.task
    async def one():
        return 1

    plain = one.submit()
    assert isinstance(plain, cpsl.TaskHandle)
    assert (await plain) is plain
    assert await plain.wait(5) == "completed"


async def test_await_submit_means_the_record_is_on_disk(app, tmp_path):
    gate = asyncio.Event()

    @app.task
    async def blocked():
        await gate.wait()

    handle = await blocked.submit()
    other = cpsl.App(home=tmp_path / "other")  # a different store proves nothing; read the disk itself
    other.close()
    on_disk = record_on_disk(app.home, handle.task_id)
    assert on_disk is not None and on_disk["task_name"] == "blocked"
    gate.set()
    assert await handle.wait(5) == "completed"


async def test_failure_raises_task_failed_with_the_traceback(logic_app):
    @logic_app.task
    def explode(n):
        raise RuntimeError(f"boom {n}")

    handle = explode.submit(7)
    with pytest.raises(cpsl.TaskFailed) as info:
        await handle.result(timeout=5)
    assert "RuntimeError: boom 7" in str(info.value)
    assert "raise RuntimeError" in info.value.traceback
    assert handle.error == "RuntimeError: boom 7"


async def test_retry_status_is_visible_between_attempts(app):
    seen = []

    @app.task(retries=1, retry_delay="1s")
    def flaky():
        seen.append(1)
        if len(seen) == 1:
            raise ValueError("first")

    handle = flaky.submit()
    await until(lambda: handle.snapshot()["status"] == "retry")
    assert handle.snapshot()["error"] == "ValueError: first"
    assert await handle.wait(5) == "completed"


async def test_a_new_attempt_drops_the_last_attempts_traceback(app):
    """A run that failed, then timed out (or succeeded) on its next attempt, does not keep
    the first failure's traceback: a card showed it under "timed out" or beside the result."""
    calls = []

    @app.task(retries=2, retry_delay=0.05, timeout=0.5)
    async def flaky_then_slow():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first")
        await asyncio.sleep(30)

    handle = flaky_then_slow.submit()
    await until(lambda: handle.snapshot()["status"] == "retry")
    assert "ValueError: first" in handle.snapshot()["traceback"]
    await until(lambda: handle.snapshot()["status"] == "running" and handle.snapshot()["attempt"] == 2)
    assert handle.snapshot()["error"] is None and handle.snapshot()["traceback"] is None
    assert await handle.wait(5) == "timeout"
    assert handle.snapshot()["traceback"] is None
    with pytest.raises(cpsl.TaskFailed) as info:
        await handle.result()
    assert "ValueError" not in str(info.value) and "ValueError" not in (info.value.traceback or "")


async def test_backoff_grows_and_is_capped(app):
    @app.task(retries=5, retry_delay=1, backoff=2)
    def f():
        pass

    waits = [f.retry_wait(n) for n in (1, 2, 3, 4)]
    assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2 and 2 <= waits[2] <= 4 and 4 <= waits[3] <= 8
    assert f.retry_wait(100) <= 3600


async def test_async_timeout_ends_with_timeout_and_is_not_retried(app):
    calls = []

    @app.task(timeout=0.2, retries=3)
    async def sleepy():
        calls.append(1)
        await asyncio.sleep(30)

    handle = sleepy.submit()
    assert await handle.wait(5) == "timeout"
    assert len(calls) == 1
    with pytest.raises(cpsl.TaskFailed, match="timeout"):
        await handle.result()


async def test_thread_timeout_stops_a_pure_python_loop(app):
    stopped = threading.Event()

    @app.task(timeout=0.2)
    def spin():
        try:
            while True:
                pass
        finally:
            stopped.set()

    handle = spin.submit()
    assert await handle.wait(5) == "timeout"
    assert stopped.is_set()


async def test_refresh_pushes_the_deadline(app):
    gate = asyncio.Event()

    @app.task(timeout=0.5)
    async def long():
        await gate.wait()
        return "done"

    handle = long.submit()
    await until(lambda: handle.snapshot()["status"] == "running")
    first = handle.snapshot()["deadline"]
    await until(lambda: handle.refresh() and handle.snapshot()["deadline"] > first)
    gate.set()
    assert await handle.result(timeout=5) == "done"
    assert await handle.refresh() is False  # nothing to refresh once finished


async def test_cancel_running_async_is_immediate(app):
    started = asyncio.Event()

    @app.task
    async def forever():
        started.set()
        await asyncio.sleep(3600)

    handle = forever.submit()
    await started.wait()
    assert await handle.cancel() is True
    assert await handle.wait(5) == "cancelled"
    with pytest.raises(cpsl.TaskCancelled):
        await handle.result()
    assert await handle.cancel() is False


async def test_cancel_running_thread_raises_inside_it_and_waits_for_it(app):
    inside = threading.Event()
    release = threading.Event()
    cleaned = []

    @app.task
    def worker(session=None):
        inside.set()
        try:
            while True:
                pass
        finally:
            assert session.cancelled
            release.wait(5)
            cleaned.append(True)

    handle = worker.submit()
    await until(inside.is_set)
    assert handle.cancel()
    # The thread is still in its cleanup: the run is not reported cancelled yet.
    await until(lambda: handle.snapshot()["status"] == "running", timeout=1)
    release.set()
    assert await handle.wait(5) == "cancelled"
    assert cleaned == [True]


async def test_cancel_pending_and_scheduled_runs_never_start(app):
    ran = []

    @app.task
    def job(n):
        ran.append(n)

    later = job.schedule(delay="1h", n=1)
    assert later.snapshot()["status"] == "scheduled"
    assert later.cancel()
    assert await later.status() == "cancelled"
    assert ran == []


@pytest.mark.parametrize("retries, said", [
    (2, "1\ncompleted 2 None"),  # its second attempt, on another loop, ran to its end
    (0, "failed 1 interrupted: the event loop it ran on closed first (asyncio.run returned before the run "
        "ended; await it there)"),
])
def test_a_run_whose_script_loop_closes_is_interrupted_not_cancelled(tmp_path, retries, said):
    """A script's ``asyncio.run(main())`` returns while a run it submitted still goes: the loop
    cancels the run's task on its way out. That was recorded ``cancelled``, which nobody asked
    for, and ``retries`` were ignored. It is an interruption: retried (on another loop) if
    attempts remain, else failed, saying why."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio
        import capsule_nb as cpsl

        @cpsl.task(retries={retries})
        async def job(i: int):
            await asyncio.sleep(0.5)
            return i

        async def main():
            return await job.submit(i=1)

        handle = asyncio.run(main())
        try:
            print(asyncio.run(handle.result(timeout=20)))
        except cpsl.TaskFailed:
            pass
        record = handle.snapshot()
        print(record["status"], record["attempt"], record["error"])
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAPSULE_NB_HOME": str(tmp_path / "store")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == said, done.stdout


async def test_an_async_run_cancelled_before_the_loop_starts_it_is_cancelled_at_once_never_started(app):
    """``h = t.submit(); h.cancel()`` in one cell: the run's task is made but has not run.
    The record said ``pending`` until the loop ran again (for ever, while a cell blocked
    it), and then ``cancelled`` with an attempt and a start that never were."""
    ran = []

    @app.task
    async def work():
        ran.append(1)

    handle = work.submit()
    assert handle.cancel()
    record = handle.snapshot()
    assert (record["status"], record["attempt"], record["started_at"]) == ("cancelled", 0, None)
    assert await handle.wait(5) == "cancelled"
    await asyncio.sleep(0.05)
    assert ran == [] and handle.snapshot()["attempt"] == 0


def _counted_work(app):
    """A thread task that holds until ``gate`` is set; ``running``: the runs in it now,
    ``most``: how many were in it as each one started."""
    gate, running, most = threading.Event(), [], []

    @app.task
    def work(i):
        running.append(i)
        most.append(len(running))
        gate.wait(10)
        running.remove(i)

    return work, gate, running, most


async def test_fewer_threads_hold_once_the_pool_has_grown_and_an_app_opened_again_keeps_them(app):
    """``configure(max_threads=4)`` after a burst had grown the pool: idle threads went on
    taking runs, so 12 ran at once. And ``App()`` opened again without ``max_threads`` set
    it back to 32."""
    work, gate, running, most = _counted_work(app)
    burst = [work.submit(i) for i in range(20)]  # the pool grows to 20 threads
    await until(lambda: len(running) == 20)
    gate.set()
    for handle in burst:
        await handle.wait(10)
    gate.clear()
    most.clear()
    app.runtime.max_threads = 4
    assert cpsl.App(app.name, home=app.home) is app and app.runtime.max_threads == 4
    batch = [work.submit(i) for i in range(12)]
    await until(lambda: len(running) == 4)
    assert [h.snapshot()["status"] for h in batch].count("pending") == 8
    gate.set()
    for handle in batch:
        assert await handle.wait(10) == "completed"
    assert max(most) == 4


async def test_fewer_threads_hold_for_the_runs_already_waiting_for_one(app):
    """4 threads busy, 8 runs waiting: lowered to 1, the waiting runs go one at a time. They
    went 4 at a time, the threads' leave notes queued behind them (w46)."""
    work, gate, running, most = _counted_work(app)
    app.runtime.max_threads = 4
    batch = [work.submit(i) for i in range(12)]
    await until(lambda: len(running) == 4)
    app.runtime.max_threads = 1
    most.clear()
    gate.set()
    for handle in batch:
        assert await handle.wait(10) == "completed"
    assert most and max(most) == 1, most


async def test_more_threads_start_for_the_runs_already_waiting_for_one(app):
    """1 thread busy, 7 runs waiting: raised to 8, the waiting runs start at once. They
    went on one at a time; and lowered then raised again, they stayed on one thread (w48)."""
    ends, running = threading.Semaphore(0), []

    @app.task
    def held(i):
        running.append(i)
        ends.acquire(timeout=10)  # one run ends for each release
        running.remove(i)

    app.runtime.max_threads = 1
    first = [held.submit(i) for i in range(8)]
    await until(lambda: len(running) == 1)
    app.runtime.max_threads = 8
    await until(lambda: len(running) == 8)
    ends.release(8)
    for handle in first:
        assert await handle.wait(10) == "completed"
    app.runtime.max_threads = 4
    second = [held.submit(i) for i in range(12)]
    await until(lambda: len(running) == 4)
    app.runtime.max_threads = 1
    app.runtime.max_threads = 4  # (the threads about to leave stay)
    ends.release(4)
    await until(lambda: len(running) == 4 and [h.snapshot()["status"] for h in second].count("completed") == 4)
    ends.release(8)
    for handle in second:
        assert await handle.wait(10) == "completed"


async def test_a_run_waiting_for_a_free_thread_is_cancelled_at_once_and_never_starts(app):
    """Every thread is busy; the next run waits for one. Its cancel used to wait too (the
    card said "pending, stopping..." with no button until a thread freed up, minutes if
    the busy run was long) and then recorded an attempt that never ran."""
    gate, ran = threading.Event(), []

    @app.task
    def work(i):
        ran.append(i)
        gate.wait(10)

    app.runtime.max_threads = 1
    busy = work.submit(1)
    await until(lambda: busy.snapshot()["status"] == "running")
    queued = work.submit(2)
    assert queued.snapshot()["status"] == "pending"
    assert queued.cancel()
    record = queued.snapshot()
    assert (record["status"], record["attempt"], record["started_at"], record.get("stopping")) == (
        "cancelled", 0, None, None)
    gate.set()
    assert await busy.wait(10) == "completed"
    last = work.submit(3)  # the thread goes on to the next run, not the cancelled one
    assert await last.wait(10) == "completed" and ran == [1, 3]


async def test_cancel_a_pending_queued_run_it_never_starts(app):
    gate = asyncio.Event()
    ran = []

    @app.task(lock="one", on_lock="queue")
    async def job(n):
        ran.append(n)
        await gate.wait()

    first, second = job.submit(1), job.submit(2)
    assert second.snapshot()["status"] == "pending"
    assert await second.cancel() is True
    gate.set()
    assert await first.wait(5) == "completed"
    assert await second.status() == "cancelled" and ran == [1]


async def test_schedule_at_and_delay(app):
    import datetime as dt

    @app.task
    async def stamp():
        return "fired"

    soon = stamp.schedule(at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.2))
    assert soon.snapshot()["status"] == "scheduled"
    assert await soon.result(timeout=5) == "fired"
    delayed = await stamp.schedule(delay="0s")
    assert await delayed.result(timeout=5) == "fired"


async def test_a_delay_of_every_repeats_as_capsules_sdk_reads_it(app):
    """The SDK sends ``when`` or ``delay`` through one parser: ``schedule(delay="every 5m")``
    repeats there, and was a ValueError here (w65)."""
    @app.task
    async def tick():
        return 1

    series = tick.schedule(delay="every 2h")
    assert series.snapshot()["every"] == 7200 and series.snapshot()["status"] == "scheduled"
    assert series.cancel()


async def test_every_repeats_until_cancelled(app):
    @app.task
    async def tick():
        return 1

    series = tick.schedule("every 1s")  # the shortest interval allowed
    await until(lambda: tick.count(status="completed") >= 2)
    # Its handle speaks for the series, as its card does: "completed" said the series was over
    # while it went on (w64). Capsule's server queues the one task again after each run.
    assert await series.wait() == "completed"  # (the run it was given has)
    assert await series.status() == "scheduled"
    # A handle find() gives of a run of the series says that run's own (w65)
    assert {await h.status() for h in tick.find(status="completed")} == {"completed"}
    assert series.cancel()
    await until(lambda: tick.count(status="scheduled") == 0)
    done = tick.count(status="completed")
    assert tick.count(status="cancelled") == 1
    assert tick.count() == done + 1
    assert await series.status() == "cancelled"


async def test_a_repeat_holds_its_lock_key_only_while_a_run_of_it_is_due_or_running(app):
    """README's tour: ``lock="report:{report_id}"``, then ``schedule("every 1h", report_id="hourly")``.
    The repeat's next run held the key while it waited, so a "run it now" submit with the
    key joined a run an hour away. Now it runs at once; a tick that comes due while another
    run holds the key waits for it, never beside it. A one-off ``schedule(delay=...)`` still
    holds its key (Capsule's rule: a scheduled run is live)."""
    gate = threading.Event()

    @app.task(lock="report:{report_id}")
    def build_report(report_id, hold=False):
        if hold:
            gate.wait(10)
        return report_id

    hourly = build_report.schedule("every 1h", report_id="hourly")
    now = build_report.submit(report_id="hourly")
    assert now.task_id != hourly.task_id and await now.result(timeout=10) == "hourly"
    assert hourly.snapshot()["status"] == "scheduled"

    busy = build_report.submit(report_id="often", hold=True)
    await until(lambda: busy.snapshot()["status"] == "running")
    often = build_report.schedule("every 1s", report_id="often")  # (it joined the busy run: no repeat)
    assert often.task_id != busy.task_id
    await until(lambda: time.time() > often.snapshot()["scheduled_for"] + 0.3, timeout=5)
    assert often.snapshot()["status"] in ("scheduled", "pending")  # due, waiting for the key
    gate.set()
    assert await often.wait(timeout=10) == "completed"
    assert often.snapshot()["started_at"] >= busy.snapshot()["completed_at"]  # never beside the holder
    often.cancel()

    later = build_report.schedule(delay="1h", report_id="weekly")
    assert build_report.submit(report_id="weekly").task_id == later.task_id
    for handle in (hourly, later):
        handle.cancel()


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_a_submit_just_after_a_cancel_is_new_work_not_the_run_being_stopped(app, kind):
    """A user cancels a locked run and submits again at once: the cancel said True, so the
    submit means "do it anew". It used to join the run being stopped, so its handle ended
    ``cancelled`` and the new work never ran. Now it waits for the key and then runs."""
    gate = threading.Event()
    if kind == "async":
        @app.task(lock="report:{report_id}")
        async def build_report(report_id="daily", seconds=0.0):
            await asyncio.sleep(seconds)
            return seconds
    else:
        @app.task(lock="report:{report_id}")
        def build_report(report_id="daily", seconds=0.0):
            gate.wait(seconds)  # a blocked call: the thread stops once it returns
            return seconds

    first = build_report.submit(seconds=30)
    await until(lambda: first.snapshot()["status"] == "running")
    assert first.cancel()
    again = build_report.submit(seconds=0.01)
    assert again.task_id != first.task_id
    gate.set()
    assert await again.result(timeout=10) == 0.01
    assert first.snapshot()["status"] == "cancelled"
    assert again.snapshot()["started_at"] >= first.snapshot()["completed_at"]  # never beside it
    gate.clear()
    assert build_report.submit(seconds=30).task_id == build_report.submit().task_id  # a live run is still joined
    await build_report.cancel(status="running")
    gate.set()


async def test_positional_and_keyword_arguments_are_checked_at_submit(logic_app):
    @logic_app.task
    def f(a, b=1, *, c=2):
        return a + b + c

    with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
        f.submit(1, d=4)
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        f.submit()
    assert await f.submit(1, 2, c=3).result(timeout=5) == 6
    assert logic_app.tasks.count() == 1  # the bad submits left no record


async def test_find_count_cancel_and_app_tasks(app):
    gate = asyncio.Event()

    @app.task
    async def report(report_id, region="eu"):
        await gate.wait()
        return report_id

    handles = [report.submit(f"r{i}", region="us" if i % 2 else "eu") for i in range(6)]
    assert await report.count() == 6
    assert report.count(region="us") == 3
    found = await report.find(limit=2)
    assert [h.task_id for h in found] == [handles[5].task_id, handles[4].task_id]
    assert [h.task_id for h in report.find(limit=2, offset=4)] == [handles[1].task_id, handles[0].task_id]
    assert await report.cancel(region="us") == 3
    gate.set()
    await until(lambda: report.count(status="completed") == 3)
    assert app.tasks.count(status="cancelled") == 3
    assert app.tasks.get(handles[0].task_id) == handles[0]
    assert app.get_task("no-such-run") is None
    with pytest.raises(ValueError, match="unknown status 'done'"):
        report.find(status="done")


async def test_a_task_wide_cancel_clears_the_backlog_and_leaves_work_in_progress(app):
    """Capsule's ``t.cancel()`` cancels "matching pending/scheduled/retry runs": code that
    clears a backlog with it must not kill the run in progress. ``status="running"`` does."""
    gate = threading.Event()

    @app.task
    def sync_threads(i):
        gate.wait(10)
        return i

    app.runtime.max_threads = 1
    running = sync_threads.submit(1)
    await until(lambda: running.snapshot()["status"] == "running")
    waiting = [sync_threads.submit(2), await sync_threads.schedule(delay="1h", i=3)]
    assert await sync_threads.cancel() == 2
    assert [h.snapshot()["status"] for h in waiting] == ["cancelled", "cancelled"]
    assert running.snapshot()["status"] == "running"
    assert await sync_threads.cancel(status="running") == 1
    gate.set()
    assert await running.wait(10) == "cancelled"


async def test_redefining_a_task_replaces_it(logic_app):
    @logic_app.task
    def build():
        return 1

    @logic_app.task  # the same cell, run again with a new body
    def build():  # noqa: F811
        return 2

    assert logic_app.registered("build") is build
    assert await build.submit().result(timeout=5) == 2


async def test_calling_the_task_runs_inline(app):
    """As Capsule's task descriptor: the call is always awaited; a sync function runs in an executor."""
    import threading

    @app.task
    def double(x):
        return 2 * x, threading.current_thread() is threading.main_thread()

    @app.task
    async def adouble(x):
        return 2 * x

    assert await double(4) == (8, False)
    assert await adouble(4) == 8
    assert double.fn(4) == (8, True)  # the plain function stays reachable
    assert app.tasks.count() == 0


async def test_non_json_results_round_trip_through_a_signed_payload(app, tmp_path):
    from fractions import Fraction

    @app.task
    def frac():
        return {Fraction(1, 3): {1, 2}}

    handle = frac.submit()
    assert await handle.result(timeout=5) == {Fraction(1, 3): {1, 2}}
    app.store.flush()
    fresh = cpsl.App(home=app.home)  # same store, read back without this process's memory
    fresh.runtime.results._recent.clear()
    app.runtime.results._recent.clear()
    assert await fresh.get_task(handle.task_id).result() == {Fraction(1, 3): {1, 2}}


async def test_results_over_the_cap_keep_only_a_repr(app):
    app.runtime.settings.max_result_bytes = 1000

    @app.task
    def big():
        return b"x" * 10_000

    handle = big.submit()
    await handle.wait(5)
    record = handle.snapshot()
    assert record["status"] == "completed" and record["result_kind"] == "repr"
    assert "cap" in record["result_note"]
    app.runtime.results._recent.clear()
    with pytest.raises(ValueError, match="not kept"):
        await handle.result()


async def test_unpicklable_arguments_still_run_in_kernel(app):
    lock = threading.Lock()

    @app.task
    def use(obj):
        return type(obj).__name__

    with pytest.warns(RuntimeWarning, match="cannot keep them"):
        handle = use.submit(lock)
    assert await handle.result(timeout=5) == "lock"
    assert "lock" in handle.snapshot()["args"][0]


async def test_submit_from_another_thread_and_from_inside_a_task(app):
    @app.task
    async def leaf(n):
        return n

    @app.task
    def parent():
        child = leaf.submit(41)
        return child.task_id

    handle = parent.submit()
    child_id = await handle.result(timeout=5)
    assert await app.get_task(child_id).result(timeout=5) == 41
    from_thread = []
    t = threading.Thread(target=lambda: from_thread.append(leaf.submit(5)))
    t.start()
    t.join()
    assert await from_thread[0].result(timeout=5) == 5


async def test_callback_url_posts_each_finished_attempt(app):
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    posts = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    calls = []

    @app.task(retries=1, callback_url=url)
    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("once")
        return "ok"

    handle = flaky.submit()
    await handle.wait(5)
    await until(lambda: len(posts) == 2)
    server.shutdown()
    assert [p["status"] for p in posts] == ["failed", "completed"]  # each attempt's own end, as Capsule's runner
    assert posts[0]["error"] == "ValueError: once" and posts[1]["error"] == "" and posts[1]["task_id"] == handle.task_id
    assert all(set(p) == {"task_id", "status", "duration", "error"} for p in posts)


async def test_a_failing_callback_is_not_fatal(app, caplog):
    @app.task(callback_url="http://127.0.0.1:9/nothing-listens")
    def fine():
        return 1

    handle = fine.submit()
    assert await handle.result(timeout=5) == 1
    await until(lambda: "callback" in caplog.text, timeout=10)


async def test_resubmit_runs_a_finished_run_again_with_its_arguments(app):
    from fractions import Fraction

    calls = []

    @app.task
    def flaky(x, scale=1):
        calls.append((x, scale))
        if len(calls) == 1:
            raise RuntimeError("first time")
        return x * scale

    failed = flaky.submit(Fraction(1, 2), scale=4)  # a non-JSON argument comes back from the payload
    assert await failed.wait(5) == "failed"
    again = app.resubmit(failed.task_id)
    assert again.task_id != failed.task_id
    assert await again.result(timeout=5) == 2
    assert calls == [(Fraction(1, 2), 4), (Fraction(1, 2), 4)]
    import pytest

    with pytest.raises(KeyError, match="no run 'nope'"):
        app.resubmit("nope")


async def test_waits_that_time_out_or_are_cancelled_leave_nothing_behind(app):
    """A wait that times out says so, naming the run; one whose task is cancelled goes quietly;
    many at once on one run all see its end; and no waiter stays registered afterwards."""
    gate = asyncio.Event()

    @app.task
    async def slow():
        await gate.wait()
        return "done"

    handle = slow.submit()
    for _ in range(50):
        with pytest.raises(TimeoutError, match=rf"run {handle.task_id} is still (pending|running) after 0.01s"):
            await handle.wait(timeout=0.01)
    cancelled = asyncio.ensure_future(handle.wait())
    await until(lambda: handle.task_id in app._endings._waiters)
    cancelled.cancel()
    together = [asyncio.ensure_future(app.get_task(handle.task_id).wait(timeout=30)) for _ in range(20)]
    gate.set()
    assert await asyncio.gather(*together) == ["completed"] * 20
    assert await handle.result(timeout=5) == "done"
    assert cancelled.cancelled()
    assert app._endings._waiters == {}
    assert app._endings._deadlines == {}  # nor any deadline, with its finished record


async def test_handles_dropped_before_their_runs_end_are_let_go_and_kept_ones_told(app):
    """The app holds each submit's handle weakly, to hand it its run's final record: thousands
    of handles dropped while their runs wait are let go, not held until the runs end, and a
    handle still held is told its run's end (it needs no read of the store for it)."""
    from capsule_nb.handle import _SWEEP_FROM

    gate = asyncio.Event()

    @app.task
    async def slow():
        await gate.wait()

    kept = slow.submit()
    for _ in range(_SWEEP_FROM + 100):
        slow.submit()  # its handle dropped at once
    assert len(app._endings._handles) < _SWEEP_FROM  # (one sweep has run)
    assert kept.task_id in app._endings._handles
    gate.set()
    await until(lambda: slow.count(status="completed") == _SWEEP_FROM + 101, timeout=60)
    assert kept._final is not None and kept._final["status"] == "completed"
    assert app._endings._handles == {}  # a run's entry goes with its end


async def test_submits_from_other_threads_while_a_submit_sweeps_dropped_handles_break_nothing(app):
    """A submit that sweeps dropped handles walks every entry. A garbage collection there
    runs finalizers, which let other threads in, and a submit on one of them (a sync task
    starting another run) adds its entry mid-walk. Seen in a burst of 20,000 process runs,
    a run's end told on the listener thread: the submit raised ``RuntimeError: dictionary
    changed size during iteration``. Here each collection inside the sweep has a new
    thread submit, and waits until its entry is in."""
    import gc
    import sys

    from capsule_nb.handle import _SWEEP_FROM

    hold, gate = threading.Event(), asyncio.Event()

    @app.task
    def held():
        hold.wait(10)

    @app.task
    async def slow():
        await gate.wait()

    for _ in range(_SWEEP_FROM):
        slow.submit()  # dropped: the next submit, its entry one more than the sweep waits for, sweeps
    endings, armed, grown, from_threads = app._endings, [True], [], []

    class SubmitsElsewhereIfCollectedInASweep:
        def __init__(self):
            self.cycle = self  # only the collector frees it

        def __del__(self):
            if not armed:
                return
            frame = sys._getframe().f_back
            while frame is not None and frame.f_code.co_name != "_sweep":
                frame = frame.f_back
            if frame is not None and endings._lock.locked():  # the sweep has begun
                before = len(endings._handles)
                threading.Thread(target=lambda: from_threads.append(held.submit())).start()
                deadline = time.monotonic() + 10
                while len(endings._handles) == before and time.monotonic() < deadline:
                    time.sleep(0.001)  # the GIL to the submitting thread
                grown.append(len(endings._handles) > before)
            SubmitsElsewhereIfCollectedInASweep()  # and again at the next collection

    thresholds = gc.get_threshold()
    SubmitsElsewhereIfCollectedInASweep()
    gc.set_threshold(1)  # a collection at each allocation, the sweep's among them
    try:
        sweeping = slow.submit()
    finally:
        gc.set_threshold(*thresholds)
        armed.clear()
    assert grown and all(grown)
    assert len(endings._handles) <= 1 + len(grown)  # the dropped ones are gone
    await until(lambda: len(from_threads) == len(grown), timeout=10)
    hold.set()
    gate.set()
    assert [await handle.wait(timeout=10) for handle in [sweeping, *from_threads]] == ["completed"] * (1 + len(grown))
    await until(lambda: slow.count(status="completed") == _SWEEP_FROM + 1, timeout=60)


async def test_each_status_change_reaches_subscribers_and_only_ends_reach_end_listeners(app):
    """Waiters listen for runs' ends only (``subscribe(ends=True)``), which spares the store's
    events a call per start; a subscriber of every change (a board) or of one run (a card)
    still hears each status the run goes through, and an unsubscribe stops each kind."""
    bus = app.store.events
    every, ends, one = [], [], []

    @app.task
    async def job():
        return 1

    offs = [bus.subscribe(lambda r: every.append(r["status"])),
            bus.subscribe(lambda r: ends.append(r["status"]), ends=True)]
    handle = job.submit()
    offs.append(bus.subscribe(lambda r: one.append(r["status"]), task_id=handle.task_id))
    assert await handle.wait() == "completed"
    assert (every, ends, one) == (["pending", "running", "completed"], ["completed"], ["running", "completed"])
    with pytest.raises(ValueError, match="not both"):
        bus.subscribe(print, task_id=handle.task_id, ends=True)
    for off in offs:
        off()
    assert await job.submit().wait() == "completed"
    assert (len(every), len(ends), len(one)) == (3, 1, 2)


async def test_wait_timeouts_expire_in_their_own_order(app):
    """Waits share one timer per loop: a short timeout given after a long one still
    expires first, and the long one keeps waiting until its run ends."""
    gate = asyncio.Event()

    @app.task
    async def slow():
        await gate.wait()

    handle = slow.submit()
    patient = asyncio.ensure_future(handle.wait(timeout=60))
    hasty = asyncio.ensure_future(handle.wait(timeout=0.05))
    done, _ = await asyncio.wait({patient, hasty}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    assert done == {hasty} and isinstance(hasty.exception(), TimeoutError)
    gate.set()
    assert await patient == "completed"
    assert app._endings._deadlines == {}


async def test_a_run_sees_the_submitters_context_variables_as_asyncio_tasks_do(app):
    """A ContextVar set before ``submit`` (a request id, a tenant) is what the run reads,
    from the loop's thread or another; what the run sets stays in the run."""
    import contextvars

    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")

    @app.task
    async def read_async() -> str:
        seen = tenant.get()
        tenant.set("changed by the run")
        return f"{seen}/{cpsl.current_session().id == app.owner_session.id}"

    @app.task
    def read_thread() -> str:
        return tenant.get()

    tenant.set("acme")
    on_loop = read_async.submit()
    in_thread = read_thread.submit()
    tenant.set("globex")
    elsewhere = await asyncio.to_thread(lambda: read_async.submit())  # submitted off the loop's thread
    assert await on_loop.result(timeout=10) == "acme/True"
    assert await in_thread.result(timeout=10) == "acme"
    assert await elsewhere.result(timeout=10) == "globex/True"
    assert tenant.get() == "globex"


# Races between a run ending or starting in one thread and a submit or cancel in another,
# each forced at its exact point by calling the other side there (no timing).


async def test_two_submits_that_join_one_run_share_one_handle_which_keeps_its_end_once_pruned(app):
    """``on_lock="join"`` hands back the run already holding the key: both submits say how
    it ended, also once retention has pruned it (the second used to take the first's place)."""
    gate = threading.Event()

    @app.task(lock="k:{key}", on_lock="join")
    def slow(key):
        gate.wait(10)
        return key

    first, second = slow.submit(key="a"), slow.submit(key="a")
    assert second is first
    gate.set()
    assert await second.wait(5) == "completed"
    app.store.flush()
    assert app.store.prune(app.name, keep=0, grace=0) == 1
    assert (await first.wait(), await first.result(), first.snapshot()["status"]) == ("completed", "a", "completed")


async def test_a_cancel_landing_between_a_runs_record_and_its_start_means_it_never_runs(app, monkeypatch):
    """The record is visible (to a board, a cancel from another thread) before the run is
    started: a cancel there stops it for good, and its key is free for the next run."""
    ran = []

    @app.task(lock="one", on_lock="reject", process=False)
    def job(n):
        ran.append(n)
        return n

    launch = type(app.runtime)._launch
    said = []

    def cancel_first(runtime, run, start_at):
        if not said:
            said.append(runtime.cancel(run.task_id))  # as another thread would, at this very point
        launch(runtime, run, start_at)

    monkeypatch.setattr(type(app.runtime), "_launch", cancel_first)
    doomed = job.submit(1)
    assert said == [True] and await doomed.wait(5) == "cancelled"
    assert await job.submit(2).result(timeout=5) == 2  # the key was free (on_lock="reject")
    assert ran == [2]
    await until(lambda: doomed.task_id not in app.runtime._live)


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_a_cancel_that_says_it_stopped_a_run_ending_that_moment_is_what_the_run_says(app, monkeypatch, process):
    """A cancel that lands after the body returned, before the end is recorded, says True:
    the run then ends cancelled, not completed (a stop asked for meanwhile wins)."""
    @app.task(process=process)
    def quick():
        return 1

    finish = type(app.runtime).finish
    said = []

    def cancel_first(runtime, run, outcome):
        if not said:
            said.append(runtime.cancel(run.task_id))  # the body has returned: nothing to interrupt
        finish(runtime, run, outcome)

    monkeypatch.setattr(type(app.runtime), "finish", cancel_first)
    handle = quick.submit()
    assert (await handle.wait(20), said) == ("cancelled", [True])


async def test_cancelling_a_run_in_its_retry_wait_frees_the_key_it_took_from_the_queue(app):
    """A run queued on its key at submit later takes the key, fails, and waits to retry:
    cancelling it then frees the key, also once retention has pruned the run."""
    gate = threading.Event()

    @app.task(lock="k", on_lock="queue", retries=1, retry_delay=30)
    def job(fail):
        gate.wait(10)
        if fail:
            raise RuntimeError("boom")
        return "done"

    holder, queued = job.submit(False), job.submit(True)
    assert queued.snapshot()["queued"] is True
    gate.set()
    assert await holder.wait(5) == "completed"
    await until(lambda: queued.snapshot()["status"] == "retry")
    assert await queued.cancel() is True and await queued.wait(5) == "cancelled"
    app.store.flush()
    app.store.prune(app.name, keep=0, grace=0)

    @app.task(lock="k", on_lock="reject")
    def other():
        return "free"

    assert await other.submit().result(timeout=5) == "free"
