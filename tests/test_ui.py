"""The widget models without a browser: state, coalescing, actions, filters, caps, lifecycle.

Messages to the front end are counted where they leave a widget: its comm.
``CountingComm`` stands in for the kernel's comm, so each ``comm.send`` is
one message a browser would get. Actions travel the real path, the widget's
``_handle_msg``, as a frontend ``custom`` message would.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import threading
import time

import ipywidgets
import pytest

import capsule_nb as cpsl
from capsule_nb import ui
from capsule_nb.record import new_task_id
from capsule_nb.ui import assets, views
from capsule_nb.ui.live import LiveWidget

from .conftest import until, until_sync

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class CountingComm:
    """A comm that keeps what a widget sends instead of sending it."""

    def __init__(self, comm_id: str):
        self.comm_id = comm_id
        self.kernel = object()  # ipywidgets only sends through a comm with a kernel
        self.sent: list[dict] = []
        self.closed = False

    def send(self, data=None, metadata=None, buffers=None):
        self.sent.append(data)

    def on_msg(self, callback):
        pass

    def close(self, *args, **kwargs):
        self.closed = True

    @property
    def updates(self) -> list[dict]:
        return [m["state"] for m in self.sent if m.get("method") == "update"]


def counting(widget: LiveWidget) -> CountingComm:
    widget.comm = CountingComm(widget.comm.comm_id)
    return widget.comm


def from_view(widget: LiveWidget, content: dict) -> None:
    """What a click in the browser arrives as: a ``custom`` comm message."""
    widget._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def view_sets(widget: LiveWidget, **state) -> None:
    """What ``model.set(...); model.save_changes()`` in the browser arrives as."""
    widget._handle_msg({"content": {"data": {"method": "update", "state": state, "buffer_paths": []}},
                        "buffers": []})


def lane(board: ui.TaskBoard, label: str) -> dict:
    return next(x for x in board.lanes if x["label"] == label)


def counts(board: ui.TaskBoard) -> dict[str, int]:
    return {x["label"]: x["count"] for x in board.lanes}


# ----------------------------------------------------------------------- card


async def test_a_card_follows_its_run_to_the_result(app):
    gate = asyncio.Event()

    @app.task(retries=2)
    async def build(report_id: str, session=None):
        await session.notify(f"Building {report_id}", detail="3 sections")
        session.progress(1, 3, "fetched")
        print("fetched rows")
        await gate.wait()
        session.log("writing")
        return {"report_id": report_id, "rows": 42}

    handle = build.submit("daily", display_name="Daily build")
    card = ui.TaskCard(handle, message="Daily report")
    await until(lambda: card.run.get("status") == "running" and card.run.get("progress"))
    assert card.title == "Daily report" and card.task_id == handle.task_id
    assert card.run["display_name"] == "Daily build"  # (the view shows it under the title: test_browser)
    assert repr(card).startswith("Daily report · Daily build [running]")
    assert card.run["progress"] == {"done": 1, "total": 3, "message": "fetched"}
    assert (card.run["attempt"], card.run["max_attempts"]) == (1, 3)
    assert card.run["can_cancel"] and not card.run["can_retry"]
    assert card.messages[0]["kind"] == "notify" and card.messages[0]["detail"] == "3 sections"

    gate.set()
    await handle.wait(5)
    await until(lambda: card.run["status"] == "completed")
    assert card.run["result_repr"] == "{'report_id': 'daily', 'rows': 42}"
    assert card.output == [{"stream": "stdout", "text": "fetched rows\n"}]
    assert [m["kind"] for m in card.messages] == ["notify", "log"]
    assert not card.run["can_cancel"] and not card.run["can_retry"]
    assert card.clock > 0  # the view's clocks count from the kernel's time
    card.close()


@pytest.mark.parametrize("widget", ["card", "board"])
async def test_a_run_ending_while_its_widget_is_made_is_shown_ended(app, monkeypatch, widget):
    """``show_task(t.submit())`` of a fast run: the widget reads the run, then opens its
    comm and subscribes. A run that ended in that gap left its card "pending" for good."""
    gate = threading.Event()

    @app.task
    def quick():
        gate.wait(10)
        return 1

    handle = quick.submit()
    made = {"card": ui.TaskCard, "board": ui.TaskBoard}[widget]
    subscribe = made._subscribe

    def status(shown):
        if widget == "card":
            return shown.run["status"]
        return {c["task_id"]: c["status"] for lane in shown.lanes for c in lane["cards"]}.get(handle.task_id)

    first = []

    def late(self):  # the run ends between the first read and the subscription
        first.append(status(self))
        gate.set()
        until_sync(lambda: handle.snapshot()["status"] == "completed")
        subscribe(self)

    monkeypatch.setattr(made, "_subscribe", late)
    shown = ui.TaskCard(handle) if widget == "card" else ui.TaskBoard(app=app)
    await until(lambda: status(shown) == "completed")
    assert first[0] in ("pending", "running") and status(shown) == "completed"  # drawn unfinished, then told
    shown.close()


async def test_a_failed_card_has_the_error_the_traceback_and_retry(app):
    @app.task
    async def parse(url):
        raise ValueError(f"{url} returned malformed XML")

    handle = parse.submit("https://example.com/feed")
    await handle.wait(5)
    card = ui.TaskCard(handle)
    assert card.run["error"] == "ValueError: https://example.com/feed returned malformed XML"
    assert "Traceback" in card.run["traceback"] and "malformed XML" in card.run["traceback"]
    assert card.run["can_retry"] and not card.run["can_cancel"] and card.run["result_repr"] is None
    card.close()


def test_a_card_carries_only_the_tail_of_long_output():
    record = {"output": [{"stream": "stdout", "text": "x" * 50_000}, {"stream": "stderr", "text": "end\n"}]}
    tail = views.output(record)
    assert sum(len(c["text"]) for c in tail) == views.OUTPUT_SHOWN
    assert tail[-1] == {"stream": "stderr", "text": "end\n"} and tail[0]["text"].startswith("…")


# ----------------------------------------------------------------- coalescing


async def test_a_burst_of_5000_completions_is_a_few_messages_per_widget(app):
    """5,000 thread runs finish as fast as the pool can go; each widget sends at most
    one message per ``FLUSH_SECONDS`` (plus the first, at once) and ends exact."""

    @app.task
    def tick(i: int) -> int:
        return i

    first = tick.submit(-1)
    await first.wait(5)
    board = ui.TaskBoard(app=app, filter={"task_name": "tick"})
    card = ui.TaskCard(first)
    board_comm, card_comm = counting(board), counting(card)
    events = []
    unsubscribe = app.store.events.subscribe(events.append)

    started = time.monotonic()
    handles = await asyncio.to_thread(lambda: [tick.submit(i) for i in range(5000)])
    await until(lambda: app.tasks.count(status="completed") == 5001, timeout=60)
    await until(lambda: lane(board, "Completed")["count"] == 5001, timeout=5)
    elapsed = time.monotonic() - started
    unsubscribe()

    allowed = elapsed / LiveWidget.FLUSH_SECONDS + 2
    sent = len(board_comm.sent)
    print(f"\n{len(events)} store events in {elapsed:.2f}s -> {sent} board messages "
          f"({len(events) / max(sent, 1):.0f} events per message), {len(card_comm.sent)} card messages")
    assert len(events) >= 15_000  # pending, running, completed for each run
    assert 1 <= sent <= allowed, (sent, elapsed)
    assert card_comm.sent == []  # nothing happened to the card's own run
    last = {}
    for state in board_comm.updates:
        last.update(state)
    assert {x["label"]: x["count"] for x in last["lanes"]}["Completed"] == 5001  # the last state got out
    assert len(lane(board, "Completed")["cards"]) == board.page_size
    assert lane(board, "Completed")["cards"][0]["task_id"] == handles[-1].task_id  # newest first
    board.close()
    card.close()


async def test_the_first_change_after_a_quiet_spell_goes_out_at_once(app):
    gate = threading.Event()

    @app.task
    def waiting():
        gate.wait(10)
        return "done"

    handle = waiting.submit()
    card = ui.TaskCard(handle)
    await until(lambda: card.run["status"] == "running")
    comm = counting(card)
    await asyncio.sleep(LiveWidget.FLUSH_SECONDS * 2)
    gate.set()
    started = time.monotonic()
    await until(lambda: comm.updates and comm.updates[-1].get("run", {}).get("status") == "completed")
    assert time.monotonic() - started < LiveWidget.FLUSH_SECONDS  # not held back for the rate cap
    card.close()


async def test_an_unchanged_state_sends_nothing(app):
    @app.task
    async def quick():
        return 1

    handle = quick.submit()
    await handle.wait(5)
    board = ui.TaskBoard(app=app)
    comm = counting(board)
    board._changed()
    await asyncio.sleep(LiveWidget.FLUSH_SECONDS * 2)
    assert comm.sent == []
    board.close()


# -------------------------------------------------------------------- actions


async def test_cancel_from_the_card_and_from_another_thread(app):
    @app.task
    async def forever():
        await asyncio.sleep(3600)

    one, two = forever.submit(), forever.submit()
    card = ui.TaskCard(one)
    board = ui.TaskBoard(app=app)
    await until(lambda: one.snapshot()["status"] == "running" and two.snapshot()["status"] == "running")

    from_view(card, {"action": "cancel", "task_id": one.task_id})
    assert await one.wait(5) == "cancelled"
    await until(lambda: card.run["status"] == "cancelled" and card.run["can_retry"])

    # a kernel with subshells may run the comm handler on another thread
    thread = threading.Thread(target=from_view, args=(board, {"action": "cancel", "task_id": two.task_id}))
    thread.start()
    thread.join()
    assert await two.wait(5) == "cancelled"
    await until(lambda: lane(board, "Failed")["count"] == 2)
    assert board.notice == ""

    # A click heard late (its kernel ran a cell) finds its run cancelled through the store
    # meanwhile (js/live.js unheard): nothing went wrong, and nothing is said.
    heard = []
    board.send = lambda content, buffers=None: heard.append(content)  # what goes back to the view
    from_view(board, {"action": "cancel", "task_id": two.task_id})
    assert heard == [{"heard": two.task_id}]  # at once: the view files no cancel of its own
    await asyncio.sleep(0)  # the click acted on (it goes to the loop)
    assert board.notice == ""

    @app.task
    async def quick():
        return 1

    done = quick.submit()
    assert await done.wait(5) == "completed"
    from_view(board, {"action": "cancel", "task_id": done.task_id})
    await until(lambda: board.notice == f"run {done.task_id} had already finished")
    card.close()
    board.close()


async def test_a_thread_run_blocked_in_a_call_shows_it_is_stopping_until_the_call_returns(app):
    """A cancel stops a thread run between two Python steps: one blocked in a call runs on
    until the call returns. Meanwhile its card and the board say it is stopping, offer no
    Cancel, and a second click says nothing false (it said "already finished")."""
    gate = threading.Event()

    @app.task
    def fetch():
        gate.wait()  # one blocking call

    handle = fetch.submit()
    card, board = ui.TaskCard(handle), ui.TaskBoard(app=app)
    await until(lambda: card.run["status"] == "running" and card.run["can_cancel"])

    from_view(card, {"action": "cancel", "task_id": handle.task_id})
    await until(lambda: card.run["stopping"] == "cancel" and not card.run["can_cancel"])
    assert handle.snapshot()["status"] == "running"
    assert repr(card).startswith("fetch [running, stopping]")  # the text (terminal, CLI) says so too
    await until(lambda: [c["stopping"] for c in lane(board, "Running")["cards"]] == ["cancel"])
    board._act("cancel", handle.task_id)  # a second click, on the board (what its message handler calls)
    assert board.notice == card.notice == ""
    assert await handle.cancel() is True

    gate.set()
    assert await handle.wait(5) == "cancelled"
    await until(lambda: card.run["status"] == "cancelled" and card.run["stopping"] is None)
    assert handle.snapshot().get("stopping") is None  # the record, which other readers see, says it has stopped
    card.close()
    board.close()


async def test_a_card_or_board_shown_where_it_cannot_be_drawn_says_when_its_text_was_made(app):
    """An untrusted notebook, GitHub or nbconvert shows a view's text instead, made once as
    the output was shown: it says when, and that the live view needs its kernel."""
    @app.task
    async def nap():
        await asyncio.sleep(3600)

    handle = nap.submit()
    await until(lambda: handle.snapshot()["status"] == "running")
    card = ui.TaskCard(handle, message="Nap card")
    page = ui.Page([ui.TaskBoard(app=app, title="Naps")])
    today = time.strftime("(as of %Y-%m-%d ")
    for view, first in ((card, "Nap card [running]"), (page, "Naps")):
        bundle = view._repr_mimebundle_()
        text = (bundle[0] if isinstance(bundle, tuple) else bundle)["text/plain"]
        assert text.startswith(first) and today in text.splitlines()[-1] and "kernel" in text.splitlines()[-1]
    card.close()
    page.close()


async def test_cancel_on_a_board_stops_runs_another_process_owns(tmp_path):
    """Cancel clicked on a board for another process's async, thread and process runs, one at
    a time, while three idle processes share the store: each stops, and the board shows it."""
    from .reliability.test_cancel_across_processes import IDLE, OWNER
    from .test_durability import lines_until, spawn

    owner = spawn(OWNER, tmp_path, PIDS=str(tmp_path / "pids"))
    idle = [spawn(IDLE, tmp_path) for _ in range(3)]
    app = cpsl.App(home=tmp_path)
    board = ui.TaskBoard(app=app)
    try:
        for proc in idle:
            lines_until(proc, "ready")
        ids = lines_until(owner, "running", timeout=60)[0].split()
        await until(lambda: lane(board, "Running")["count"] == 3)
        assert all(card["can_cancel"] for card in lane(board, "Running")["cards"])
        for n, task_id in enumerate(ids, 1):
            from_view(board, {"action": "cancel", "task_id": task_id})
            assert await app.get_task(task_id).wait(10) == "cancelled"
            await until(lambda n=n: lane(board, "Failed")["count"] == n)
        lines_until(owner, "stopped")  # the owner stopped its own runs
        assert lane(board, "Running")["count"] == 0 and board.notice == ""
    finally:
        board.close()
        app.close()
        for proc in [owner, *idle]:
            proc.kill()
            proc.wait(10)


async def test_retry_resubmits_and_the_card_follows_the_new_run(app):
    attempts = []

    @app.task
    async def flaky(n: int):
        attempts.append(n)
        if len(attempts) == 1:
            raise RuntimeError("first time fails")
        return n * 2

    failed = flaky.submit(21)
    assert await failed.wait(5) == "failed"
    card = ui.TaskCard(failed)
    board = ui.TaskBoard(app=app)
    view_sets(board, selected=failed.task_id)
    await until(lambda: board.detail.get("task_id") == failed.task_id)

    from_view(card, {"action": "retry", "task_id": failed.task_id})
    await until(lambda: card.task_id != failed.task_id and card.run.get("status") == "completed")
    assert card.run["result_repr"] == "42" and attempts == [21, 21]
    assert failed.snapshot()["status"] == "failed"  # the old run stays as it was

    from_view(board, {"action": "retry", "task_id": failed.task_id})
    await until(lambda: counts(board)["Completed"] == 2)
    assert board.selected != failed.task_id and board.detail["run"]["task_name"] == "flaky"
    card.close()
    board.close()


async def test_retry_of_a_task_this_kernel_does_not_define_says_why(app):
    @app.task
    async def gone():
        raise RuntimeError("no")

    handle = gone.submit()
    await handle.wait(5)
    app._tasks.pop("gone")
    card = ui.TaskCard(handle)
    from_view(card, {"action": "retry", "task_id": handle.task_id})
    await until(lambda: "not defined in this kernel" in card.notice)
    from_view(card, {"action": "format the disk", "task_id": handle.task_id})  # ignored
    from_view(card, "not even a dict")
    assert app.tasks.count() == 1 and card.task_id == handle.task_id  # no new run, same card
    card.close()


# ------------------------------------------------------------ board: filters


def put_runs(app, n: int, *, task_name="job", status="completed", session_id=None) -> list[str]:
    """Records written straight into the store, as if runs had happened."""
    ids = []
    now = time.time()
    for _ in range(n):
        task_id = new_task_id()
        ids.append(task_id)
        app.store.put_run({
            "task_id": task_id, "app": app.name, "task_name": task_name, "display_name": None,
            "status": status, "attempt": 1, "max_attempts": 1, "created_at": now, "started_at": now,
            "completed_at": now if status in ("completed", "failed", "cancelled", "timeout") else None,
            "session_id": session_id, "messages": [], "output": [], "progress": None,
            "error": "boom" if status == "failed" else None, "result_repr": "1" if status == "completed" else None,
        })
    return ids


async def test_board_columns_counts_and_filters(app):
    put_runs(app, 3, task_name="fetch", status="completed", session_id="s1")
    put_runs(app, 2, task_name="fetch", status="failed", session_id="s2")
    put_runs(app, 1, task_name="parse", status="running")
    put_runs(app, 1, task_name="parse", status="retry")
    put_runs(app, 1, task_name="parse", status="scheduled")
    other = cpsl.App("other", home=app.home)  # another app on the same store: on the board, unless filtered
    put_runs(other, 4, task_name="elsewhere")

    def board_of(**options):
        made = ui.TaskBoard(app=app, **options)
        boards.append(made)
        return made

    boards = []
    everything = board_of()
    assert counts(everything) == {"Pending": 2, "Running": 1, "Completed": 7, "Failed": 2}
    assert everything.choices["app"] == ["default", "other"]
    assert counts(board_of(filter={"app": "other"})) == {"Pending": 0, "Running": 0, "Completed": 4, "Failed": 0}
    board = board_of(filter={"app": "default"})
    assert counts(board) == {"Pending": 2, "Running": 1, "Completed": 3, "Failed": 2}
    assert board.total == 8
    assert board.choices["task_name"] == ["elsewhere", "fetch", "parse"] and board.choices["session_id"] == ["s1", "s2"]
    assert board.choices["status"][:4] == ["pending", "claimed", "scheduled", "retry"]
    assert counts(board_of(filter={"app": "default", "task_name": "parse"})) == {
        "Pending": 2, "Running": 1, "Completed": 0, "Failed": 0}
    assert counts(board_of(filter={"task_name": "parse"})) == {"Pending": 2, "Running": 1, "Completed": 0, "Failed": 0}
    assert counts(board_of(filter={"session_id": "s2"}))["Failed"] == 2
    assert board_of(filter={"status": "retry"}).total == 1
    assert board_of(filter={"status": ["retry", "running"]}).total == 2
    custom = board_of(title="Fetches", columns=[ui.TaskBoardColumn("Done", ["completed", "failed"])])
    assert [(x["label"], x["count"]) for x in custom.lanes] == [("Done", 9)] and custom.title == "Fetches"
    assert custom.total == 9  # the runs its columns hold, not the 3 waiting and running it has no column for (w58)

    view_sets(board, filter={"task_name": "fetch", "status": ""})  # a menu back on "all" drops its key
    await until(lambda: board.total == 5)
    assert board.filter == {"task_name": "fetch"}
    other.close()
    with pytest.raises(ValueError, match="filter keys"):
        ui.TaskBoard(app=app, filter={"owner": "me"})
    with pytest.raises(ValueError, match="unknown status"):
        ui.TaskBoardColumn("Odd", ["sleeping"])
    with pytest.raises(ValueError, match="refresh_ms"):
        ui.TaskBoard(app=app, refresh_ms=0)
    for made in boards:
        made.close()


async def test_a_column_shows_the_newest_cards_up_to_its_cap_and_shows_more(app):
    ids = put_runs(app, 120)
    board = ui.TaskBoard(app=app, page_size=50)
    done = lane(board, "Completed")
    assert done["count"] == 120 and len(done["cards"]) == 50 and done["limit"] == 50
    assert [c["task_id"] for c in done["cards"]] == sorted(ids, reverse=True)[:50]

    view_sets(board, limits={"Completed": 100})  # "show more", twice
    await until(lambda: len(lane(board, "Completed")["cards"]) == 100)
    assert len(json.dumps(board.lanes)) < 60_000  # what one update of this board weighs
    board.close()


async def test_board_cards_of_one_task_are_told_apart_and_the_view_knows_its_store(app):
    gate = asyncio.Event()

    @app.task
    async def fetch(url, session=None):
        await session.notify(f"fetching {url}")
        session.log("a log line does not tell runs apart")
        if url == "c":
            session.progress(1, 2, "half of c")
            await gate.wait()

    first, second, third = fetch.submit("a"), fetch.submit("b"), fetch.submit("c")
    await first.wait(5)
    await second.wait(5)
    board = ui.TaskBoard(app=app)
    await until(lambda: lane(board, "Running")["cards"] and lane(board, "Running")["cards"][0]["said"])
    done = lane(board, "Completed")["cards"]
    assert [c["said"] for c in done] == ["fetching b", "fetching a"]
    assert lane(board, "Running")["cards"][0]["said"] == "half of c"  # its progress message comes first
    assert all(c["created_at"] <= c["started_at"] for c in done)
    assert board.source == {"home": str(app.home), "app": app.name}  # where a view without its kernel asks
    gate.set()
    await third.wait(5)
    board.close()


async def test_the_details_pane_follows_the_selected_run(app):
    gate = asyncio.Event()

    @app.task
    async def step(session=None):
        session.progress(1, 2)
        await gate.wait()
        session.reply("second half")
        return "ok"

    handle = step.submit()
    board = ui.TaskBoard(app=app)
    await until(lambda: counts(board)["Running"] == 1)
    assert lane(board, "Running")["cards"][0]["progress"] == 0.5
    view_sets(board, selected=handle.task_id)
    await until(lambda: board.detail.get("run", {}).get("status") == "running")
    gate.set()
    await until(lambda: board.detail["run"]["status"] == "completed")
    assert board.detail["messages"][-1]["text"] == "second half" and board.detail["title"] == "step"
    # Left open on a run the filter then leaves out, the details close; back, they open again.
    # A status filter does not close them: a run's status moves on while the reader reads.
    view_sets(board, filter={"task_name": "step", "status": "failed"})
    await until(lambda: board.filter.get("status") == "failed")
    await until(lambda: board.detail.get("task_id") == handle.task_id)
    view_sets(board, filter={"task_name": "other"})
    await until(lambda: board.detail == {} and board.selected == "")
    view_sets(board, filter={})  # back: the run's details stay closed (w50: they came back)
    await until(lambda: lane(board, "Completed")["count"] == 1)
    assert board.detail == {} and board.selected == ""
    board.close()


async def test_a_board_over_10000_runs_updates_in_milliseconds(app):
    put_runs(app, 7000, status="completed")
    put_runs(app, 3000, status="failed")
    board = ui.TaskBoard(app=app)
    started = time.perf_counter()
    for _ in range(10):
        board._state()
    per_update = (time.perf_counter() - started) / 10
    assert per_update < 0.1, per_update  # what a flush costs the kernel's loop
    assert len(json.dumps(board.get_state())) < 200_000  # what the browser gets
    board.close()


def test_changes_from_another_process_arrive_within_refresh_ms(app, tmp_path):
    board = ui.TaskBoard(app=app, refresh_ms=200)
    code = textwrap.dedent(f"""
        import capsule_nb as cpsl
        app = cpsl.App(home={str(app.home)!r})
        @app.task
        def elsewhere():
            return "from another kernel"
        import asyncio
        asyncio.run(elsewhere.submit().wait(30))
        app.close()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    written = time.monotonic()
    while counts(board)["Completed"] != 1:
        assert time.monotonic() - written < 0.2 + 1.0, "not on the board within refresh_ms (+ slack)"
        time.sleep(0.01)
    assert lane(board, "Completed")["cards"][0]["title"] == "elsewhere"
    board.close()


