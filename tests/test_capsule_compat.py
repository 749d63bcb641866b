"""Capsule's own code runs unchanged: only ``import cpsl`` becomes ``import capsule_nb as cpsl``.

Each test uses the code of the Capsule docs or SDK; the comment above it names
the page (the ids are those of /work/shared/reference/capsule_api.md: D1 is
docs.capsule.new/features/tasks-and-schedules, D4 tutorials/tasks-and-schedules,
D5 reference/decorators, D8 reference/collections-and-settings, G1/G2 the
capsule-examples guide and templates, SDK the ``cpsl`` package's docstrings).
What a kernel does (streams, display ids, magics, pages in a cell) is checked
in a real ipykernel, driven over ZMQ as in ``test_kernel.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import nbformat
import pytest

import capsule_nb as cpsl
import capsule_nb.app
from capsule_nb.cli import main
from capsule_nb.demo import run_notebook
from capsule_nb.notebook.magics import capsule_summary
from capsule_nb.portable import EXTENSIONS, PortabilityWarning
from capsule_nb.ui import views

from .conftest import until, until_sync
from .test_kernel import Cell, Kernel, loaded_kernel, wait_on_disk

REPO = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def capsule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A process set up as Capsule code finds it: ``cpsl.App(name=...)`` with no home lands on the
    store of ``$CAPSULE_NB_HOME``, which the default app (``cpsl.ui.TaskBoard()``) uses too."""
    home = tmp_path / "store"
    monkeypatch.setenv("CAPSULE_NB_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(capsule_nb.app, "_default", None)
    yield home
    for app in list(capsule_nb.app._apps.values()):
        if app.home == home:
            app.close()


# ------------------------------------------------------------------ 1, 12: apps


async def test_an_apps_runs_show_on_every_board_and_summary_and_filter_by_app(capsule, capsys):
    # D1, with the App of every Capsule template (G2)
    image = cpsl.Image(python_packages=["httpx"]).add_commands(["echo hi"])
    app = cpsl.App(name="my-app", image=image)

    @app.task(retries=2, timeout=300)
    async def sync_threads(owner_id: str):
        return {"synced": 25, "owner_id": owner_id}

    session = cpsl.current_session()
    handle = await sync_threads.submit(owner_id=session.user.owner_id)
    assert await handle.result(timeout=10) == {"synced": 25, "owner_id": session.user.owner_id}

    board = cpsl.ui.TaskBoard(title="Background work")  # D2
    narrowed = cpsl.ui.TaskBoard(filter={"app": "default"})
    mine = cpsl.ui.TaskBoard(filter={"app": "my-app"})
    try:
        assert board.total == 1 and mine.total == 1 and narrowed.total == 0
        assert "sync_threads" in repr(board) and handle.task_id in repr(board)
        assert board.choices["app"] == ["my-app"]
    finally:
        for made in (board, narrowed, mine):
            made.close()
    summary = capsule_summary()
    assert "app 'my-app': 1 runs" in summary and "completed 1" in summary
    app.store.flush()
    assert main(["tasks", "--json"]) == 0  # the store of $CAPSULE_NB_HOME, every app
    assert [r["app"] for r in json.loads(capsys.readouterr().out)] == ["my-app"]
    assert main(["tasks", "--app", "default"]) == 0
    assert capsys.readouterr().out.strip().endswith("has runs on " + str(app.home) + "; its apps: my-app)")
    assert app.image is image and "not used locally" in repr(image)


async def test_task_options_by_position_in_capsules_order(capsule):
    # SDK: App.task(retries=0, timeout=0, lock=None, retry_for=None, callback_url=None, process=False),
    # as docs/api.md writes it: the six may be given by position
    app = cpsl.App(name="my-app")
    attempts = []

    @app.task(1, 60, "report:{report_id}", [ValueError])
    def build(report_id: str = "daily"):
        attempts.append(report_id)
        if len(attempts) == 1:
            raise ValueError("first attempt fails")
        return report_id

    handle = build.submit(report_id="weekly")
    assert await handle.result(timeout=10) == "weekly"
    record = handle.snapshot()
    assert (record["attempt"], record["max_attempts"], record["lock_key"]) == (2, 2, "report:weekly")

    @cpsl.task(2)
    def on_the_default_app():
        return 1

    assert on_the_default_app.submit().snapshot()["max_attempts"] == 3
    with pytest.raises(TypeError, match="retries= twice: 1 by position and 2 by name"):
        app.task(1, retries=2)
    with pytest.raises(TypeError, match="at most 6 options by position"):
        app.task(0, 0, None, None, None, False, "extra")


# ------------------------------------------------------------------ 3: delays


@pytest.mark.parametrize("delay, seconds", [("10 minutes", 600), ("1 hour", 3600), ("2hr", 7200),
                                            ("5 sec", 5), ("5M", 300), ("1 day", 86400), ("30m", 1800)])
async def test_the_sdks_delay_words(capsule, delay, seconds):
    app = cpsl.App(name="my-app")

    # D4: build_report, scheduled as its message handler does (delay = the words after "schedule ")
    @app.task(retries=1, timeout=120, lock="report:{report_id}")
    async def build_report(session: cpsl.Session | None = None, report_id: str = "daily", duration: int = 5):
        await asyncio.sleep(duration)
        return {"report_id": report_id, "ok": True}

    session = cpsl.current_session()
    before = time.time()
    handle = await build_report.schedule(session=session, delay=delay, report_id="scheduled", duration=5)
    assert await handle.status() == "scheduled"
    assert before + seconds <= handle.snapshot()["scheduled_for"] <= time.time() + seconds
    assert await handle.cancel() is True


async def test_repeat_every_and_the_errors_the_sdk_also_gives(capsule):
    app = cpsl.App(name="my-app")

    @app.task()
    async def my_task(session: cpsl.Session | None = None):
        return "ran"

    session = cpsl.current_session()
    # SDK docstring: handle = await my_task.schedule("every 5m", session=session); also "repeat every 5m"
    for when in ("every 5m", "repeat every 5m"):
        handle = await my_task.schedule(when, session=session)
        assert handle.snapshot()["every"] == 300 and await handle.status() == "scheduled"
        assert await handle.cancel() is True
    for bad in ("1h30m", "-5m", "5 weeks", "every -5m"):
        with pytest.raises(ValueError, match=re.escape(repr(bad.removeprefix("every ")))):
            await my_task.schedule(delay=bad) if not bad.startswith("every") else await my_task.schedule(bad)
    assert await my_task.count() == 2


async def test_a_session_given_first_to_schedule_is_the_session(capsule):
    app = cpsl.App(name="my-app")

    @app.task()
    async def my_task(session: cpsl.Session | None = None, report_id: str = "daily"):
        return report_id

    session = cpsl.current_session()
    # GUIDE: schedule(session: Session | None = None, delay=None, **kwargs); the SDK still takes a
    # session as its first argument, and says "session was provided twice" for one given both ways
    handle = await my_task.schedule(session, delay="30m", report_id="scheduled")
    assert await handle.status() == "scheduled" and handle.session_id == session.id
    assert handle.kwargs["report_id"] == "scheduled"
    with pytest.raises(TypeError, match="session was provided twice"):
        await my_task.schedule(session, session=session, delay="30m", report_id="again")
    assert await my_task.count() == 1
    assert await handle.cancel() is True


async def test_a_task_parameter_named_at_gets_its_argument_from_schedule(capsule):
    """SDK: ``schedule(when=None, *, session=None, delay=None, display_name="", **kwargs)``, all
    other kwargs forwarded to the handler. ``at=`` was taken as capsule_nb's start time (w54)."""
    app = cpsl.App(name="my-app")

    @app.task()
    async def remind(at: str, text: str):
        return f"{text} at {at}"

    @app.task()
    async def anything(**kwargs):
        return kwargs

    later = await remind.schedule(delay="30m", at="home", text="hi")
    assert await later.status() == "scheduled" and later.kwargs == {"at": "home", "text": "hi"}
    soon = await remind.schedule("1s", at="home", text="hi")
    assert await soon.result(timeout=10) == "hi at home"
    assert await (await anything.schedule(delay="1s", at="the office")).result(timeout=10) == {"at": "the office"}
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)  # a datetime: the start, for **kwargs
    assert (await anything.schedule(at=when)).snapshot()["scheduled_for"] == pytest.approx(when.timestamp())
    assert await later.cancel() is True


