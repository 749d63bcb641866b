"""Cron schedules: each tick once, on time, as a run; across re-definitions, kernels and DST."""

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from zoneinfo import ZoneInfo

import pytest

import capsule_nb as cpsl
from capsule_nb import schedules

from .conftest import until, until_sync
from .test_durability import lines_until, spawn


def test_each_tick_is_a_run_with_the_schedule_name(app):
    fired = []

    @app.schedule("* * * * * *", name="heartbeat")
    def beat():
        fired.append(time.time())
        print("beat")

    until_sync(lambda: beat.runs.count(status="completed") >= 2)
    runs = beat.runs.find()
    assert {h.task_name for h in runs} == {"heartbeat"}
    record = runs[-1].snapshot()
    assert record["schedule"] == "* * * * * *" and record["output"][0]["text"] == "beat\n"
    assert abs(record["started_at"] - record["scheduled_for"]) < 0.5  # on time


async def test_async_body_that_submits_work(app):
    @app.task
    async def sync_crm(source):
        return source

    @app.schedule("* * * * * *")
    async def every_second():
        await sync_crm.submit(source="schedule")

    await until(lambda: sync_crm.count(status="completed", source="schedule") >= 1)
    assert every_second.runs.count() >= 1
    assert sync_crm.find(status="completed", source="schedule")[0].snapshot()["result"] == "schedule"


def test_a_tick_while_the_previous_run_is_going_is_skipped(app):
    release = threading.Event()
    starts = []

    @app.schedule("* * * * * *")
    def slow():
        starts.append(time.time())
        release.wait(10)

    until_sync(lambda: slow.state()["skipped"] >= 2)  # as docs/api.md reads it: there from the first tick
    assert len(starts) == 1 and slow.runs.count() == 1
    release.set()
    until_sync(lambda: slow.runs.count(status="completed") >= 2)


def test_redefining_replaces_the_schedule(app):
    first, second = [], []

    @app.schedule("* * * * * *", name="job")
    def job():
        first.append(1)

    @app.schedule("* * * * * *", name="job")  # the same cell, run again with a new body
    def job():  # noqa: F811
        second.append(1)

    until_sync(lambda: len(second) >= 3)
    assert first == []
    dues = [h.snapshot()["scheduled_for"] for h in job.runs.find()]
    assert len(dues) == len(set(dues))  # never two runs for one tick


def test_pause_resume_and_next_runs(app):
    fired = []

    @app.schedule("* * * * * *")
    def tick():
        fired.append(1)

    tick.pause()
    assert tick.paused
    time_paused = time.time()
    until_sync(lambda: tick.state().get("last_due", 0) > time_paused + 1.5)  # two ticks passed while paused
    assert fired == []
    (row,) = schedules.on_store(app.store)
    assert row["last"] is None  # (w51: the listings' LAST moved on with each tick paused, as if it ran)
    tick.resume()
    until_sync(lambda: len(fired) >= 1)
    until_sync(lambda: schedules.on_store(app.store)[0]["last"] is not None)
    upcoming = tick.next_runs(3)
    assert [b - a for a, b in zip(upcoming, upcoming[1:])] == [dt.timedelta(seconds=1)] * 2
    assert all(t.tzinfo is not None and t > dt.datetime.now(dt.timezone.utc) for t in upcoming)


def test_dst_fall_back_daily_job_fires_once_and_spring_forward_shifts(app):
    @app.schedule("30 1 * * *", tz="America/New_York")
    def daily():
        pass

    ny = ZoneInfo("America/New_York")
    fall = daily.next_runs(3, after=dt.datetime(2026, 10, 31, 12, tzinfo=ny))
    assert [t.date().isoformat() for t in fall] == ["2026-11-01", "2026-11-02", "2026-11-03"]

    @app.schedule("30 2 * * *", tz="America/New_York")
    def early():
        pass

    spring = early.next_runs(2, after=dt.datetime(2026, 3, 7, 12, tzinfo=ny))
    assert [t.isoformat() for t in spring] == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]

    @app.schedule("*/30 * * * *", tz="America/New_York")
    def half_hourly():
        pass

    # a job with no fixed hour runs in both copies of the repeated hour: they are real half hours
    repeated = half_hourly.next_runs(6, after=dt.datetime(2026, 11, 1, 0, 10, tzinfo=ny))
    assert [t.timestamp() - repeated[0].timestamp() for t in repeated] == [0, 1800, 3600, 5400, 7200, 9000]