# ------------------------------------------------------------------ lifecycle


def live_timers(loop) -> int:
    return sum(1 for handle in loop._scheduled if not handle.cancelled())


async def test_500_cards_created_and_closed_leave_nothing_behind(app):
    @app.task
    async def small(i):
        return i

    handles = [small.submit(i) for i in range(500)]
    for handle in handles:
        await handle.wait(5)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.05)
    threads, timers = set(threading.enumerate()), live_timers(loop)
    widgets = len(ipywidgets.widgets.widget._instances)
    listeners = app.store.events._all  # the app's own (its handles learn how their runs ended)

    cards = [ui.TaskCard(h) for h in handles]
    board = ui.TaskBoard(app=app)
    await asyncio.sleep(0.05)
    assert len(app.store.events._by_run) == 500 and live_timers(loop) >= timers + 501
    assert not set(threading.enumerate()) - threads  # no thread per widget (another may have ended)
    for widget in [*cards, board]:
        widget.close()
    await asyncio.sleep(0.05)

    assert app.store.events._all == listeners and dict(app.store.events._by_run) == {}
    assert live_timers(loop) == timers
    assert all(not w._timers and w.comm is None and w._closed for w in [*cards, board])
    assert len(ipywidgets.widgets.widget._instances) == widgets
    assert not set(threading.enumerate()) - threads