# ------------------------------------------------------- 4: display_name, session_id


async def test_display_name_and_session_id_on_handles_and_queries(capsule):
    app = cpsl.App(name="my-app")
    gate = asyncio.Event()

    # SDK docstring: send_email, submitted with a session
    @app.task(retries=2, timeout=60)
    async def send_email(session: cpsl.Session, to: str, body: str):
        await gate.wait()

    session = cpsl.current_session()
    other = cpsl.Session(app, id="chat-42")
    handle = await send_email.submit(session=session, display_name="Welcome mail", to="a@b.c", body="Hi")
    later = await send_email.schedule("every 1h", session=other, display_name="Digest", to="d@e.f", body="Yo")
    unbound = await send_email.submit(session=None, to="g@h.i", body="Hey")
    status = await handle.status()
    assert status in ("pending", "running")
    assert (handle.display_name, handle.session_id) == ("Welcome mail", session.id)
    assert (later.display_name, later.session_id) == ("Digest", "chat-42")
    assert (unbound.display_name, unbound.session_id) == ("", "")

    # GUIDE: find(status=None, session_id=None, limit=100, offset=0, **kwargs)
    assert [h.task_id for h in await send_email.find(session_id=session.id)] == [handle.task_id]
    assert await send_email.find(session_id="chat-42") == [later]
    assert await send_email.count(session_id=session.id) == 1 and await app.tasks.count(session_id="nobody") == 0
    assert await send_email.find(session_id=session.id, to="a@b.c") == [handle]
    assert await send_email.cancel(session_id="chat-42") == 1
    assert await later.status() == "cancelled" and await handle.status() in ("pending", "running")
    gate.set()
    await handle.wait(10)
    await unbound.wait(10)
    assert views.summary(handle.snapshot())["title"] == "Welcome mail"


# ------------------------------------------------------------------ 5: inline calls


async def test_calling_a_task_directly_runs_it_inline(capsule):
    import threading

    app = cpsl.App(name="my-app")
    seen = []

    # G2 background-agent template: the schedule awaits the task descriptor inline
    @app.task(retries=1, timeout=120)
    async def monitor_topic(topic: str, session: cpsl.Session | None = None):
        seen.append(topic)
        return topic.upper()

    @app.schedule("0 14 * * *")
    async def daily_monitor():
        await monitor_topic("daily product signals")

    @app.task()
    def double(x: int) -> int:  # a sync task: Capsule runs it in an executor
        seen.append(threading.current_thread() is threading.main_thread())
        return 2 * x

    await daily_monitor()
    assert await double(x=21) == 42
    assert await monitor_topic(topic="launch") == "LAUNCH"
    assert seen == ["daily product signals", False, "launch"]
    assert double.fn(x=1) == 2 and await app.tasks.count() == 0  # no queue, no handle


async def test_what_capsules_coroutines_return_goes_where_only_coroutines_go(capsule):
    """SDK: ``submit``, ``schedule``, ``find``, ``count`` and the collection and session methods are
    ``async def``, so Capsule code may hand their result to ``asyncio.create_task`` or a TaskGroup."""
    app = cpsl.App(name="my-app")
    tickets = app.collection("tickets")

    @app.task()
    async def add(a: int, b: int) -> int:
        return a + b

    background = asyncio.create_task(add.submit(a=1, b=2))  # fire and forget, then pick it up
    handle = await background
    assert await handle.result(timeout=10) == 3
    async with asyncio.TaskGroup() as group:
        submits = [group.create_task(add.submit(a=i, b=i)) for i in range(3)]
        later = group.create_task(add.schedule(delay="1h", a=0, b=0))
    assert [await s.result().result(timeout=10) for s in submits] == [0, 2, 4]
    assert await asyncio.create_task(add.count(status="scheduled")) == 1
    assert await asyncio.create_task(later.result().cancel())
    assert [h.task_id for h in await asyncio.create_task(add.find(status="cancelled"))] == [later.result().task_id]
    created = await asyncio.create_task(tickets.insert_one({"subject": "Renewal review"}))
    assert await asyncio.create_task(tickets.find_one({"_id": created["_id"]})) == created
    await asyncio.create_task(app.owner_session.notify("done"))


async def test_schedule_told_no_time_runs_at_once_as_capsules_does(capsule):
    """SDK: ``schedule()`` with neither ``when`` nor ``delay`` sends no time, and the server runs
    it as a submit (w57: here it was a TypeError, for code passing a delay that may be None)."""
    app = cpsl.App(name="my-app")

    @app.task()
    async def build_report(report_id: str = "daily") -> str:
        return report_id

    for handle in (await build_report.schedule(report_id="now"), await build_report.schedule(delay=None)):
        assert handle.snapshot()["status"] != "scheduled" and handle.snapshot().get("scheduled_for") is None
        assert await handle.result(timeout=10) in ("now", "daily")
    assert await build_report.count(status="completed") == 2


async def test_asyncio_gather_and_as_completed_take_what_capsules_coroutines_return(capsule):
    """Gathering Capsule's coroutines is ordinary code (w57): ``gather`` keys its arguments by
    hash, so a page or a document was refused as unhashable after its write had been made,
    and a cancel's True merged with a count of 1."""
    app = cpsl.App(name="my-app")
    threads = app.collection("threads")

    @app.task()
    async def idle() -> None:
        await asyncio.sleep(3600)

    first, second = await asyncio.gather(threads.insert_one({"s": 1}), threads.insert_one({"s": 1}))
    assert first["_id"] != second["_id"]
    rows, n, found = await asyncio.gather(threads.find({"s": 1}, limit=25), threads.count(), idle.find())
    assert (len(rows), n, found) == (2, 2, [])
    empty, also_empty = await asyncio.gather(threads.find({"s": 2}), threads.find({"s": 3}))
    assert empty == also_empty == []
    handle = await idle.submit()
    ones = await asyncio.gather(threads.count({"_id": first["_id"]}), handle.cancel())
    assert ones == [1, True] and type(ones[1]) is bool
    pages = [await page for page in asyncio.as_completed([threads.find({"s": 1}), threads.find({"s": 1})])]
    assert [len(page) for page in pages] == [2, 2]
    assert await threads.count() == 2  # each insert made once


