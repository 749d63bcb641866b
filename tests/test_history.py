"""History costs nothing (issue 14): what the run table answers is what a scan would.

Speed and memory are measured in benchmarks/bench_history.py; these tests
check that the indexed answers (find, count, boards, the CLI, what other
processes learn) are the same as going through every record, and that the
change feed stays bounded.
"""

import asyncio
import json
import random
import sqlite3
import time

import pytest

import capsule_nb as cpsl
from capsule_nb.cli import main
from capsule_nb.store import feed
from capsule_nb.store.store import Store
from capsule_nb.ui.board import TaskBoard

from .conftest import until


def _newest(records, n=None):
    ordered = sorted(records, key=lambda r: r["task_id"], reverse=True)
    return ordered if n is None else ordered[:n]


async def test_find_count_board_and_cli_agree_with_every_record(tmp_path, capsys):
    """Two apps, three tasks, sessions, retries that fail: every way of asking gives what
    filtering all the records by hand gives, and counts follow status changes and deletes."""
    alpha, beta = cpsl.App("alpha", home=tmp_path), cpsl.App("beta", home=tmp_path)
    seen = {}
    alpha.store.events.subscribe(lambda r: seen.__setitem__(r["task_id"], r))

    @alpha.task
    async def ingest(n, fail=False):
        if fail:
            raise ValueError(n)
        return n

    @alpha.task
    async def report(n):
        return n

    @beta.task
    async def sync(n, fail=False):
        if fail:
            raise ValueError(n)

    session = cpsl.Session(alpha, id="chat:1")
    rng = random.Random(14)
    handles = []
    for n in range(300):
        kind = rng.choice(["ingest", "report", "sync"])
        if kind == "ingest":
            handles.append(ingest.submit(n, fail=rng.random() < 0.3, session=session if n % 3 == 0 else None))
        elif kind == "report":
            handles.append(report.submit(n))
        else:
            handles.append(sync.submit(n, fail=rng.random() < 0.3))
    await asyncio.gather(*(h.wait() for h in handles))
    alpha.store.delete_runs([h.task_id for h in handles[:20]])  # deletes leave the counts right too
    everything = [r for task_id, r in seen.items() if task_id not in {h.task_id for h in handles[:20]}]

    def expect(**where):
        return [r for r in everything if all(r.get(k) == v for k, v in where.items())]

    for status in ("completed", "failed"):
        mine = expect(app="alpha", task_name="ingest", status=status)
        assert await ingest.count(status=status) == len(mine)
        found = await ingest.find(status=status, limit=7, offset=2)
        assert [h.task_id for h in found] == [r["task_id"] for r in _newest(mine)[2:9]]
        assert await beta.tasks.count(status=status) == len(expect(app="beta", status=status))
    in_session = expect(app="alpha", task_name="ingest", session_id="chat:1")
    assert await ingest.count(session_id=session) == len(in_session)
    assert [h.task_id for h in await ingest.find(session_id="chat:1", limit=0)] == \
        [r["task_id"] for r in _newest(in_session)]
    assert await ingest.count(fail=True) == len([r for r in expect(task_name="ingest")
                                                if r["params"].get("fail") is True])

    assert await ingest.count(fail=False) + await ingest.count(fail=True) == len(expect(task_name="ingest"))
    for n in (3, 3.0, "3", 299, -1):  # as Python compares them: 3 finds 3.0, "3" finds nothing
        wanted = [r for r in expect(task_name="ingest") if r["params"]["n"] == n]
        assert [h.task_id for h in await ingest.find(n=n, limit=0)] == [r["task_id"] for r in _newest(wanted)]
    assert await ingest.count(n=True) == len([r for r in expect(task_name="ingest") if r["params"]["n"] == 1])
    assert await ingest.count(n=10**30) == 0 and await ingest.count(n=None) == 0

    board = TaskBoard(app=alpha, filter={"app": "beta"}, page_size=5)
    lanes = {lane["label"]: lane for lane in board.lanes}
    assert board.total == len(expect(app="beta"))
    assert lanes["Failed"]["count"] == len(expect(app="beta", status="failed"))
    assert [c["task_id"] for c in lanes["Completed"]["cards"]] == \
        [r["task_id"] for r in _newest(expect(app="beta", status="completed"), 5)]
    assert board.choices["app"] == ["alpha", "beta"]
    assert board.choices["task_name"] == ["ingest", "report", "sync"]
    assert board.choices["session_id"] == ["chat:1"]
    board.close()

    assert main(["--home", str(tmp_path), "--json", "tasks", "--status", "failed", "--limit", "10"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["task_id"] for r in listed] == [r["task_id"] for r in _newest(expect(status="failed"), 10)]
    alpha.close()
    beta.close()


def test_counts_kept_by_triggers_match_the_rows(tmp_path):
    """Whatever wrote the rows, the counts beside the table are the rows' own counts."""
    app = cpsl.App(home=tmp_path, executor="immediate")

    @app.task
    def job(n):
        if n % 4 == 0:
            raise ValueError(n)

    for n in range(40):
        job.submit(n)
    app.store.flush()
    with sqlite3.connect(tmp_path / "db" / "cache.db") as db:
        real = dict(db.execute("SELECT status, count(*) FROM capsule_runs GROUP BY status").fetchall())
        kept = dict(db.execute("SELECT status, sum(n) FROM capsule_run_counts GROUP BY status HAVING sum(n) > 0").fetchall())
    db.close()
    assert real == kept == {"completed": 30, "failed": 10}
    app.close()


async def test_a_fan_out_of_thousands_reaches_the_disk_whole(tmp_path):
    """A burst bigger than one statement's rows, written in one batch: every record lands,
    exactly once, as another process reads it."""
    app = cpsl.App(home=tmp_path)

    @app.task
    async def item(n):
        return n

    handles = [item.submit(n) for n in range(3001)]
    assert await asyncio.gather(*(h.result(timeout=30) for h in handles)) == list(range(3001))
    app.store.flush()
    with sqlite3.connect(tmp_path / "db" / "cache.db") as db:
        rows = db.execute("SELECT status, record FROM capsule_runs").fetchall()
    db.close()
    assert len(rows) == 3001 and {status for status, _ in rows} == {"completed"}
    assert sorted(json.loads(record)["result"] for _, record in rows) == list(range(3001))
    app.close()


def test_records_lacking_optional_fields_or_beyond_orjson_are_written_with_the_right_columns(tmp_path):
    """The writer reads a batch's columns with C code alone, but a record an older build or
    another tool wrote may lack any optional field (a finished one without ``completed_at``
    is aged by its ``created_at``), and one may hold an integer beyond 64 bits, which orjson
    refuses: beside whole records, each row still gets its own columns and its exact text."""
    base = {"app": "a", "task_name": "t", "attempt": 1, "max_attempts": 1}
    records = [
        dict(base, task_id="0001", status="completed", created_at=100.0),
        dict(base, task_id="0002", status="pending", created_at=101.5),
        dict(base, task_id="0003", status="failed", created_at=102.0, completed_at=103.25, session_id="s",
             scheduled_for=99.5, result=2**70),
        dict(base, task_id="0004", status="running", created_at=104.0, completed_at=None, session_id=None,
             scheduled_for=None),
    ]
    store = Store(tmp_path)
    for record in records:
        store.put_run(record)
    store.flush()
    store.close()
    with sqlite3.connect(tmp_path / "db" / "cache.db") as db:
        rows = db.execute("SELECT task_id, status, session_id, scheduled_for, finished_at, record "
                          "FROM capsule_runs ORDER BY task_id").fetchall()
    db.close()
    assert [row[:5] for row in rows] == [("0001", "completed", None, None, 100.0),
                                         ("0002", "pending", None, None, None),
                                         ("0003", "failed", "s", 99.5, 103.25),
                                         ("0004", "running", None, None, None)]
    assert [json.loads(row[5]) for row in rows] == records
    reopened = Store(tmp_path)
    assert [reopened.get_run(r["task_id"]) for r in records] == records
    reopened.close()


def test_the_change_feed_keeps_a_bounded_window(tmp_path):
    store = Store(tmp_path)
    try:
        for n in range(feed.KEEP + 3 * feed.PRUNE_EVERY):
            store.set(f"sched/x/{n % 3}", {"n": n})  # any plain write...
            store.request_cancel(f"run{n}")  # ...and one that is announced on the feed
        with sqlite3.connect(tmp_path / "db" / "cache.db") as db:
            (entries,) = db.execute("SELECT count(*) FROM Cache WHERE key LIKE 'chg/%'").fetchone()
        db.close()
        assert feed.KEEP <= entries <= feed.KEEP + feed.PRUNE_EVERY
    finally:
        store.close()


async def test_a_process_that_fell_behind_the_feed_still_hears_that_a_run_ended(tmp_path):
    """A reader further behind than the feed keeps reloads what is live, and publishes the
    runs that ended meanwhile: a waiter on another process's run is not left waiting."""
    app = cpsl.App(home=tmp_path)
    gate = asyncio.Event()

    @app.task
    async def held():
        await gate.wait()

    handle = await held.submit()
    await until(lambda: handle.snapshot()["status"] == "running")
    behind = Store(tmp_path)  # a second process's view of the store
    try:
        assert [r["task_id"] for r in behind.unfinished_runs()] == [handle.task_id]
        ended = []
        behind.events.subscribe(lambda r: ended.append(r["status"]), task_id=handle.task_id)
        gate.set()
        assert await handle.result() is None
        app.store.flush()  # on disk before the feed moves on (the result is known before it is written)
        for n in range(feed.KEEP + 2 * feed.PRUNE_EVERY):  # the feed moves on past what `behind` saw
            app.store.request_cancel(f"nobody{n}")
        behind.poll()
        assert ended == ["completed"] and behind.unfinished_runs() == []
    finally:
        behind.close()
        app.close()


def test_a_prune_with_nothing_to_prune_leaves_the_store_flushing(tmp_path, capsys):
    """Retention runs every minute in every process, mostly with nothing to do: that must
    not leave a write behind that never comes (every flush after it would stall 30 s)."""
    app = cpsl.App(home=tmp_path)
    try:
        assert app.store.prune(app.name, keep=10) == 0
        app.store.flush(timeout=5)  # a TimeoutError here was the stall
        assert main(["--home", str(tmp_path), "prune", "--older-than", "1d"]) == 0
        assert "pruned 0 finished runs" in capsys.readouterr().out
    finally:
        app.close()


def test_a_prune_by_age_of_one_app_deletes_that_apps_old_runs(tmp_path):
    """``Store.prune(app, before=...)``: the age test and the app test each get their own
    value (the SQL's parameters were once bound in the wrong order, and nothing matched)."""
    alpha, beta = (cpsl.App(name, home=tmp_path, executor="immediate") for name in ("alpha", "beta"))
    try:
        for app in (alpha, beta):
            app.task(lambda: None, name="job").submit()
        alpha.store.flush()
        cutoff = time.time() + 60  # both runs finished before it
        assert alpha.store.prune("alpha", before=cutoff) == 1
        assert [r["app"] for r in alpha.store.runs()] == ["beta"]
    finally:
        alpha.close()
        beta.close()


def test_bad_statuses_are_refused_by_queries_and_boards(tmp_path):
    app = cpsl.App(home=tmp_path, executor="immediate")

    @app.task
    def job():
        return 1

    for bad in (["failed", "completed"], "bogus"):
        with pytest.raises(ValueError, match="unknown status"):
            job.count(status=bad)
    with pytest.raises(ValueError, match="bogus"):
        TaskBoard(app=app, filter={"status": ["failed", "bogus"]})
    app.close()