async def test_a_view_drawn_anew_gets_the_kernels_clock_now_not_the_last_states(app):
    """A view counts a running run's clock from the kernel's time in ``clock``: after a
    reload it got the last state's, minutes old when the run had said nothing since, and
    its clock started again near 0. A view that says it is shown is sent the time now."""
    @app.task
    async def quiet():
        await asyncio.sleep(3600)

    handle = quiet.submit()
    await until(lambda: handle.snapshot()["status"] == "running")
    card = ui.TaskCard(handle)
    await until(lambda: card.run["status"] == "running")
    sent = counting(card)
    card.clock -= 300  # as though the last state went out five minutes ago
    before = len(sent.updates)
    from_view(card, {"view": "shown"})
    await until(lambda: any("clock" in u for u in sent.updates[before:]))
    assert abs(card.clock - time.time()) < 5
    handle.cancel()
    card.close()


async def test_a_widget_nobody_sees_any_more_closes(app, monkeypatch):
    monkeypatch.setattr(LiveWidget, "UNSEEN_SECONDS", 0.05)

    @app.task
    async def seen():
        return 1

    card = ui.TaskCard(seen.submit())
    assert card._view_count is None  # ipywidgets' counting (a sync from every removed view) stays off
    from_view(card, {"view": "shown"})  # a view was displayed
    from_view(card, {"view": "hidden"})  # ... and its cell cleared
    from_view(card, {"view": "shown"})  # re-rendered within the grace period: stays
    await asyncio.sleep(0.1)
    assert not card._closed
    from_view(card, {"view": "hidden"})
    await until(lambda: card._closed)
    assert dict(app.store.events._by_run) == {}