@pytest.mark.parametrize(
    "cron, tz, day, expected",
    [  # on the fall-back day a job that names its hours runs each named wall time once, as cron does
        ("30 1,13 * * *", "America/New_York", dt.date(2026, 11, 1), ["01:30:00-04:00", "13:30:00-05:00"]),
        ("0 1-3 * * *", "America/New_York", dt.date(2026, 11, 1), ["01:00:00-04:00", "02:00:00-05:00",
                                                                  "03:00:00-05:00"]),
        ("30 2,14 * * *", "Europe/Berlin", dt.date(2026, 10, 25), ["02:30:00+02:00", "14:30:00+01:00"]),
    ],
)
def test_dst_fall_back_job_with_listed_hours_runs_each_once(app, cron, tz, day, expected):
    @app.schedule(cron, tz=tz)
    def twice_daily():
        pass

    zone = ZoneInfo(tz)
    start = dt.datetime.combine(day, dt.time(0), tzinfo=zone)
    on_the_day = [t for t in twice_daily.next_runs(len(expected) + 3, after=start) if t.date() == day]
    assert [t.isoformat().partition("T")[2] for t in on_the_day] == expected


def test_missed_ticks_are_dropped_or_caught_up_once(app):
    made = {}
    for name, catchup in (("dropped", False), ("caught", True)):
        app.store.update_value(f"sched/{app.name}/{name}", lambda _: {"last_due": time.time() - 7200})

        @app.schedule("0 * * * *", name=name, catchup=catchup)  # hourly: two ticks were missed
        def job():
            pass

        made[name] = job

    until_sync(lambda: made["caught"].runs.count(status="completed") == 1)
    assert made["dropped"].runs.count() == 0


def test_a_catch_up_after_years_away_is_one_run_for_the_latest_tick(app):
    """Five years of minutely ticks missed (2.6 million): defining the schedule makes one run, for
    the last minute before it, without stepping through the missed ones."""
    app.store.update_value(f"sched/{app.name}/sync", lambda _: {"last_due": time.time() - 5 * 365 * 86400})
    before = time.time()

    @app.schedule("* * * * *", name="sync", catchup=True)
    def sync():
        pass

    defined = time.time()
    (caught,) = [h.snapshot()["scheduled_for"] for h in sync.runs.find()
                 if h.snapshot()["scheduled_for"] < defined]
    assert caught % 60 == 0 and before - 60 < caught < defined
    until_sync(lambda: sync.runs.count(status="completed") >= 1)


async def test_a_blocked_loop_delays_a_tick_which_then_runs_once(app):
    ran = []

    @app.schedule("* * * * * *")
    async def on_loop():
        ran.append(time.time())

    await until(lambda: len(ran) >= 1)
    before = on_loop.runs.count()
    time.sleep(3.5)  # the scenario under test: a long cell blocks the loop
    await until(lambda: on_loop.runs.count(status="completed") >= before + 1)
    assert on_loop.runs.count() == before + 1  # one run for the blocked stretch, not a burst
    assert on_loop.state()["skipped"] >= 2


@pytest.mark.parametrize(
    "cron, message",
    [
        ("* * * *", "bad cron '\\* \\* \\* \\*': expected 5 fields"),
        ("61 * * * *", "bad cron '61 \\* \\* \\* \\*'"),
        ("* * * * xyz", "bad cron '\\* \\* \\* \\* xyz'"),
        ("* * * * * * *", "expected 5 fields"),
    ],
)
def test_bad_cron_is_a_value_error_naming_it(app, cron, message):
    with pytest.raises(ValueError, match=message):
        app.schedule(cron)


