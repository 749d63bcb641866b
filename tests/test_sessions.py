"""Sessions and output capture: messages are kept with their own run, whatever thread runs it."""

import asyncio
import json
import logging
import sys
import threading

import pytest

import capsule_nb as cpsl
from capsule_nb.errors import TaskFailed

from .conftest import until


def kinds(handle):
    return [(m["kind"], m["text"]) for m in handle.snapshot()["messages"]]


async def test_capsule_style_async_task_with_a_bound_session(app):
    @app.task(retries=1, timeout=120)
    async def build_report(session: cpsl.Session | None = None, report_id="daily", duration=0):
        await session.notify(f"Building {report_id}", detail="step 1")
        await asyncio.sleep(duration)
        await session.reply(f"Report {report_id} is ready")
        return {"report_id": report_id}

    handle = await build_report.submit(session=app.session, report_id="daily")
    assert await handle.result(timeout=5) == {"report_id": "daily"}
    assert kinds(handle) == [("notify", "Building daily"), ("reply", "Report daily is ready")]
    assert handle.snapshot()["messages"][0]["detail"] == "step 1"
    assert handle.snapshot()["session_id"] == app.session.id


async def test_messages_work_plainly_from_a_sync_task(app):
    @app.task
    def sync_job(session):
        session.reply("hello")
        session.notify("heads up")
        session.log("a log line")
        session.progress(3, 10, "three")
        session.stream(["a", "b", "c"])
        with session.stream_reply() as out:
            out.write("x")
            out.write("y")
        return cpsl.current_session().id

    handle = sync_job.submit()
    # unbound: the task still gets a session (owner-only), and its messages go to the record
    assert await handle.result(timeout=5) == app.owner_session.id
    assert kinds(handle) == [("reply", "hello"), ("notify", "heads up"), ("log", "a log line"),
                             ("stream", "abc"), ("stream", "xy")]
    assert handle.snapshot()["progress"] == {"done": 3, "total": 10, "message": "three"}
    assert handle.snapshot()["session_id"] is None


def _fan_out(session):
    """A task that fans out to threads of its own, each reporting through the session."""
    import concurrent.futures

    def part(n):
        session.reply(f"part {n}")
        session.progress(n, 2)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(part, [1, 2]))
    return session.cancelled, cpsl.current_session() is session


async def _fan_out_async(session):
    await asyncio.get_running_loop().run_in_executor(None, session.reply, "part 1")  # no context carried over
    return session.cancelled, cpsl.current_session() is session


@pytest.mark.parametrize("kind", ["thread", "async", "process"])
async def test_what_a_tasks_own_threads_say_through_its_session_reaches_the_run(app, kind):
    """A ``ThreadPoolExecutor`` (or ``run_in_executor``) does not carry the run's context
    to its threads: the session the function was handed still knows its run."""
    task = app.task(process=kind == "process", name=f"fan_{kind}")(_fan_out_async if kind == "async" else _fan_out)
    handle = task.submit()
    assert list(await handle.result(timeout=60)) == [False, True]  # and the run's own code sees one session
    replies = sorted(text for kind_, text in kinds(handle) if kind_ == "reply")
    assert replies == (["part 1"] if kind == "async" else ["part 1", "part 2"])
    if kind != "async":
        assert handle.snapshot()["progress"]["total"] == 2


async def test_a_loop_of_notifications_past_the_cap_keeps_the_runs_reply(app):
    """A notification is replaced in place by the next: past the message cap the replaced ones go
    first, not the reply sent before them (before, 1,200 notifies left 1,000 of themselves and no reply)."""
    from capsule_nb.record import MAX_MESSAGES

    @app.task
    def checker(session):
        session.reply("Your report is at /reports/daily.pdf")
        for i in range(MAX_MESSAGES + 200):
            session.notify(f"checked {i} rows")
        session.log("done")

    handle = checker.submit(session=app.session)
    await handle.result(timeout=60)
    record = handle.snapshot()
    kept = [(m["kind"], m["text"]) for m in record["messages"]]
    assert kept[0] == ("reply", "Your report is at /reports/daily.pdf")
    assert kept[-2:] == [("notify", f"checked {MAX_MESSAGES + 199} rows"), ("log", "done")]
    assert len(kept) == MAX_MESSAGES and record["messages_dropped"] == 202  # 1,202 messages sent