async def test_show_task_inside_a_run_without_a_cell_closes_its_card(app):
    @app.task
    async def child():
        return 1

    @app.task
    async def parent(session):
        await session.show_task(child.submit())

    listeners = app.store.events._all  # the app's own (its handles learn how their runs ended)
    await parent.submit().wait(5)
    assert dict(app.store.events._by_run) == {} and app.store.events._all == listeners


# ------------------------------------------------------------ text and assets


async def test_text_forms_and_the_widget_bundle(app, capsys):
    @app.task
    async def report():
        return {"rows": 42}

    handle = report.submit()
    await handle.wait(5)
    card, board = ui.TaskCard(handle, message="Nightly report"), ui.TaskBoard(app=app, title="Reports")
    text = repr(card)
    assert text.startswith("Nightly report [completed]") and "result: {'rows': 42}" in text
    assert repr(board).startswith("Reports\nPending (0)") and handle.task_id in repr(board)
    data, _ = card._repr_mimebundle_()
    assert data["text/plain"].startswith(text + "\n(as of ") and data[WIDGET_VIEW]["model_id"] == card.model_id

    state = board.get_state()  # what a saved notebook keeps: it redraws without a kernel
    json.dumps(state)
    assert "export default" in state["_esm"] and state["lanes"][2]["cards"][0]["title"] == "report"
    card.close()
    board.close()

    shown = ui.TaskCard(handle)
    ui.display(shown)  # no kernel here: the text, once, and the widget is closed
    assert "report [completed]" in capsys.readouterr().out and shown._closed