def test_bad_zone_and_bad_function(app):
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        app.schedule("* * * * *", tz="Mars/Olympus")
    with pytest.raises(TypeError, match=r"report\(\) must take no arguments, it requires \['day'\]"):

        @app.schedule("* * * * *")
        def report(day):
            pass


def test_two_processes_fire_each_tick_once_and_survive_a_death(tmp_path):
    kernel = """
    @app.schedule("* * * * * *", name="shared")
    def shared():
        app.collection("ticks").insert_one({"pid": os.getpid()})

    print("defined", flush=True)
    threading.Event().wait()
    """
    procs = [spawn(kernel, tmp_path) for _ in range(2)]
    for proc in procs:
        lines_until(proc, "defined")
    app = cpsl.App(home=tmp_path)
    ticks = app.collection("ticks")
    until_sync(lambda: ticks.count() >= 6, timeout=20)
    firing = {d["pid"] for d in ticks.find()}
    victim = next(p for p in procs if p.pid in firing)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    survivor = next(p for p in procs if p is not victim)
    until_sync(lambda: ticks.count({"pid": survivor.pid}) >= 3 and ticks.count() >= 9, timeout=20)
    survivor.kill()
    survivor.wait(10)
    app.store.poll()
    dues = [r["scheduled_for"] for r in app.store.runs() if r["task_name"] == "shared"]
    assert len(dues) == len(set(dues))  # each tick fired once between the two kernels
    completed = len([r for r in app.store.runs() if r["task_name"] == "shared" and r["status"] == "completed"])
    # each killed kernel (the victim, then the survivor) may die between a tick's write and its record
    assert completed <= ticks.count() <= completed + 2


def _an_older_kernel_ticking(tmp_path):
    """A kernel firing ``shared`` every second (its ticks insert ``{pid, body: "old", at}``),
    seen to tick twice; and this process's app on the same store, and the ticks."""
    older = spawn(
        """
        @app.schedule("* * * * * *", name="shared")
        def shared():
            app.collection("ticks").insert_one({"pid": os.getpid(), "body": "old", "at": time.time()})

        print("defined", flush=True)
        threading.Event().wait()
        """,
        tmp_path,
    )
    lines_until(older, "defined")
    app = cpsl.App(home=tmp_path)
    ticks = app.collection("ticks")
    until_sync(lambda: ticks.count({"pid": older.pid}) >= 2, timeout=20)
    return older, app, ticks


def test_a_schedule_defined_again_with_another_cron_fires_only_by_that_definition(tmp_path):
    """An older kernel still runs ``*/1``; this one defines the schedule again as ``*/2``
    (the cell edited). Both cadences fired, under one name. Now the newer definition is
    in force in every kernel while its kernel runs: the older one stops firing, and says
    so. Once this kernel stops its schedule, the older one fires again."""
    older, app, ticks = _an_older_kernel_ticking(tmp_path)

    @app.schedule("* * * * * */2", name="shared")
    def shared():
        ticks.insert_one({"pid": os.getpid(), "at": time.time()})

    defined = time.time()
    until_sync(lambda: ticks.count({"pid": os.getpid()}) >= 3, timeout=20)
    assert all(d["at"] < defined + 1.5 for d in ticks.find({"pid": older.pid}))  # its next tick saw it
    later = [r for r in (h.snapshot() for h in shared.runs.find(limit=0)) if r["created_at"] > defined + 1]
    assert later and all(int(r["scheduled_for"]) % 2 == 0 for r in later)  # every run since is the new cadence
    assert shared.state()["cron"] == "* * * * * */2"
    assert "next" in repr(shared)
    shared.stop()
    stopped = time.time()
    until_sync(lambda: any(d["at"] > stopped for d in ticks.find({"pid": older.pid})), timeout=20)
    app.close()
    older.kill()
    older.wait(10)
    assert "not firing" in older.stderr.read()