async def test_a_session_given_first_to_submit_is_the_session(capsule):
    """SDK: ``async def submit(self, session=None, display_name="", **kwargs)``: Capsule code may
    pass the session first, whether or not the task's first parameter is the session."""
    app = cpsl.App(name="my-app")

    @app.task()
    async def build_report(session: cpsl.Session, report_id: str = "daily"):
        return session.id, report_id

    @app.task()
    async def monitor_topic(topic: str = "signals", session: cpsl.Session | None = None):
        return session.id, topic

    handle = await build_report.submit(app.session, report_id="weekly")
    assert await handle.result(timeout=10) == (app.session.id, "weekly") and handle.session_id == app.session.id
    handle = await monitor_topic.submit(app.session, topic="launch")
    assert await handle.result(timeout=10) == (app.session.id, "launch")
    with pytest.raises(TypeError, match="session was provided twice"):
        monitor_topic.submit(app.session, session=app.session)


def test_asyncio_run_takes_a_submit_as_it_takes_capsules_coroutine(capsule):
    app = cpsl.App(name="my-app")

    @app.task()
    async def add(a: int, b: int) -> int:
        return a + b

    handle = asyncio.run(add.submit(a=2, b=3))  # a script's way to call a coroutine
    assert asyncio.run(handle.result(timeout=10)) == 5
    assert asyncio.run(add.count(status="completed")) == 1


# ------------------------------------------------------------------ 6: collections


async def test_collections_take_capsules_options_and_dict_sort(capsule):
    app = cpsl.App(name="my-app")
    # GUIDE: App.collection(name, *, columns, scope, sortable, filterable, paginate)
    threads = app.collection("threads", columns=["subject", "sender", {"key": "status", "label": "State"}],
                             scope="app", sortable=True, filterable=True, paginate=2)
    # D8, as written
    created = await threads.insert_one({"subject": "Renewal review", "sender": "ops@example.com",
                                        "status": "needs-review", "priority": "high"})
    row = await threads.find_one({"_id": created["_id"]})
    await threads.insert_many([
        {"subject": "Invoice", "sender": "billing@example.com", "status": "needs-review", "priority": "low"},
        {"subject": "Access", "sender": "it@example.com", "status": "needs-review", "priority": "high"},
    ])
    rows = await threads.find({"status": "needs-review"}, limit=25, sort={"priority": 1})
    count = await threads.count()
    thread_id = created["_id"]
    await threads.update_one({"_id": thread_id}, {"status": "waiting"})
    await threads.update_one({"_id": thread_id}, {"$inc": {"review_count": 1}})

    assert row["subject"] == "Renewal review" and count == 3
    assert [r["priority"] for r in rows] == ["high", "high", "low"]
    two_keys = await threads.find(sort={"priority": 1, "subject": -1})
    assert [r["subject"] for r in two_keys] == ["Renewal review", "Access", "Invoice"]
    assert (await threads.find_one({"_id": thread_id}))["review_count"] == 1
    table = app.collection("threads")._repr_html_()  # declared once, the table keeps its columns
    assert re.findall(r"<th>(.*?)</th>", table) == ["subject", "sender", "State"]
    assert "2 of 3 documents" in table and "priority" not in table
    with pytest.raises(ValueError, match="'team'"):
        app.collection("threads", scope="team")
    with pytest.raises(ValueError, match="sort takes"):
        await threads.find(sort={"priority": "up"})


async def test_a_handles_times_are_iso_text_as_the_sdk_gives_them(capsule):
    """SDK ``TaskHandle``: ``created_at: str; started_at: str; completed_at: str  # ISO strings``,
    "" until set. Capsule code slices them and stores them in documents."""
    import datetime

    app = cpsl.App(name="my-app")
    runs = app.collection("runs")

    @app.task
    async def build_report(report_id: str = "daily"):
        return report_id

    done = await build_report.submit(report_id="daily")
    await done.wait(10)
    later = await build_report.schedule(delay="1h", report_id="weekly")
    (found,) = await build_report.find(status="completed")
    assert datetime.datetime.fromisoformat(found.completed_at) >= datetime.datetime.fromisoformat(found.created_at)
    assert found.created_at[:4].isdigit() and later.started_at == "" and later.completed_at == ""
    await runs.insert_one({"task_id": found.task_id, "created_at": found.created_at})
    assert (await runs.find_one({}))["created_at"] == found.created_at
    await later.cancel()


def test_a_board_and_its_columns_say_themselves_as_the_sdk_does(capsule):
    """SDK ``ui.py``: ``TaskBoardColumn.to_dict() -> {"label", "statuses"}``; ``TaskBoard.to_dict()
    -> {"type": "task_board", "refresh_ms"}`` plus title, filter and columns when given."""
    failed = cpsl.ui.TaskBoardColumn("Failed", ["failed", "cancelled", "timeout"])
    assert failed.to_dict() == {"label": "Failed", "statuses": ["failed", "cancelled", "timeout"]}
    assert cpsl.ui.TaskBoard().to_dict() == {"type": "task_board", "refresh_ms": 5000}
    board = cpsl.ui.TaskBoard(title="Reports", filter={"task_name": "build_report"}, columns=[failed], refresh_ms=2000)
    assert board.to_dict() == {"type": "task_board", "refresh_ms": 2000, "title": "Reports",
                               "filter": {"task_name": "build_report"}, "columns": [failed.to_dict()]}


async def test_writes_and_lookups_give_back_what_the_sdk_gives(capsule):
    """Code that reads what a call gives back: the SDK's ``update_one`` gives ``{"matched",
    "modified"}``, ``delete_one`` ``{"deleted"}`` (counts), session collections take
    ``upsert=``, and ``app.tasks.get`` is a coroutine giving a handle or None."""
    app = cpsl.App(name="my-app")
    threads = app.collection("threads")

    @app.task()
    async def noop():
        return None

    # SDK CollectionRef: update_one(filter, update) -> dict; delete_one(filter) -> dict
    created = await threads.insert_one({"subject": "Renewal review", "status": "needs-review"})
    res = await threads.update_one({"_id": created["_id"]}, {"status": "waiting"})
    if res["matched"] and res["modified"]:
        outcome = "updated"
    assert outcome == "updated"
    assert (await threads.update_one({"_id": "nope"}, {"status": "waiting"}))["matched"] == 0
    res = await threads.delete_one({"_id": created["_id"]})
    assert res["deleted"] == 1 and (await threads.delete_one({"_id": created["_id"]}))["deleted"] == 0
    # SDK session collections: update_one(filter, update, *, upsert=False)
    session = app.session
    res = await session.db.prefs.update_one({"user": "ada"}, {"$set": {"theme": "dark"}}, upsert=True)
    assert res["matched"] == 0 and (await session.db.prefs.find_one({"user": "ada"}))["theme"] == "dark"
    # SDK GlobalTaskQuery: async get(task_id) -> TaskHandle | None
    handle = await noop.submit()
    assert (await app.tasks.get(handle.task_id)).task_id == handle.task_id
    missing = await app.tasks.get("0661b829fa1ea78a04560000")
    assert missing is None
    assert not app.tasks.get("0661b829fa1ea78a04560000") and app.tasks.get("0661b829fa1ea78a04560000") == None  # noqa: E711