async def test_a_handle_as_text_says_when_and_never_fails_once_its_run_is_pruned(app):
    """Outside a kernel a handle shows as text: what its run was doing, and when that was.
    A run not started yet says so (not "attempt 0/1"), one waiting for a retry has no clock
    counting on, and a run retention pruned showed as a KeyError that failed the cell (w46)."""
    from IPython.lib.pretty import pretty

    from capsule_nb.ui.text import table_text

    @app.task(retries=1, retry_delay=60)
    def flaky():
        raise OSError("try again")

    later, retried = flaky.schedule(delay="1h"), flaky.submit()
    await until(lambda: retried.snapshot()["status"] == "retry")
    assert later._repr_mimebundle_() is None  # no kernel: IPython uses the text
    text = pretty(later)
    assert text.startswith("flaky [scheduled]") and "not started  elapsed -  starts 20" in text  # (w46: no due time)
    assert "attempt 0" not in text
    assert re.search(r"\n\(as of \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+\)$", text), text
    assert "attempt 1/2  elapsed -" in pretty(retried)
    table = table_text([retried.snapshot(), later.snapshot()])  # (the CLI's; its clock ran on: w46)
    row = next(line for line in table.splitlines() if line.startswith(retried.task_id))
    assert row.split()[2:5] == ["retry", "1/2", "-"], table
    listed = pretty([later, retried])  # each its one line in a list, and no "(as of …)" after each
    assert listed == f"[<TaskHandle flaky {later.task_id} scheduled>,\n <TaskHandle flaky {retried.task_id} retry>]"
    app.store.delete_runs([later.task_id])
    assert pretty(later) == f"<TaskHandle {later.task_id} (not in store)>"