def test_a_schedule_defined_again_with_another_body_runs_only_that_body(tmp_path):
    """The cell edited in one notebook, the cron kept: whichever kernel claimed a tick ran its
    own body, so the old code went on running, tick by tick, beside the new (w46). The latest
    definition is in force, body and all, while its kernel runs."""
    older, app, ticks = _an_older_kernel_ticking(tmp_path)

    @app.schedule("* * * * * *", name="shared")
    def shared():
        ticks.insert_one({"body": "new", "at": time.time()})

    defined = time.time()
    until_sync(lambda: ticks.count({"body": "new"}) >= 4, timeout=20)
    assert all(d["at"] < defined + 1.5 for d in ticks.find({"body": "old"}))  # its next tick saw it
    dues = [r["scheduled_for"] for r in app.store.runs() if r["task_name"] == "shared"]
    assert len(dues) == len(set(dues))  # and each tick still fired once
    app.close()
    older.kill()
    older.wait(10)
    assert "is in force while that kernel runs" in older.stderr.read().split("'* * * * * *' (UTC) with a different body")[1]


def test_kernels_defining_a_schedule_alike_share_its_ticks_so_one_asleep_holds_nothing_up(tmp_path):
    """The latest of two kernels defining a schedule the same way is suspended (SIGSTOP: a
    laptop asleep, a process stuck): the other one fires its ticks meanwhile (w48: no tick
    for as long as it slept, in any kernel)."""
    code = """
        @app.schedule("* * * * * *", name="shared")
        def shared():
            app.collection("ticks").insert_one({"pid": os.getpid(), "at": time.time()})

        print("defined", flush=True)
        threading.Event().wait()
        """
    first = spawn(code, tmp_path)
    lines_until(first, "defined")
    latest = spawn(code, tmp_path)
    lines_until(latest, "defined")
    app = cpsl.App(home=tmp_path)
    ticks = app.collection("ticks")
    try:
        os.kill(latest.pid, signal.SIGSTOP)
        asleep = time.time()
        until_sync(lambda: ticks.count({"pid": first.pid, "at": {"$gt": asleep + 1}}) >= 2, timeout=20)
        os.kill(latest.pid, signal.SIGCONT)
        dues = [r["scheduled_for"] for r in app.store.runs() if r["task_name"] == "shared"]
        assert len(dues) == len(set(dues))  # still once each
    finally:
        app.close()
        for child in (first, latest):
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
    assert "not firing" not in first.stderr.read() + latest.stderr.read()


def test_a_tick_left_pending_by_a_killed_kernel_runs_in_another(tmp_path):
    """The kernel that claimed a tick dies before the run started (its one thread was busy):
    another kernel defining the schedule adopts the run, as it would a task's."""
    claimant = spawn(
        """
        app.runtime.max_threads = 1

        @app.task
        def block():
            threading.Event().wait()

        blocker = block.submit()
        while blocker.snapshot()["status"] != "running":
            time.sleep(0.01)

        @app.schedule("* * * * * *", name="shared")
        def shared():
            app.collection("ticks").insert_one({"pid": os.getpid()})

        while not (ticks := [r for r in app.store.runs() if r["task_name"] == "shared"]):
            time.sleep(0.01)
        shared.stop()
        app.store.flush()
        print(ticks[0]["task_id"], ticks[0]["status"], flush=True)
        print("claimed", flush=True)
        threading.Event().wait()
        """,
        tmp_path,
    )
    (line,) = lines_until(claimant, "claimed")
    tick_id, status = line.split()
    assert status == "pending"  # claimed and recorded, waiting for the busy thread
    os.kill(claimant.pid, signal.SIGKILL)
    claimant.wait(10)
    app = cpsl.App(home=tmp_path)

    @app.schedule("0 0 1 1 *", name="shared")  # the same schedule, defined in another kernel
    def shared():
        app.collection("ticks").insert_one({"pid": os.getpid()})

    until_sync(lambda: app.get_task(tick_id).status() == "completed", timeout=10)
    assert [d["pid"] for d in app.collection("ticks").find()] == [os.getpid()]
    app.close()


def _dead_owner(tmp_path) -> str:
    """The owner id of a process that has exited, as a killed kernel's would be."""
    proc = spawn("from capsule_nb.store.owners import owner_id\nprint(owner_id(), flush=True)", tmp_path)
    out, _ = proc.communicate(timeout=60)
    return out.strip()