async def test_a_collection_declared_with_columns_shows_their_labels(capsule):
    app = cpsl.App(name="my-app")
    # GUIDE: columns: list[str | Column]; cpsl.Column(key, type="text", label=None, format=None)
    threads = app.collection(
        "threads",
        columns=[
            "subject",
            cpsl.Column("sender", type="email", label="From"),
            cpsl.Column("status", type="status", label="State"),
            cpsl.Column("amount", "currency", "Amount", "USD"),
            cpsl.Column("received", type="date", format="%Y-%m-%d"),
            cpsl.Column("tags", type="tags"),
            cpsl.Column("urgent", type="boolean", label="Urgent?"),
        ],
        sortable=True,
    )
    # D8, as written
    created = await threads.insert_one({"subject": "Renewal review", "sender": "ops@example.com",
                                        "status": "needs-review", "priority": "high"})
    await threads.update_one({"_id": created["_id"]}, {"$set": {"amount": 1200, "tags": ["renewal"]}})

    table = threads._repr_html_()
    assert re.findall(r"<th>(.*?)</th>", table) == ["subject", "From", "State", "Amount", "received", "tags",
                                                   "Urgent?"]
    assert re.findall(r"<td>(.*?)</td>", table) == ["Renewal review", "ops@example.com", "needs-review", "1200",
                                                   "", "[&#x27;renewal&#x27;]", ""]
    amount = cpsl.Column("amount", "currency", "Amount", "USD")
    assert (amount.key, amount.type, amount.label, amount.format) == ("amount", "currency", "Amount", "USD")
    assert cpsl.Column("subject") == cpsl.Column("subject", type="text", label=None, format=None)
    with pytest.raises(AttributeError):
        amount.label = "Total"  # a declared column does not change under its table


# ------------------------------------------------------------------ 7: show_task


async def test_show_task_of_an_unknown_id_names_the_id_and_the_store(capsule):
    session = cpsl.current_session()
    with pytest.raises(KeyError, match=f"no-such-id.*{re.escape(str(capsule))}"):
        await session.show_task("no-such-id")
    # SDK Session.show_task: an empty id shows nothing and returns (Capsule's refused submits give one)
    assert await session.show_task("") is None


# ------------------------------------------------------------------ 8: locks


async def test_lock_templates_and_which_run_a_submit_may_join(capsule):
    app = cpsl.App(name="my-app")
    gate = asyncio.Event()

    # D5: 'Lock template like "user:{user_id}"', on a task that takes **kwargs
    @app.task(lock="user:{user_id}")
    async def refresh_user(**kwargs):
        await gate.wait()
        return kwargs.get("user_id")

    first = await refresh_user.submit(user_id="u1")
    again = await refresh_user.submit(user_id="u1")
    other_user = await refresh_user.submit(user_id="u2")
    nobody = await refresh_user.submit()
    assert again == first and other_user != first  # the same task and key: joins
    assert [h.snapshot()["lock_key"] for h in (first, other_user, nobody)] == ["user:u1", "user:u2", "user:"]
    assert await refresh_user.find(user_id="u2") == [other_user]

    # D5 worked flow: sync_threads holds "mailbox:sync"; another task declares the same template
    @app.task(retries=2, lock="mailbox:sync")
    async def sync_threads(session: cpsl.Session | None = None):
        await gate.wait()
        return "threads"

    @app.task(lock="mailbox:sync")
    async def sync_labels(session: cpsl.Session | None = None):
        return "labels"

    @app.task(lock="mailbox:sync", on_lock="reject")
    async def sync_drafts(session: cpsl.Session | None = None):
        return "drafts"

    threads = await sync_threads.submit()
    labels = await sync_labels.submit()
    assert labels != threads and await labels.status() == "pending"  # waits its turn
    with pytest.raises(cpsl.LockedError):
        await sync_drafts.submit()
    gate.set()
    assert await threads.result(timeout=10) == "threads"
    assert await labels.result(timeout=10) == "labels"  # its own value, never the other task's
    assert labels.snapshot()["started_at"] >= threads.snapshot()["completed_at"]
    assert await first.result(timeout=10) == "u1"


def test_a_kwargs_lock_template_still_checks_named_parameters(capsule):
    app = cpsl.App(name="my-app")
    with pytest.raises(ValueError, match="report_id"):
        @app.task(lock="report:{report_id}")
        async def build_report(session: cpsl.Session | None = None, day: str = "monday"):
            pass


# ------------------------------------------------------------------ 10: the CLI