async def test_async_stream_from_an_async_iterable(app):
    async def words():
        for word in ("to ", "be"):
            yield word

    @app.task
    async def talk(session):
        await session.stream(words())
        async with session.stream_reply() as out:
            out.write("!")

    handle = talk.submit()
    await handle.wait(5)
    assert kinds(handle) == [("stream", "to be"), ("stream", "!")]


async def test_async_stream_from_a_sync_task_runs_on_the_loop(app):
    async def chunks():
        yield "one "
        yield "two"

    @app.task
    def talk(session):
        session.stream(chunks())

    handle = talk.submit()
    assert await handle.wait(5) == "completed"
    assert kinds(handle) == [("stream", "one two")]


async def test_stream_reply_from_grows_a_reply_and_gives_back_its_whole_text(app):
    """Capsule's ``await session.stream_reply_from(stream)`` (a model's streamed answer):
    the reply grows as the chunks come, and the call gives the final text."""
    async def answer():
        for chunk in ("The report ", "is ready."):
            yield chunk

    @app.task
    async def reply_async(session):
        return await session.stream_reply_from(answer())

    @app.task
    def reply_sync(session):
        return [session.stream_reply_from(answer()), session.stream_reply_from(["a", "b"])]

    first, second = reply_async.submit(), reply_sync.submit()
    assert await first.result(timeout=5) == "The report is ready."
    assert await second.result(timeout=5) == ["The report is ready.", "ab"]
    assert kinds(first) == [("stream", "The report is ready.")]
    assert kinds(second) == [("stream", "The report is ready."), ("stream", "ab")]


async def test_current_session_is_the_bound_one_in_async_and_sync_tasks(app):
    @app.task
    async def a():
        return cpsl.current_session().id

    @app.task
    def s():
        return cpsl.current_session().id

    for task in (a, s):
        assert await task.submit(session=app.session).result(timeout=5) == app.session.id
        assert await task.submit().result(timeout=5) == app.owner_session.id


def test_current_session_outside_a_task_is_the_notebook_session():
    session = cpsl.current_session()
    assert isinstance(session, cpsl.Session)
    assert session.id.startswith(("notebook:", "local:"))
    assert session.user.id and session.user.owner_id == session.user.id


async def test_session_data_is_persistent_json(app, tmp_path):
    app.session.data["theme"] = "dark"
    again = cpsl.App(home=app.home)
    assert again.session.data["theme"] == "dark"
    import pytest

    with pytest.raises(TypeError, match="must be JSON"):
        app.session.data["bad"] = object()
    with pytest.raises(TypeError, match=r"session.data\['b'\] must be JSON"):  # all or none, as insert_many
        app.session.data.update(a=1, b=object(), c=3)
    assert dict(cpsl.App(home=app.home).session.data) == {"theme": "dark"}


async def test_session_data_is_a_dict_whose_changes_inside_values_are_kept(app):
    """Capsule's ``session.data`` is a dict whose lists and dicts report their changes:
    ``setdefault(...).append(...)`` and ``data["prefs"]["lang"] = ...`` are kept (they went
    to a copy and were lost), from a task thread, on the loop and in a worker process."""
    @app.task
    def note_thread(item, session=None):
        session.data.setdefault("history", []).append(item)
        counts = session.data.setdefault("counts", {})
        counts[item] = counts.get(item, 0) + 1

    @app.task
    async def note_async(item, session=None):
        await session.data.set("last", item)  # Capsule's explicit write
        session.data["prefs"]["seen"].append(item)

    @app.task(process=True)
    def note_process(item, session=None):
        session.data["history"].append(item)
        session.data["prefs"]["lang"] = "fr"

    session = app.session
    session.data["prefs"] = {"lang": "en", "seen": []}
    for item in "aab":
        assert await (await note_thread.submit(item, session=session)).wait(10) == "completed"
    assert await (await note_async.submit("c", session=session)).wait(10) == "completed"
    assert await (await note_process.submit("d", session=session)).wait(60) == "completed"

    again = cpsl.App(home=app.home).session.data  # as another kernel reads it
    assert again == {"history": ["a", "a", "b", "d"], "counts": {"a": 2, "b": 1}, "last": "c",
                     "prefs": {"lang": "fr", "seen": ["c"]}}
    assert isinstance(session.data, dict) and json.loads(json.dumps(session.data)) == again
    assert json.loads(json.dumps(cpsl.Session(app, id=session.id).data)) == again  # one not read before
    rows = session.data.setdefault("rows", [])
    rows.append({"n": 1})
    rows[0]["n"] += 1  # a dict put in a list is tracked too
    rows.append(3)  # the list held on to still writes its key
    assert again["rows"] == [{"n": 2}, 3] and session.data.pop("rows") == [{"n": 2}, 3] and "rows" not in again
    with pytest.raises(TypeError, match=r"session.data\['prefs'\] must be JSON"):
        session.data["prefs"]["bad"] = object()
    assert again["prefs"] == {"lang": "fr", "seen": ["c"]}  # the bad change is not stored


