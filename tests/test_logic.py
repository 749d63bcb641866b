"""Task logic in immediate mode (``App(executor="immediate")``): a submit runs to its end
in the caller, so each check reads the record at once, with no thread and no deadline wait."""

from __future__ import annotations

import threading

import pytest

import capsule_nb as cpsl


def test_a_sync_run_completes_inside_submit_on_the_calling_thread(logic_app):
    seen = []

    @logic_app.task
    def add(a, b=1):
        seen.append(threading.current_thread())
        print("adding")
        return a + b

    record = add.submit(2, b=3).snapshot()
    assert seen == [threading.current_thread()]
    assert (record["status"], record["result"], record["attempt"]) == ("completed", 5, 1)
    assert record["output"] == [{"stream": "stdout", "text": "adding\n"}]


def test_an_async_run_completes_inside_submit_outside_a_loop(logic_app):
    @logic_app.task
    async def double(x, session=None):
        await session.reply(f"doubling {x}")
        return x * 2

    record = double.submit(21).snapshot()
    assert (record["status"], record["result"]) == ("completed", 42)
    assert [m["text"] for m in record["messages"]] == ["doubling 21"]


async def test_an_async_run_inside_a_running_loop_is_stepped_by_hand(logic_app):
    @logic_app.task
    async def double(x):
        return x * 2

    handle = await double.submit(4)
    assert handle.snapshot()["status"] == "completed" and await handle.result() == 8


async def test_an_async_run_that_waits_on_the_loop_fails_clearly(logic_app):
    import asyncio

    @logic_app.task
    async def sleepy():
        await asyncio.sleep(0.01)

    record = sleepy.submit().snapshot()
    assert record["status"] == "failed" and "cannot wait on the event loop" in record["error"]


def test_retries_follow_at_once_until_success(logic_app):
    calls = []

    @logic_app.task(retries=2, retry_delay="1h")  # the delay is skipped: no timers here
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    record = flaky.submit().snapshot()
    assert (record["status"], record["attempt"], len(calls), record["result"]) == ("completed", 3, 3, "ok")


def test_out_of_attempts_fails_with_the_last_error_and_its_traceback(logic_app):
    @logic_app.task(retries=1)
    def explode(n):
        raise RuntimeError(f"boom {n}")

    record = explode.submit(7).snapshot()
    assert (record["status"], record["attempt"], record["error"]) == ("failed", 2, "RuntimeError: boom 7")
    first_frame = record["traceback"].splitlines()[1]  # the task's own: capsule_nb's frames are left out
    assert f'File "{__file__}"' in first_frame and first_frame.endswith("in explode"), record["traceback"]
    assert "raise RuntimeError" in record["traceback"]


def test_retry_for_retries_only_the_named_errors(logic_app):
    calls = []

    @logic_app.task(retries=3, retry_for=[ConnectionError])
    def picky():
        calls.append(1)
        raise KeyError("not retried")

    assert picky.submit().snapshot()["status"] == "failed" and len(calls) == 1


def test_retry_for_names_exact_types_as_capsules_runner_does(logic_app):
    """Capsule's runner retries when ``type(exc)`` is listed: a subclass of a listed error
    fails at once, so code behaves the same here and once deployed."""
    calls = []

    @logic_app.task(retries=3, retry_for=[ConnectionError, TimeoutError])
    def fetch(error):
        calls.append(error)
        if len(calls) < 3:
            raise error("upstream")

    assert fetch.submit(ConnectionError).snapshot()["status"] == "completed" and len(calls) == 3
    calls.clear()
    refused = fetch.submit(ConnectionRefusedError).snapshot()
    assert refused["status"] == "failed" and len(calls) == 1 and refused["attempt"] == 1


def test_a_run_scheduled_for_later_stays_scheduled_and_cancels(logic_app):
    ran = []

    @logic_app.task
    def later():
        ran.append(1)

    handle = later.schedule(delay="1h")
    assert handle.snapshot()["status"] == "scheduled" and not ran
    assert handle.cancel() and handle.snapshot()["status"] == "cancelled"


def test_lock_queue_starts_the_queued_run_when_the_holder_ends(logic_app):
    order = []

    @logic_app.task(lock="report:{rid}", on_lock="queue")
    def report(rid, nested=False):
        order.append(("start", nested))
        if not nested:
            inner = report.submit(rid, nested=True)  # the key is held: it waits
            order.append(("inner", inner.snapshot()["status"]))
        order.append(("end", nested))

    report.submit("a")
    assert order == [("start", False), ("inner", "pending"), ("end", False), ("start", True), ("end", True)]
    assert logic_app.tasks.count(status="completed") == 2


def test_lock_reject_and_join_while_the_key_is_held(logic_app):
    seen = {}

    @logic_app.task(lock="k:{key}", on_lock="reject")
    def rejecting(key):
        with pytest.raises(cpsl.LockedError, match="k:x"):
            rejecting.submit(key)
        seen["rejected"] = True

    @logic_app.task(lock="j:{key}")
    def joining(key, inner=False):
        if not inner:
            seen["joined"] = joining.submit(key, inner=True).task_id

    rejecting.submit("x")
    outer = joining.submit("y")
    assert seen["rejected"] and seen["joined"] == outer.task_id
    assert logic_app.tasks.count() == 2


def test_find_count_and_arguments_by_name(logic_app):
    @logic_app.task
    def report(report_id, region="eu"):
        return report_id

    handles = [report.submit(f"r{i}", region="us" if i % 2 else "eu") for i in range(4)]
    assert report.count(region="us") == 2 and report.count(status="completed") == 4
    assert [h.task_id for h in report.find(limit=2)] == [handles[3].task_id, handles[2].task_id]
    with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
        report.submit("x", d=1)
    assert report.count() == 4  # the bad submit left no record