def test_cli_options_go_before_or_after_the_command(capsule, capsys, tmp_path):
    app = cpsl.App(name="my-app")

    @app.task()
    def probe(n: int) -> int:
        return n

    handle = probe.submit(n=1)
    until_sync(lambda: handle.snapshot()["status"] == "completed")
    app.store.flush()
    home = str(app.home)
    outputs = []
    for argv in (["tasks", "--home", home, "--json"], ["--home", home, "--json", "tasks"],
                 ["--home", "/nowhere", "tasks", "--home", home, "--json"], ["--json", "tasks", "--home", home]):
        assert main(argv) == 0, argv
        outputs.append([r["task_id"] for r in json.loads(capsys.readouterr().out)])
    assert outputs == [[handle.task_id]] * 4
    assert main(["show", handle.task_id, "--home", home]) == 0 and "probe [completed]" in capsys.readouterr().out
    assert main(["tasks", "--home", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a capsule_nb store" in err and "given by --home" in err and "give --home" not in err


# ------------------------------------------------------------------ 11: Dask


DASK_SCRIPT = """
import asyncio
import capsule_nb as cpsl
import distributed

@cpsl.task(process=True)
def square(x):
    return x * x

if __name__ == "__main__":
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    cpsl.configure(cluster=client)
    print(asyncio.run(square.submit(7).result(timeout=60)))
    cpsl.configure(cluster=None)
    client.close()
    cluster.close()
"""


def test_a_clean_dask_run_logs_no_traceback(tmp_path):
    """Dask starts its workers by importing the script's main module: the task defined there must not
    try to warm worker processes in a daemonic Dask worker."""
    pytest.importorskip("distributed")
    script = tmp_path / "job.py"
    script.write_text(DASK_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "CAPSULE_NB_HOME": str(tmp_path / "store")})
    assert done.returncode == 0 and done.stdout.split() == ["49"], done.stdout + done.stderr
    # (Dask itself may log a comm closed at shutdown, under load: not ours, so not counted)
    ours = [tb for tb in done.stderr.split("Traceback")[1:] if "capsule_nb" in tb]
    assert not ours and "could not start" not in done.stderr, done.stderr


# ------------------------------------------------------------- 13: the tasks page


async def test_the_docs_tasks_page_stacks_live_boards(capsule):
    app = cpsl.App(name="my-app", image=cpsl.Image())

    @app.task(retries=1, timeout=120, lock="report:{report_id}")
    async def build_report(session: cpsl.Session | None = None, report_id: str = "daily", duration: int = 5):
        await asyncio.sleep(duration)
        return {"report_id": report_id, "ok": True}

    # D4, as written
    @app.page("Tasks", icon="layout-grid")
    def tasks_page():
        return cpsl.ui.Page(
            [
                cpsl.ui.TaskBoard(title="All tasks", refresh_ms=3000),
                cpsl.ui.Divider(),
                cpsl.ui.TaskBoard(
                    title="report_only",
                    filter={"task_name": "build_report"},
                    columns=[
                        cpsl.ui.TaskBoardColumn("Queued", ["pending", "scheduled", "retry"]),
                        cpsl.ui.TaskBoardColumn("Running", ["running"]),
                        cpsl.ui.TaskBoardColumn("Done", ["completed"]),
                        cpsl.ui.TaskBoardColumn("Failed", ["failed", "cancelled", "timeout"]),
                    ],
                    refresh_ms=3000,
                ),
            ]
        )

    page = tasks_page()
    try:
        everything, divider, reports = page.children
        assert (everything.title, reports.title) == ("All tasks", "report_only")
        assert isinstance(divider, cpsl.ui.Divider) and everything._app is app
        assert app.pages()["Tasks"].icon == "layout-grid"
        handle = await build_report.submit(report_id="daily", duration=0)
        await handle.wait(10)
        await until(lambda: [x["count"] for x in reports.lanes] == [0, 0, 1, 0] and everything.total == 1)
        text = repr(page)
        assert text.index("All tasks") < text.index("─" * 10) < text.index("report_only")
    finally:
        page.close()
    assert everything._closed and reports._closed


# --------------------------------------------------------- beyond: portable mode


async def test_portable_mode_warns_once_per_extension_with_the_capsule_way(capsule):
    app = cpsl.App(name="my-app")
    cpsl.configure(portable=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            # D4's task, as Capsule has it: no warning
            @app.task(retries=1, timeout=120, lock="report:{report_id}")
            async def build_report(session: cpsl.Session | None = None, report_id: str = "daily",
                                   duration: int = 5):
                return {"report_id": report_id, "ok": True}

            handle = await build_report.submit(report_id="daily", duration=0)
            later = await build_report.schedule(delay="10m", report_id="weekly")
            await handle.status()
            await later.cancel()
            plain = len(caught)

            @app.task(retries=2, retry_delay="1s", backoff=2, on_lock="queue", lock="feed:{feed}")
            def parse(feed: str) -> int:
                return len(feed)

            first = parse.submit("daily")
            parse.submit("weekly")  # the same extension again: no second warning
            assert await first.result(timeout=10) == 5
            parse.schedule(at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1), feed="x")
            (await parse.schedule(delay="1h", feed={"daily", "weekly"})).cancel()  # a set: Capsule's JSON refuses it

            @app.schedule("*/10 * * * * *", tz="Europe/Paris")
            def tick():
                pass

            tick.stop()

            @app.task  # Capsule's task would take the function as `retries`
            def bare():
                pass

            (await parse.schedule(delay="1.5h", feed="z")).cancel()  # the SDK's shorthand: whole numbers
            await app.collection("seen").find({}, sort={"at": 1})  # Capsule's form: no warning
            await app.collection("seen").find({}, sort="at")
        messages = [str(w.message) for w in caught[plain:] if w.category is PortabilityWarning]
    finally:
        cpsl.configure(portable=False)
    assert plain == 0
    expected = ["retry_policy", "on_lock", "positional", "wait_result", "schedule_at", "json_args", "cron_tz",
                "cron_seconds", "bare_task", "delay_number", "doc_options"]
    assert messages == [EXTENSIONS[code][0] + " is a capsule_nb extension, not Capsule's. The Capsule way: "
                        + EXTENSIONS[code][1] for code in expected]
    assert all(w.filename == __file__ for w in caught[plain:])  # each points at the user's line


def test_portable_mode_names_upsert_given_at_all(capsule):
    """Capsule's ``update_one(filter, update)`` takes no ``upsert``: ``upsert=False`` is a
    TypeError there too (w65)."""
    app = cpsl.App(name="my-app")
    cpsl.configure(portable=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            app.collection("seen").update_one({"a": 1}, {"b": 2})
            assert not [w for w in caught if w.category is PortabilityWarning]
            app.collection("seen").update_one({"a": 1}, {"b": 2}, upsert=False)
        (warned,) = [w for w in caught if w.category is PortabilityWarning]
        assert str(warned.message).startswith(EXTENSIONS["doc_options"][0])
    finally:
        cpsl.configure(portable=False)


def test_from_a_script_asyncio_run_of_result_warns_at_the_users_line(capsule):
    # docs/api.md: "Only wait() and result() must be awaited (from a script: asyncio.run(h.result()))"
    app = cpsl.App(name="my-app")

    @app.task()
    def double(x: int) -> int:
        return 2 * x

    h = double.submit(x=21)
    cpsl.configure(portable=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert asyncio.run(h.result()) == 42
            assert asyncio.run(h.wait("30s")) == "completed"
    finally:
        cpsl.configure(portable=False)
    (warned,) = [w for w in caught if w.category is PortabilityWarning]
    assert str(warned.message).startswith(EXTENSIONS["wait_result"][0]) and warned.filename == __file__
    with pytest.raises(ValueError, match="1h30m"):  # a bad timeout is an error at the call, before any loop
        h.wait(timeout="1h30m")


def _notebook(path: Path, *cells: str) -> Path:
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells]),
                   path)
    return path


D4_TASK = """
@app.task(retries=1, timeout=120, lock="report:{report_id}")
async def build_report(
    session: cpsl.Session | None = None,
    report_id: str = "daily",
    duration: int = 5,
):
    if session is not None:
        await session.notify(f"[{report_id}] starting")
    await asyncio.sleep(duration)
    if session is not None:
        await session.reply(f"[{report_id}] finished after {duration}s")
    return {"report_id": report_id, "ok": True}
"""