def _ticks_at(app, due: float) -> list[dict]:
    app.store.poll()
    return [r for r in app.store.runs() if r["task_name"] == "shared" and r["scheduled_for"] == due]


def test_a_tick_claimed_by_a_kernel_that_died_before_recording_it_runs_in_a_watcher(tmp_path):
    """What a kill just after a claim leaves on disk: the tick claimed, its run nowhere. The
    kernel that found the tick taken watches the claim and, the claimant dead, runs it once."""
    dead = _dead_owner(tmp_path)
    app = cpsl.App(home=tmp_path)
    due = float(int(time.time()) + 3)
    app.store.update_value("sched/default/shared", lambda s: {**(s or {}), "last_due": due, "claimed_by": dead})

    @app.schedule(f"* * * * * {int(due) % 60}", name="shared")  # due now, then in a minute
    def shared():
        return "ran"

    until_sync(lambda: [r["status"] for r in _ticks_at(app, due)] == ["completed"], timeout=15)
    state = until_sync(lambda: shared.state().get("settled_due") == due and shared.state())
    assert state["claimed_by"] == app.runtime.owner
    app.close()


def test_the_next_claimant_runs_a_tick_whose_claimant_died_before_recording_it(tmp_path):
    dead = _dead_owner(tmp_path)
    app = cpsl.App(home=tmp_path)
    lost = float(int(time.time()) - 2)
    app.store.update_value("sched/default/shared", lambda s: {**(s or {}), "last_due": lost, "claimed_by": dead})

    @app.schedule("* * * * * *", name="shared")
    def shared():
        return "ran"

    until_sync(lambda: [r["status"] for r in _ticks_at(app, lost)] == ["completed"], timeout=15)
    until_sync(lambda: shared.runs.count(status="completed") >= 3, timeout=15)  # and it goes on ticking
    assert len(_ticks_at(app, lost)) == 1
    app.close()


def test_capsule_magic_lists_schedules_with_their_next_run(app):
    from capsule_nb.notebook.magics import capsule_summary

    @app.schedule("*/5 * * * *", tz="Europe/Paris", name="digest")
    def digest():
        pass

    summary = capsule_summary(app)
    assert str(app.home) in summary
    line = next(line for line in summary.splitlines() if "digest" in line)
    assert "*/5 * * * *" in line and "Europe/Paris" in line
    assert digest.next_runs(1)[0].isoformat(timespec="seconds") in line
    digest.pause()
    assert "paused" in next(line for line in capsule_summary(app).splitlines() if "digest" in line)


def test_capsule_magic_lists_the_schedules_other_kernels_defined(tmp_path):
    """``%capsule`` in a kernel that defines no schedule listed "no schedules" while another
    kernel's fired on the same store; ``capsule-nb schedules`` listed them. Both read the store."""
    from capsule_nb.notebook.magics import capsule_summary

    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import capsule_nb as cpsl
        app = cpsl.App("reports", home={str(tmp_path)!r})

        @app.schedule("0 9 * * 1-5", tz="Europe/Paris")
        def morning():
            pass
        app.close()
        """)], check=True, timeout=60)
    app = cpsl.App(home=tmp_path)
    line = next(line for line in capsule_summary(app).splitlines() if "morning" in line)
    assert "0 9 * * 1-5" in line and "Europe/Paris" in line
    assert "not firing: no live kernel defines it" in line  # (that process has ended: nothing fires it)
    app.close()


def test_a_timer_fires_promptly_after_the_wall_clock_jumps(monkeypatch):
    """A suspended laptop: the wall clock jumps an hour while the monotonic clock stood still."""
    from capsule_nb.engine import timers

    real = time.time
    offset = [0.0]

    class Clock:
        @staticmethod
        def time():
            return real() + offset[0]

    monkeypatch.setattr(timers, "MAX_WAIT", 0.05)  # stands in for the 30 s re-check
    monkeypatch.setattr(timers, "time", Clock)
    fired = threading.Event()
    timers.Timers().call_at(real() + 3600, fired.set)
    assert not fired.wait(0.2)
    offset[0] = 3600
    assert fired.wait(2)