async def test_runs_appending_to_one_list_in_session_data_at_once_each_keep_their_item(app):
    """The docs' own example, from 40 thread runs at once: a change inside a value is made to
    the stored value in the write's transaction (a copy written back kept 4 of 40)."""
    @app.task
    def log_visit(i, session=None):
        session.data.setdefault("history", []).append(i)

    handles = [log_visit.submit(i, session=app.session) for i in range(40)]
    assert [await handle.wait(30) for handle in handles] == ["completed"] * 40
    assert sorted(app.session.data["history"]) == list(range(40))
    prefs = app.session.data.setdefault("prefs", {"lang": "en"})
    del app.session.data["prefs"]
    with pytest.raises(KeyError, match=r"session.data\['prefs'\] no longer holds this dict"):
        prefs["lang"] = "fr"  # (it brought the deleted key back)
    assert "prefs" not in app.session.data
    app.session.data |= {"theme": "dark"}
    app.session.data = {"only": 1}
    assert app.session.data == {"only": 1}


def test_session_data_written_at_once_through_two_sessions_loses_no_key(app):
    """Two handles on one session (a worker process's copy is one) write ``data`` at the same
    time: each write changes the stored dict in one transaction, so no key is lost (each
    handle's own lock once guarded only its own read-modify-write)."""
    first, second = cpsl.Session(app, id="chat:shared"), cpsl.Session(app, id="chat:shared")
    start = threading.Barrier(2)

    def write(session, prefix):
        start.wait(5)
        for n in range(100):
            session.data[f"{prefix}{n}"] = n

    threads = [threading.Thread(target=write, args=(s, p)) for s, p in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(first.data) == 200
    assert dict(second.data) == {**{f"a{n}": n for n in range(100)}, **{f"b{n}": n for n in range(100)}}


async def test_print_in_concurrent_runs_is_kept_per_run(app):
    barrier = threading.Barrier(3)

    @app.task
    def chatty(n):
        barrier.wait(5)
        for i in range(50):
            print(f"run {n} line {i}")
        print(f"run {n} err", file=sys.stderr)

    @app.task
    async def achatty(n):
        for i in range(50):
            print(f"async {n} line {i}")
            await asyncio.sleep(0)

    handles = [chatty.submit(n) for n in range(3)] + [achatty.submit(n) for n in range(3)]
    for handle in handles:
        assert await handle.wait(5) == "completed"
    for n, handle in enumerate(handles[:3]):
        output = handle.snapshot()["output"]
        stdout = "".join(x["text"] for x in output if x["stream"] == "stdout")
        assert stdout == "".join(f"run {n} line {i}\n" for i in range(50))
        assert [x for x in output if x["stream"] == "stderr"] == [{"stream": "stderr", "text": f"run {n} err\n"}]
    for n, handle in enumerate(handles[3:]):
        stdout = "".join(x["text"] for x in handle.snapshot()["output"])
        assert stdout == "".join(f"async {n} line {i}\n" for i in range(50))


async def test_what_a_task_printed_before_it_went_quiet_is_on_its_record_while_it_runs(app):
    """Prints then a long call: all but the first line waited for the next print, or the end
    of the run, so a card showed "line 0" for as long as the call took."""
    release = threading.Event()

    @app.task
    def fetch():
        for i in range(20):
            print(f"line {i}")
        release.wait(30)  # a slow API call

    handle = fetch.submit()
    try:
        await until(lambda: "line 19" in "".join(x["text"] for x in handle.snapshot()["output"]), timeout=5)
        assert handle.snapshot()["status"] == "running"
    finally:
        release.set()
    assert await handle.wait(10) == "completed"
    assert "".join(x["text"] for x in handle.snapshot()["output"]) == "".join(f"line {i}\n" for i in range(20))


def test_a_printing_task_in_immediate_mode_starts_no_thread(tmp_path):
    """Immediate mode has no threads and no timers: the flush of held-back output did start
    the timer thread (w65); the run's end flushes it there."""
    app = cpsl.App(name="immediate", home=tmp_path / "store", executor="immediate")
    try:
        @app.task
        def chatty():
            print("one")
            print("two")

        before = {t.name for t in threading.enumerate()}
        handle = chatty.submit()
        assert "".join(x["text"] for x in handle.snapshot()["output"]) == "one\ntwo\n"
        assert {t.name for t in threading.enumerate()} - before == set()
    finally:
        app.close()


async def test_a_task_printing_a_hundred_thousand_lines_keeps_the_newest(app):
    """Each print is several writes; the kept output is the newest 200,000 characters, in order.
    (How fast that goes is ``benchmarks/bench_output.py``: copying the kept text per write made
    this task take seconds.)"""

    @app.task
    def loud(lines):
        print("starting", file=sys.stderr)
        for i in range(lines):
            print("line", i)
        return lines

    handle = loud.submit(150_000)
    assert await handle.wait(timeout=120) == "completed"
    (kept,) = handle.snapshot()["output"]  # the stderr line is older than the newest 200,000 characters
    whole = "".join(f"line {i}\n" for i in range(150_000))
    assert kept == {"stream": "stdout", "text": "…" + whole[len(whole) - 199_999:]}


async def test_print_outside_runs_still_reaches_the_real_stream(app, capsys):
    @app.task
    def quiet():
        print("inside")

    await quiet.submit().wait(5)
    print("outside")
    captured = capsys.readouterr()
    assert "outside" in captured.out and "inside" not in captured.out


async def test_logging_in_a_run_is_captured_with_the_run(app, caplog):
    logger = logging.getLogger("report.builder")

    @app.task
    def logs():
        logger.warning("disk almost full")

    handle = logs.submit()
    await handle.wait(5)
    output = "".join(x["text"] for x in handle.snapshot()["output"] if x["stream"] == "log")
    assert "WARNING report.builder: disk almost full" in output
    assert "disk almost full" not in caplog.text  # other handlers do not see a run's records


async def test_a_log_record_factory_set_after_capsule_nbs_keeps_both_working(app):
    """A library that wraps the log record factory after capsule_nb, and capsule_nb wrapping
    that one at the next submit, must not call each other for ever; both keep working."""
    @app.task
    def logs():
        logging.getLogger("report.builder").warning("inside")

    await logs.submit().wait(5)
    ours = logging.getLogRecordFactory()

    def tagging(*args, **kwargs):
        record = ours(*args, **kwargs)
        record.tag = "theirs"
        return record

    logging.setLogRecordFactory(tagging)
    try:
        handle = logs.submit()
        await handle.wait(5)
        assert [o["text"] for o in handle.snapshot()["output"]] == ["WARNING report.builder: inside\n"]
        assert logging.makeLogRecord({"msg": "x"}).tag == "theirs"
    finally:
        logging.setLogRecordFactory(ours)


async def test_show_task_in_a_task_records_it_and_returns_a_card(app):
    @app.task
    async def child():
        return 1

    @app.task
    async def parent(session):
        h = child.submit()
        shown = await session.show_task(h, message="child run")
        return h.task_id, shown

    handle = parent.submit()
    child_id, shown = await handle.result(timeout=5)
    assert shown is None
    assert kinds(handle) == [("show_task", child_id)]


@pytest.mark.parametrize("done, total, bad", [
    (-1, None, "done.*-1"), (float("nan"), None, "done.*nan"), (float("inf"), 10, "done.*inf"),
    ("3", None, "done.*'3'"), (True, None, "done.*True"), (1, -5, "total.*-5"), (1, float("nan"), "total.*nan"),
])
async def test_progress_refuses_what_is_no_count_and_names_it(app, done, total, bad):
    @app.task
    async def report(session):
        session.progress(done, total)

    handle = report.submit()
    with pytest.raises(TaskFailed, match=f"ValueError: progress {bad}"):
        await handle.result(timeout=5)
    assert handle.snapshot()["progress"] is None


async def test_progress_takes_any_real_number_as_plain_json(app):
    import decimal
    import fractions

    @app.task
    async def report(session):
        session.progress(fractions.Fraction(1, 2), decimal.Decimal("3.5"))

    handle = report.submit()
    await handle.result(timeout=5)
    assert handle.snapshot()["progress"] == {"done": 0.5, "total": 3.5, "message": None}


async def test_progress_names_a_number_too_big_for_a_float(app):
    import fractions

    with pytest.raises(ValueError, match=r"progress done must be a finite number.*Fraction\(10000"):
        app.session.progress(fractions.Fraction(10**400, 1) / 3)