def test_check_lists_the_extensions_cell_by_cell(tmp_path, capsys):
    prototype = _notebook(
        tmp_path / "prototype.ipynb",
        "%load_ext capsule_nb\nimport asyncio, datetime\nimport capsule_nb as cpsl\napp = cpsl.App(name='my-app')",
        D4_TASK,
        'handle = await build_report.submit(session=session, report_id="daily", duration=5)\n'
        "await session.show_task(handle, message='Building daily report…')",
        """
        @app.task(retries=2, retry_delay="1s", backoff=2)
        def parse(feed: str) -> int:
            return len(feed)

        runs = [parse.submit(f) for f in ("a", "bb")]
        print([await h.result() for h in runs])
        """,
        '@app.schedule("*/10 * * * * *", tz="Europe/Paris")\ndef tick():\n    pass',
        "later = build_report.schedule(at=datetime.datetime.now() + datetime.timedelta(hours=1))\n"
        "print(await handle.status(), await later.wait())",
        # Capsule's coroutines without await do nothing there (handed to gather, they run)
        "threads = app.collection('threads')\nprint(handle.status())\nthreads.insert_one({'subject': 'hi'})\n"
        "await asyncio.gather(*(build_report.submit(report_id=r) for r in 'ab'), session.db.threads.count())",
        "this is not python",
    )
    assert main(["check", str(prototype)]) == 1
    out = capsys.readouterr().out
    found = re.findall(r"cell (\d+), line (\d+): (.*)\n    (.*)", out)
    where = [(int(cell), int(line), source) for cell, line, source, _ in found]
    assert where == [(4, 2, '@app.task(retries=2, retry_delay="1s", backoff=2)'),
                     (4, 6, 'runs = [parse.submit(f) for f in ("a", "bb")]'),  # positional
                     (4, 6, 'runs = [parse.submit(f) for f in ("a", "bb")]'),  # and not awaited
                     (4, 7, "print([await h.result() for h in runs])"),
                     (5, 1, '@app.schedule("*/10 * * * * *", tz="Europe/Paris")'),
                     (5, 1, '@app.schedule("*/10 * * * * *", tz="Europe/Paris")'),
                     (6, 1, "later = build_report.schedule(at=datetime.datetime.now() + datetime.timedelta(hours=1))"),
                     (6, 1, "later = build_report.schedule(at=datetime.datetime.now() + datetime.timedelta(hours=1))"),
                     (6, 2, "print(await handle.status(), await later.wait())"),
                     (7, 2, "print(handle.status())"),
                     (7, 3, "threads.insert_one({'subject': 'hi'})")]
    assert "11 capsule_nb-only extension(s) in 4 cell(s)" in out
    assert "The Capsule way: pass task arguments by keyword" in out
    assert "The Capsule way: await it: on Capsule these are coroutines" in out
    for argv in (["check", str(prototype), "--json"], ["--json", "check", str(prototype)]):  # as every command (w54)
        assert main(argv) == 1
        [report] = json.loads(capsys.readouterr().out)
        assert [(e["cell"], e["line"], e["source"]) for e in report["extensions"]] == where
        assert report["not_checked"] == [] and report["python"]  # ("this is not python" is: an `is not` test)

    plain = _notebook(tmp_path / "plain.ipynb", "import asyncio\nimport capsule_nb as cpsl\napp = cpsl.App(name='x')",
                      D4_TASK, 'handle = await build_report.submit(report_id="daily", duration=5)\n'
                               "print(await handle.status())",
                      # coroutines kept in names and awaited or gathered later; other libraries' look-alikes
                      "coros = [build_report.submit(report_id=r) for r in 'ab']\nhandles = await asyncio.gather(*coros)\n"
                      "pending = build_report.submit(report_id='c')\nhandle = await pending",
                      # Capsule hands schedule's at= to a task that takes it: no extension (w54)
                      "@app.task()\nasync def visit(at: str, session=None):\n    return at\n\n"
                      "@app.task()\nasync def log(**fields):\n    return fields\n\n"
                      "await visit.schedule(delay='30m', at='home')\nawait log.schedule(delay='1m', at='desk')",
                      "from celery import Celery\ncelery_app = Celery()\n\n@celery_app.task\ndef other(): pass",  # (w65)
                      "async def fetch(url):\n    async with httpx.AsyncClient() as session:\n"
                      "        async with session.stream('GET', url) as r:\n            return await r.aread()\n"
                      "pymongo.MongoClient().db.users.insert_one({'a': 1})")
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "check", str(plain)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "no capsule_nb-only extensions" in done.stdout, done.stdout + done.stderr
    # Capsule's task takes its options first: a bare @app.task there takes the function as `retries` (w64)
    bare = _notebook(tmp_path / "bare.ipynb", "import capsule_nb as cpsl\napp: cpsl.App = cpsl.App(name='x')",
                     "@app.task\nasync def visit(place: str):\n    return place",
                     "await visit.schedule(delay='1.5h', place='x')\nawait visit.schedule(delay='90m', place='y')\n"
                     "await visit.schedule(delay='90', place='z')",  # (an error in both, no extension: w66)
                     "seen = app.collection('seen')\nawait seen.find({}, sort={'at': 1})\nawait seen.find({}, sort='at')\n"
                     "await seen.update_one({'a': 1}, {'b': 2}, upsert=True)\nawait seen.update_one({'a': 1}, {'b': 2})")
    assert main(["check", str(bare)]) == 1
    out = capsys.readouterr().out
    assert "cell 2, line 1: @app.task\n    @task without parentheses is a capsule_nb extension" in out
    assert "cell 3, line 1: await visit.schedule(delay='1.5h'" in out and "cell 3, line 2" not in out
    assert "cell 3, line 3" not in out
    assert [line for line in out.splitlines() if line.startswith("  cell 4")] == [
        "  cell 4, line 3: await seen.find({}, sort='at')",
        "  cell 4, line 4: await seen.update_one({'a': 1}, {'b': 2}, upsert=True)"]
    assert main(["check", str(tmp_path / "missing.ipynb")]) == 2
    capsys.readouterr()
    for text in ("[]", '{"cells": [5]}', '{"cells": 5}', "{}", '{"cells": [{"cell_type": "code", "source": 5}]}'):
        (tmp_path / "odd.ipynb").write_text(text)  # JSON, but no notebook: named, never "plain Capsule" (w57)
        assert main(["check", str(tmp_path / "odd.ipynb")]) == 2, text
        said = capsys.readouterr()
        assert "cannot read" in said.err and ("not a notebook" in said.err or "source is 5" in said.err), said


def test_check_reads_ipython_syntax_and_says_what_it_could_not_read(tmp_path, capsys):
    """A cell under ``%%time``, a line ending in ``?`` or a syntax error was skipped without a
    word, and a file that is no Python at all was "plain Capsule code" (w52)."""
    task = '@cpsl.task(retry_delay="1s")\ndef sync():\n    pass'
    notebook = _notebook(tmp_path / "magics.ipynb", f"%%time\n{task}", f"sync.submit?\nfiles = !ls\nsync.__doc__  # really?\n{task}",
                         "%%bash\necho not python", f'print("unclosed"\n{task}')
    assert main(["check", str(notebook)]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"cell (\d+), line (\d+): @cpsl", out) == [("1", "2"), ("2", "4")]
    assert "cell 4 was not checked: it is not Python (line 1: '(' was never closed)" in out
    assert "cell 3" not in out  # (a bash cell: nothing to port)

    broken = _notebook(tmp_path / "broken.ipynb", "import asyncio", f'print("unclosed"\n{task}')
    assert main(["check", str(broken)]) == 2
    out = capsys.readouterr().out
    assert "plain Capsule code" not in out and "cell 2 was not checked" in out
    script = tmp_path / "broken.py"
    script.write_text(f"{task}\ndef half(:\n")
    assert main(["check", str(script)]) == 2
    assert capsys.readouterr().out == f"{script}: not checked: it is not Python (line 4: invalid syntax)\n"
    assert main(["check", "--json", str(broken), str(script)]) == 2
    assert [(r["python"], r["not_checked"], r["extensions"]) for r in json.loads(capsys.readouterr().out)] == [
        (True, [{"cell": 2, "why": "line 1: '(' was never closed"}], []),
        (False, [{"cell": 1, "why": "line 4: invalid syntax"}], [])]


# ========================================================== in a real kernel


@pytest.fixture(scope="module")
def nb(tmp_path_factory: pytest.TempPathFactory):
    with loaded_kernel(tmp_path_factory, "compat", "%load_ext capsule_nb\nimport asyncio\nimport capsule_nb as cpsl") as k:
        yield k


def shown(cell: Cell) -> list[tuple[str | None, str]]:
    """``(display id, text/plain)`` of each new output under the cell."""
    return [(m["content"].get("transient", {}).get("display_id"), m["content"]["data"].get("text/plain", ""))
            for m in cell.messages if m["msg_type"] == "display_data"]


def redrawn(cell: Cell) -> list[tuple[str | None, str]]:
    """``(display id, text/plain)`` of each in-place update sent with the cell as parent."""
    return [(m["content"]["transient"]["display_id"], m["content"]["data"].get("text/plain", ""))
            for m in cell.messages if m["msg_type"] == "update_display_data"]