def test_a_record_refuses_an_unknown_field():
    from capsule_nb.record import evolve, new_record

    record = new_record(task_id="t1", status="pending")
    with pytest.raises(TypeError, match="stauts"):
        evolve(record, stauts="running")
    with pytest.raises(TypeError, match="colour"):
        new_record(task_id="t2", colour="red")
    assert evolve(record, status="running")["status"] == "running"


def test_a_submitted_record_has_the_fields_new_record_gives():
    """The submit path builds its record in one dict (``submitted_record``): it must say what
    ``new_record`` of the same fields says, field for field, so a field added to one is not
    missing from the other."""
    from capsule_nb.record import FIELDS, new_record, submitted_record, validate

    given = dict(task_id="t1", app="a", task_name="job", display_name="Job", status="scheduled", args=[1],
                 kwargs={"k": 2}, params={"x": 1, "k": 2}, created_at=5.0, scheduled_for=9.0, updated_at=5.0,
                 max_attempts=3, owner="host:1:2", session_id="s1", lock_key="key-1", every=60.0, series="t1",
                 process=True)
    fields = {k: v for k, v in given.items() if k not in ("created_at", "updated_at")}
    made = submitted_record(now=5.0, **fields)
    assert made == new_record(**given) and list(made) == list(new_record(**given))  # (the JSON's key order too)
    assert set(made) <= FIELDS and validate(made) is None
    again = submitted_record(now=5.0, **fields)
    assert again["messages"] is not made["messages"] and again["output"] is not made["output"]  # never shared


def test_an_unknown_executor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'eager'"):
        cpsl.App(home=tmp_path / "s", executor="eager")


def test_threads_asking_for_the_runtimes_loop_at_once_get_one_loop():
    """Outside a kernel the loop is made on first use: threads that ask at the same moment
    (a script's thread tasks submitting async ones) share one loop and one loop thread."""
    from capsule_nb.engine.loop import LoopBinding

    binding, gate = LoopBinding(), threading.Barrier(8)
    before = {t.ident for t in threading.enumerate() if t.name == "capsule-loop"}
    loops = []

    def ask():
        gate.wait(10)
        loops.append(binding.loop)

    askers = [threading.Thread(target=ask) for _ in range(8)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(10)
    made = [t for t in threading.enumerate() if t.name == "capsule-loop" and t.ident not in before]
    try:
        assert len(loops) == 8 and len({id(loop) for loop in loops}) == 1
        assert len(made) == 1
    finally:
        for loop in {id(loop): loop for loop in loops}.values():
            loop.call_soon_threadsafe(loop.stop)


def test_task_ids_are_24_hex_digits_ordered_by_their_microsecond():
    """A run id is the microsecond clock (14 hex digits) then 40 random bits (10): sorting ids
    sorts runs by creation, across processes (board columns, ``find`` pages rely on it)."""
    import time

    from capsule_nb.record import new_task_id

    before = time.time_ns() // 1000
    ids = [new_task_id() for _ in range(2000)]
    after = time.time_ns() // 1000
    assert all(len(i) == 24 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    stamps = [int(i[:14], 16) for i in ids]
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= after
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("odd", ["", "\ud800"], ids=["json", "a lone surrogate orjson refuses"])
def test_past_the_character_cap_replaced_notifications_go_first_then_the_oldest_messages(odd):
    """The 17th message of 60,000 characters takes the messages over the cap of 1,000,000: the
    notification a newer one replaced goes, not the first reply; then one more such reply
    pushes the oldest message out (the newest notification is no replaced one)."""
    from capsule_nb.record import MAX_MESSAGES_CHARS, add_message

    big = "x" * 60_000
    record: dict = {}
    sent = [("reply", "first " + big), ("notify", "n1 " + big)] + [("reply", f"r{i} " + big) for i in range(14)]
    sent += [("notify", "n2" + odd), ("reply", "r14 " + big)]
    for kind, text in sent:
        record = {**record, **add_message(record, kind, text)}
    rows = [f"r{i}" for i in range(14)]
    assert [m["text"].split(" ")[0] for m in record["messages"]] == ["first", *rows, "n2" + odd, "r14"]
    assert record["messages_dropped"] == 1

    record = {**record, **add_message(record, "reply", "last " + big)}
    assert [m["text"].split(" ")[0] for m in record["messages"]] == [*rows, "n2" + odd, "r14", "last"]
    assert record["messages_dropped"] == 2
    assert sum(len(v) for m in record["messages"] for v in m.values() if type(v) is str) <= MAX_MESSAGES_CHARS


def test_a_memory_limit_is_named_as_it_was_likely_written():
    """``memory_limit="50MB"`` failed saying "memory limit of 47.68 MiB exceeded" (w64)."""
    from capsule_nb.workers.outcome import size

    assert [size(n) for n in (50_000_000, 64 * 2**20, 2 * 2**30, 3 * 10**9, 1023, 1536)] == [
        "50 MB", "64 MiB", "2 GiB", "3 GB", "1023 B", "1.5 KiB"]


def test_portable_mode_reads_a_delay_as_capsules_sdk_does():
    """Its regex on the stripped lower-cased text, whole numbers only, after "every " or
    "repeat every " as written (w65: a tab or two spaces passed here, and fail there). What
    neither reads is an error, never an extension (w66: check listed "90" as one)."""
    import datetime as dt

    from capsule_nb.durations import only_here

    assert not any(map(only_here, ["30m", " 10 Minutes ", "every 5m", "repeat every 2h", "5 s", dt.timedelta(1)]))
    assert all(map(only_here, ["1.5h", "every\t5m", "every\n5m", "repeat  every 5m", 30, 2.5]))
    assert not any(map(only_here, ["1h30m", "", "90", "in 5m", None, -5]))