def test_modules_link_their_sibling_imports_and_css_uses_theme_variables():
    board = assets.esm("task_board.js")
    assert './task_card.js"' not in board and 'from "data:text/javascript,' in board
    assert "./live.js" not in board and board.count("export function liveView(") == 1  # live.js once, via the card
    assert assets.js_dir().name == "js"
    for module in assets.js_dir().glob("*.js"):  # what lets esm() drop comments and indentation line by line
        assert all(line.count("`") % 2 == 0 for line in module.read_text().splitlines()), module
    lines = assets.esm("task_card.js").splitlines()
    assert not [x for x in lines if x.startswith(("//", "/*", " ")) or not x]  # no comment line, no indentation
    css = assets.css()
    named = r"(?<![-\w])(?:white|black|red|green|blue|gray|grey)(?![-\w])"
    colors = re.findall(r"#[0-9a-fA-F]{3,8}\b|\b(?:rgba?|hsla?)\(|" + named, css)
    assert colors == [], colors  # colors come from JupyterLab's CSS variables only
    assert "var(--jp-error-color1" in css and "var(--jp-success-color1" in css


async def test_the_card_of_a_repeating_run_follows_its_series_and_its_cancel_stops_it(app):
    """``session.show_task(t.schedule("every 1s"))``: the card shows each next run, never
    "completed" while the series goes on; its Cancel stops the series; a card made later
    of the first run shows where the series is."""
    from capsule_nb.record import FINISHED

    ticks = []

    @app.task
    async def tick():
        ticks.append(time.monotonic())

    first = tick.schedule("every 1s")
    card = ui.TaskCard(first)
    assert card.run["every"] == 1 and card.run["status"] == "scheduled"
    await until(lambda: len(ticks) >= 2 and card.task_id not in (first.task_id, "")
                and card.run["status"] == "scheduled", timeout=20)
    assert first.snapshot()["status"] == "completed" and card.run["can_cancel"]

    from_view(card, {"action": "cancel", "task_id": card.task_id})
    await until(lambda: card.run["status"] == "cancelled")
    assert [r["status"] for r in app.store.runs({"task_name": "tick"}) if r["status"] not in FINISHED] == []
    again = ui.TaskCard(first)
    assert again.task_id == card.task_id and again.run["status"] == "cancelled"
    card.close()
    again.close()


async def test_a_board_and_a_card_say_when_their_store_can_no_longer_be_written(app):
    """The store's database deleted under the kernel (a reset): the kernel's log line went under a
    cell long finished, and its boards and cards went on as if nothing had happened (w60)."""
    import shutil

    @app.task
    def job() -> int:
        return 1

    handle = job.submit()
    await handle.wait(10)
    board, card = ui.TaskBoard(app=app, refresh_ms=100), ui.TaskCard(handle, refresh_ms=100)
    try:
        assert board.notice == card.notice == ""
        shutil.rmtree(app.store.path / "db")
        await until(lambda: board.notice.startswith("Not saved: the database of the capsule_nb store")
                    and card.notice == board.notice)
        assert "restart this kernel" in board.notice
    finally:
        board.close()
        card.close()