def final_text(cell: Cell, display_id: str | None) -> str | None:
    """What the output ``display_id`` shows after the updates that have landed (None: no such output)."""
    texts = [text for i, text in shown(cell) + redrawn(cell) if i == display_id]
    return texts[-1] if texts else None


def test_apps_runs_on_the_magics_and_board_in_a_kernel(nb: Kernel):
    nb.run(
        """
        image = cpsl.Image(python_packages=["httpx"])
        app = cpsl.App(name="my-app", image=image)

        @app.task(retries=2, timeout=300)
        async def sync_threads(owner_id: str):
            return {"synced": 25, "owner_id": owner_id}
        """
    )
    nb.run("handle = await sync_threads.submit(owner_id=session.user.owner_id)\n"
           "await session.show_task(handle, message='Sync started')")
    task_id = nb.value("handle.task_id")
    wait_on_disk(nb, task_id, {"completed"})
    board = "\n".join(nb.run("%tasks").displays)
    assert "sync_threads" in board and task_id in board
    assert "sync_threads" in "\n".join(nb.run("cpsl.ui.TaskBoard(title='Background work')").results)
    assert "sync_threads" not in "\n".join(nb.run("cpsl.ui.TaskBoard(filter={'app': 'default'})").results)
    summary = nb.run("%capsule").stdout
    assert "app 'my-app': 1 runs" in summary and "app 'default'" in summary


STORY_TASK = """
async def words(text):
    for word in text.split(" "):
        yield word + " "
        await asyncio.sleep(0.02)

go = asyncio.Event()

@app.task(timeout=60)
async def tell_story(session: cpsl.Session | None = None):
    await go.wait()
    if session is not None:
        await session.notify("writing…")
    await session.stream(words("Once upon a time there was a notebook"))
    async with session.stream_reply() as out:
        for part in ["The ", "end", "."]:
            out.write(part)
            await asyncio.sleep(0.02)
    await session.notify("done")
    return "told"
"""


def test_a_stream_grows_one_output_in_place_while_another_cell_runs(nb: Kernel):
    nb.run("app = cpsl.App(name='chat-app', image=cpsl.Image())\n" + STORY_TASK)
    submitting = nb.run("handle = await tell_story.submit(session=session)")
    busy = nb.run("go.set()\nwhile await handle.status() not in ('completed', 'failed', 'timeout'):\n"
                  "    await asyncio.sleep(0.02)\nprint(await handle.status())")
    assert busy.stdout == "completed\n" and busy.displays == [] and redrawn(busy) == []
    nb.wait_for(lambda: len(shown(submitting)) == 3 and final_text(submitting, shown(submitting)[-1][0]) == "The end.",
                10, "the last chunk")
    nb.wait_for(lambda: final_text(submitting, shown(submitting)[1][0]) == "Once upon a time there was a notebook ",
                10, "the whole story")
    outputs = shown(submitting)
    assert [text for _, text in outputs] == ["[notify] writing…", "Once ", "The "]  # three outputs, no more
    notice, story, ending = (display_id for display_id, _ in outputs)
    assert len({notice, story, ending}) == 3 and None not in (notice, story, ending)
    assert final_text(submitting, story) == "Once upon a time there was a notebook "
    assert final_text(submitting, ending) == "The end."
    assert final_text(submitting, notice) == "[notify] done"  # the second notification replaced the first
    assert 1 <= len([i for i, _ in redrawn(submitting) if i == story]) <= 7  # at most one per chunk after the first

    def is_update(m: dict[str, Any]) -> bool:
        return m["msg_type"] == "update_display_data"

    def idle(m: dict[str, Any]) -> bool:
        return m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"

    assert submitting.index(idle) < submitting.index(is_update) < busy.index(idle)  # while the other cell ran
    record = nb.value("handle.snapshot()['messages']")
    assert [(m["kind"], m["text"]) for m in record] == [
        ("notify", "writing…"), ("stream", "Once upon a time there was a notebook "), ("stream", "The end."),
        ("notify", "done")]


CRUNCH_TASK = """
@app.task(process=True, timeout=300)
async def crunch_embeddings(session: cpsl.Session | None = None, batch_id: str = ""):
    async with session.stream_reply() as out:
        for part in range(3):
            out.write(f"batch {batch_id} part {part}; ")
    return batch_id
"""


def test_a_stream_from_a_process_run_and_from_a_cell_grows_in_place(nb: Kernel):
    nb.run("app = cpsl.App(name='batch-app')\n" + CRUNCH_TASK)
    submitting = nb.run("handle = await crunch_embeddings.submit(session=session, batch_id='b1')")
    assert nb.value("await handle.wait(60)") == "completed"
    whole = "batch b1 part 0; batch b1 part 1; batch b1 part 2; "
    nb.wait_for(lambda: shown(submitting) and final_text(submitting, shown(submitting)[0][0]) == whole, 10, whole)
    ((display_id, first),) = shown(submitting)
    assert first == "batch b1 part 0; " and display_id is not None and redrawn(submitting)

    cell = nb.run(
        """
        async def words(text):
            for word in text.split(" "):
                yield word + " "

        await session.notify("one")
        await session.notify("two")
        await session.stream(words("streamed from a cell"))
        """
    )
    (notice, one), (story, streamed) = shown(cell)
    assert (one, streamed) == ("[notify] one", "streamed ")
    nb.wait_for(lambda: final_text(cell, story) == "streamed from a cell ", 10, "the cell's whole stream")
    assert final_text(cell, notice) == "[notify] two"

    burst = nb.run("with session.stream_reply() as out:\n    for i in range(2000):\n        out.write(f'{i} ')")
    whole = "".join(f"{i} " for i in range(2000))
    nb.wait_for(lambda: final_text(burst, shown(burst)[0][0]) == whole, 10, "the burst's whole text")
    assert len(shown(burst)) == 1 and len(redrawn(burst)) <= 10  # coalesced: not 1,999 ever longer messages

    # A long token stream (60,000 chunks, 360,000 characters) ends whole, in one output. (How fast:
    # benchmarks/bench_output.py; joining the whole text at every write took seconds.)
    tokens = nb.run("with session.stream_reply() as out:\n"
                    "    for i in range(60_000):\n        out.write(f'tok{i % 10} ')", timeout=120)
    assert final_text(tokens, shown(tokens)[0][0]) == "".join(f"tok{i % 10} " for i in range(60_000))


def test_an_executed_notebook_keeps_each_streams_whole_text(tmp_path):
    """nbclient (nbconvert --execute, papermill) keeps what a cell shows by the time it is idle: a stream's
    last chunk must be drawn before the awaited stream (or the run streaming it) ends, not by a timer."""
    path = _notebook(
        tmp_path / "streams.ipynb",
        "%load_ext capsule_nb\nimport asyncio\nimport capsule_nb as cpsl\napp = cpsl.App(name='stream-app')",
        """
        async with session.stream_reply() as out:
            for word in ["and ", "a second ", "one"]:
                out.write(word)
        """,
        """
        @app.task(timeout=60)
        async def tell(session: cpsl.Session | None = None):
            await session.stream(["Once ", "upon ", "a time"])
            return "told"
        """,
        CRUNCH_TASK,
        """
        print(await tell.submit(session=session).result())
        print(await crunch_embeddings.submit(session=session, batch_id="b1").result())
        """,
    )
    executed = run_notebook(path, tmp_path / "store", cwd=tmp_path, timeout=120)
    shows = [[o.data["text/plain"] for o in cell.outputs if o.output_type == "display_data"] for cell in executed.cells]
    assert shows[1] == ["and a second one"]
    assert shows[4] == ["Once upon a time", "batch b1 part 0; batch b1 part 1; batch b1 part 2; "]


def test_show_task_inside_a_task_shows_the_card_only(nb: Kernel):
    nb.run(
        """
        app = cpsl.App(name="mail-app")
        threads = app.collection("threads")

        @app.task(retries=2, timeout=300, lock="mailbox:sync")
        async def sync_threads(session: cpsl.Session | None = None):
            if session:
                await session.notify("Syncing mailbox...")
            await threads.insert_one(
                {
                    "subject": "Renewal review",
                    "sender": "ops@example.com",
                    "status": "needs-review",
                    "priority": "high",
                }
            )
            return {"synced": 1}

        @app.task()
        async def handle_sync(session: cpsl.Session | None = None):
            handle = await sync_threads.submit(session=session)
            await session.show_task(handle, message="Mailbox sync started")
            return handle.task_id
        """
    )
    submitting = nb.run("outer = await handle_sync.submit(session=session)")
    child = nb.value("await outer.result(30)")
    wait_on_disk(nb, child, {"completed"})
    nb.wait_for(lambda: any("Syncing mailbox" in text for text in submitting.displays), 10, "the notification")
    texts = submitting.displays
    cards = [text for text in texts if text.startswith("Mailbox sync started [")]
    assert len(cards) == 1 and child in cards[0]
    assert not [t for t in texts if child in t and t not in cards]  # no bare run id above the card
    markdown = [m["content"]["data"].get("text/markdown") for m in submitting.messages
                if m["msg_type"] == "display_data"]
    assert child not in markdown
    missing = nb.run("await session.show_task('no-such-id')", allow_error=True)
    assert missing.error["ename"] == "KeyError" and "no-such-id" in missing.error["evalue"]
    assert str(nb.home) in missing.error["evalue"]


def test_show_task_from_a_process_run_draws_the_card_a_thread_run_draws(nb: Kernel):
    nb.run(
        """
        app = cpsl.App(name="process-cards")

        @app.task(retries=2, timeout=300)
        async def sync_threads():
            return {"synced": 1}

        async def announce(sync_id: str, session: cpsl.Session | None = None):
            await session.show_task(sync_id, message="Mailbox sync started")
            await cpsl.current_session().show_task(sync_id, message="Still syncing")
            return sync_id

        in_thread = app.task(name="in_thread")(announce)
        in_process = app.task(name="in_process", process=True)(announce)
        sync = await sync_threads.submit()
        await sync.wait(30)
        """
    )
    sync_id = nb.value("sync.task_id")

    def cards_under(cell: Cell) -> list[dict[str, Any]]:
        outputs = [m["content"]["data"] for m in cell.messages if m["msg_type"] == "display_data"]
        return [data for data in outputs if data.get("text/plain", "").startswith(("Mailbox sync started [",
                                                                                 "Still syncing ["))]

    drawn = {}
    for task in ("in_thread", "in_process"):
        cell = nb.run(f"h = await {task}.submit(sync.task_id, session=session)")
        assert nb.value("await h.wait(60)") == "completed"
        nb.wait_for(lambda: len(cards_under(cell)) == 2, 10, f"the two cards of {task}")
        drawn[task] = [{k: re.sub(r"\(as of [^;]*;", "(as of …;", v) for k, v in card.items() if k != WIDGET_VIEW}
                       for card in cards_under(cell)]  # (drawn a second apart, the text says so)
        assert all(WIDGET_VIEW in card for card in cards_under(cell))  # live cards, not text
        assert [(m["kind"], m["text"]) for m in nb.value("h.snapshot()['messages']")] == [("show_task", sync_id)] * 2
    assert drawn["in_process"] == drawn["in_thread"]
    assert [card["text/plain"].split(" [")[0] for card in drawn["in_process"]] == ["Mailbox sync started",
                                                                                   "Still syncing"]
    assert all(sync_id in card["text/plain"] for card in drawn["in_process"])

    # An unknown id fails a thread run; a worker has moved on by the time the parent looks it up,
    # so a process run keeps the same error in its log.
    nb.run("h = await in_thread.submit('no-such-id', session=session)")
    assert nb.value("await h.wait(60)") == "failed"
    error = nb.value("h.snapshot()['error']")
    assert error.startswith("KeyError: ") and "no-such-id" in error and str(nb.home) in error
    nb.run("h = await in_process.submit('no-such-id', session=session)")
    assert nb.value("await h.wait(60)") == "completed"
    assert [(m["kind"], m["text"]) for m in nb.value("h.snapshot()['messages']")] == [("log", error)] * 2


def test_the_tasks_page_shows_in_a_cell(nb: Kernel):
    nb.run("app = cpsl.App(name='page-app')\n" + D4_TASK)
    cell = nb.run(
        """
        @app.page("Tasks", icon="list-check")
        def tasks_page():
            return cpsl.ui.Page([cpsl.ui.TaskBoard(title="Tasks"), cpsl.ui.Divider(),
                                 cpsl.ui.TaskBoard(title="Reports", filter={"task_name": "build_report"})])

        tasks_page()
        """
    )
    (result,) = [m["content"]["data"] for m in cell.messages if m["msg_type"] == "execute_result"]
    assert WIDGET_VIEW in result
    text = result["text/plain"]
    assert text.index("Tasks") < text.index("─" * 10) < text.index("Reports")


def test_portable_mode_from_the_magic(nb: Kernel):
    assert "portable mode on" in nb.run("%capsule portable on").stdout
    try:
        cell = nb.run("@cpsl.task(process=True)\ndef crunch(n):\n    return n * n\n\nh = crunch.submit(3)")
        again = nb.run("h2 = crunch.submit(4)")
    finally:
        assert "portable mode off" in nb.run("%capsule portable off").stdout
    warned = cell.stream("stderr")
    assert "PortabilityWarning" in warned
    assert EXTENSIONS["process_cell"][1] in warned and EXTENSIONS["positional"][1] in warned
    assert again.stream("stderr") == ""
    assert "usage: %capsule" in nb.run("%capsule portable maybe").stdout
    for _ in range(2):  # asked alone, it says which it is, and changes nothing
        assert nb.run("%capsule portable").stdout.strip() == "portable mode off"


# ----------------------------------------------------------- 9: docs as pasted


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_doc_python_blocks_run_as_pasted(doc, tmp_path):
    blocks = python_blocks(REPO / doc)
    assert len(blocks) >= 2
    path = _notebook(tmp_path / "doc.ipynb", *blocks)
    executed = run_notebook(path, tmp_path / "store", cwd=tmp_path, timeout=60)  # raises if a cell does
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for cell in executed.cells for o in cell.outputs)
    assert not [o for cell in executed.cells for o in cell.outputs if o.output_type == "error"]
    if doc == "README.md":
        assert "{'report_id': 'daily', 'rows': 42}" in text
    else:
        assert "42 4" in text and "{'report_id': 'daily', 'ok': True}" in text and "PortabilityWarning" in text
