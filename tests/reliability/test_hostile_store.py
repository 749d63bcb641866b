"""A store that was tampered with, corrupted or shared too widely (issue 17).

Each test reproduces one way in which a store, a callback server or a
caller was hostile or unlucky, and checks that capsule_nb refuses what is
unsafe, sets aside what is broken, and keeps working. Rows "written behind
our back" go in with sqlite3 or a plain diskcache Cache, as another program
would write them. The tests hold as root (CI): loose modes are made with
os.chmod, links with os.symlink, and ownership compares st_uid with getuid.
"""

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import pickle
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import diskcache
import pytest
from diskcache.core import MODE_BINARY, MODE_RAW, MODE_TEXT

import capsule_nb as cpsl
from capsule_nb.cli import main
from capsule_nb.errors import StoreError
from capsule_nb.record import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_MESSAGES_CHARS, new_record, new_task_id
from capsule_nb.store.store import Store

from ..conftest import record_on_disk, until, until_sync


# ------------------------------------------------------------------ helpers


def good_store(home, runs=1):
    """A store holding ``runs`` completed runs, written by capsule_nb itself; returns their ids."""
    store = Store(home)
    now = time.time()
    ids = []
    for n in range(runs):
        ids.append(new_task_id())
        store.put_run(new_record(task_id=ids[-1], app="default", task_name="job", status="completed",
                                 attempt=1, max_attempts=1, created_at=now, started_at=now, completed_at=now,
                                 updated_at=now, owner="gone", result=n, result_kind="json", result_repr=str(n)))
    store.flush()
    store.close()
    return ids


def raw_row(home, key, value, *, mode=MODE_RAW, filename=None, raw=1):
    """Write one row as another program would: straight into SQLite, no capsule_nb code."""
    now = time.time()
    with sqlite3.connect(home / "db" / "cache.db", timeout=30) as db:
        db.execute("INSERT OR REPLACE INTO Cache (key, raw, store_time, expire_time, access_time, access_count, "
                   "tag, size, mode, filename, value) VALUES (?, ?, ?, NULL, ?, 0, NULL, 0, ?, ?, ?)",
                   (key, raw, now, now, mode, filename, value))
    db.close()


def table_row(home, task_id, text, **columns):
    """Write one row of the run table as another program would (sqlite3, no capsule_nb code):
    ``text`` as its record, its columns as the record says (or as given)."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    record = record if type(record) is dict else {}
    row = {"app": record.get("app", "default"), "task_name": record.get("task_name", "job"),
           "status": record.get("status", "completed"), "session_id": record.get("session_id"),
           "scheduled_for": None, "finished_at": None, **columns}
    with sqlite3.connect(home / "db" / "cache.db", timeout=30) as db:
        db.execute("INSERT INTO capsule_runs (task_id, app, task_name, status, session_id, scheduled_for, "
                   "finished_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
                   "app = excluded.app, task_name = excluded.task_name, status = excluded.status, "
                   "session_id = excluded.session_id, record = excluded.record",  # (so the triggers count it)
                   (task_id, *row.values(), text))
    db.close()


def record_json(task_id, **changes):
    now = time.time()
    record = new_record(task_id=task_id, app="default", task_name="job", status="completed", attempt=1,
                        max_attempts=1, created_at=now, started_at=now, completed_at=now, updated_at=now)
    return json.dumps({**record, **changes})


def a_run_completes(app):
    """A task of ``app`` whose run has just completed: the store takes and keeps runs."""
    @app.task
    def job() -> int:
        return 1

    assert asyncio.run(job.submit().result(timeout=10)) == 1
    return job


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def warnings_naming(caplog, key):
    return [r for r in caplog.records if r.levelno == logging.WARNING and repr(key) in r.getMessage()]


# ---------------------------------------------- 1. a loose store folder or key


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_folder_others_can_write_is_refused_with_the_fix(tmp_path, mode):
    home = tmp_path / "store"
    good_store(home)
    os.chmod(home, mode)
    with pytest.raises(StoreError) as refused:
        cpsl.App(home=home)
    assert str(home) in str(refused.value) and f"chmod 700 {home}" in str(refused.value)
    assert stat.S_IMODE(os.stat(home).st_mode) == mode  # refused, not silently changed


def test_a_co_user_key_and_signed_pickle_in_a_loose_folder_never_run(tmp_path):
    """The attack of the issue: a co-user who can write the folder plants their own key and
    a pickle signed with it as a run's result. The store is refused before anything loads."""
    import hashlib
    import hmac

    home = tmp_path / "store"
    (task_id,) = good_store(home)
    os.chmod(home, 0o777)
    marker = tmp_path / "pwned"
    theirs = os.urandom(32)
    (home / "secret.key").unlink()
    (home / "secret.key").write_bytes(theirs)
    os.chmod(home / "secret.key", 0o600)
    blob = pickle.dumps(type("Boom", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})())
    raw_row(home, f"payload/{task_id}/result", hmac.new(theirs, blob, hashlib.sha256).digest() + blob)
    raw_row(home, f"run/{task_id}", record_json(task_id, result_kind="payload"))
    with pytest.raises(StoreError, match="writable by other users"):
        cpsl.App(home=home)
    assert not marker.exists()


def test_a_folder_others_can_only_read_is_made_private_and_says_so(tmp_path, caplog):
    home = tmp_path / "store"
    (task_id,) = good_store(home)
    os.chmod(home, 0o755)  # what `mkdir` makes under umask 022
    app = cpsl.App(home=home)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert any("made it private" in r.getMessage() and str(home) in r.getMessage() for r in caplog.records)
    assert app.get_task(task_id).snapshot()["status"] == "completed"


@pytest.mark.parametrize("mode, says", [(0o644, "readable by other users"), (0o640, "readable by other users"),
                                        (0o622, "writable by other users")])
def test_a_key_others_can_read_or_write_is_refused(tmp_path, mode, says):
    home = tmp_path / "store"
    good_store(home)
    os.chmod(home / "secret.key", mode)
    with pytest.raises(StoreError, match=says) as refused:
        cpsl.App(home=home)
    assert str(home / "secret.key") in str(refused.value)


def test_a_symlinked_key_is_refused_even_a_dangling_one(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    elsewhere = tmp_path / "their.key"
    elsewhere.write_bytes(os.urandom(32))
    os.chmod(elsewhere, 0o600)
    (home / "secret.key").unlink()
    os.symlink(elsewhere, home / "secret.key")
    with pytest.raises(StoreError, match="is a symbolic link") as refused:
        cpsl.App(home=home)
    assert str(elsewhere) in str(refused.value)
    elsewhere.unlink()  # now the link dangles: still a clear StoreError, not FileNotFoundError
    with pytest.raises(StoreError, match="does not exist") as refused:
        cpsl.App(home=home)
    assert str(home / "secret.key") in str(refused.value) and "rm " in str(refused.value)
    assert os.path.islink(home / "secret.key")  # never replaced behind the user's back


def test_a_key_that_is_not_a_regular_file_is_refused(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    (home / "secret.key").unlink()
    (home / "secret.key").mkdir(mode=0o700)
    with pytest.raises(StoreError, match="not a regular file"):
        cpsl.App(home=home)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_folder_or_key_of_another_user_is_refused(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    os.chown(home / "secret.key", 4321, 4321)
    with pytest.raises(StoreError, match="belongs to user id 4321"):
        cpsl.App(home=home)
    os.chown(home / "secret.key", os.getuid(), os.getgid())
    os.chown(home, 4321, 4321)
    with pytest.raises(StoreError, match=f"{home} belongs to user id 4321"):
        cpsl.App(home=home)


def test_the_cli_refuses_a_loose_store_with_exit_2_and_one_line(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    os.chmod(home, 0o777)
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "--home", str(home), "tasks"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "writable by other users" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------ 2. value files outside the store


def test_a_row_naming_a_file_outside_the_store_is_never_read(tmp_path, caplog, capsys):
    home = tmp_path / "store"
    good_store(home)
    victim = tmp_path / "victim" / "private.json"
    victim.parent.mkdir()
    task_id = new_task_id()
    victim.write_text(record_json(task_id, result_repr="the victim's secret"))
    raw_row(home, f"run/{task_id}", None, mode=MODE_TEXT, filename=str(victim))
    app = cpsl.App(home=home)
    assert app.get_task(task_id) is None
    assert warnings_naming(caplog, f"run/{task_id}") and "outside the store" in caplog.text
    code, out, err = cli(capsys, "--home", str(home), "show", task_id)
    assert code == 2 and "damaged" in err and "secret" not in out + err
    relative = os.path.relpath(victim, home / "db")  # "../../victim/private.json"
    raw_row(home, f"run/{task_id}", None, mode=MODE_TEXT, filename=relative)
    assert doctor_rows(home) == [(f"run/{task_id}", True)]


def doctor_rows(home):
    from capsule_nb.store import doctor

    return [(row.key, "outside the store" in row.problem) for row in doctor.examine(home)]


def test_prune_and_doctor_never_delete_a_file_outside_the_store(tmp_path, capsys):
    """A finished run whose payload row names a file outside: ``prune`` deletes the run and its
    rows, and diskcache would remove the named file and its empty parent folders."""
    home = tmp_path / "store"
    first, second = good_store(home, runs=2)
    victim = tmp_path / "victim" / "deep" / "keep.bin"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"important")
    raw_row(home, f"payload/{first}/result", None, mode=MODE_BINARY, filename=str(victim))
    raw_row(home, f"payload/{second}/result", None, mode=MODE_BINARY, filename="../../victim/deep/keep.bin")
    app = cpsl.App(home=home)
    with pytest.raises(StoreError, match="outside the store"):
        app.store.get_payload(first, "result")  # what result() of a payload run reads
    code, out, _ = cli(capsys, "--home", str(home), "prune", "--older-than", "0s")
    assert code == 0 and "pruned 2" in out
    assert victim.read_bytes() == b"important"
    assert app.store.get(f"payload/{first}/result") is None  # the rows are gone, the file is not
    raw_row(home, "payload/x/result", None, mode=MODE_BINARY, filename=str(victim))
    code, out, _ = cli(capsys, "--home", str(home), "doctor", "--fix")
    assert code == 0 and "moved 1" in out and victim.read_bytes() == b"important"


def test_big_values_still_live_in_files_inside_the_store(app):
    """The confinement keeps diskcache's own value files working: a big payload is a file (a big
    run record is a row of the run table, read back whole)."""
    from fractions import Fraction

    @app.task
    def big():
        print("x" * 100_000)
        return [Fraction(1, 3)] * 20_000

    handle = big.submit()
    until_sync(lambda: handle.snapshot()["status"] == "completed")
    app.store.flush()
    (value_file,) = (app.home / "db").rglob("*.val")  # diskcache kept the payload as a file
    assert value_file.stat().st_size > 20_000
    assert record_on_disk(app.home, handle.task_id)["output"][0]["text"].startswith("x" * 1000)
    reopened = Store(app.home)  # what another process reads: the table's row, the payload's file
    try:
        assert reopened.get_run(handle.task_id)["output"][0]["text"].startswith("x" * 1000)
        assert reopened.get_payload(handle.task_id, "result")[0] == Fraction(1, 3)
    finally:
        reopened.close()


# --------------------------------------------------- 3. malformed rows


BAD_RUNS = {
    "no status": lambda k: json.dumps({k: v for k, v in json.loads(record_json(k)).items() if k != "status"}),
    "no task_id": lambda k: json.dumps({f: v for f, v in json.loads(record_json(k)).items() if f != "task_id"}),
    "a list": lambda k: json.dumps([1, 2, 3]),
    "broken JSON": lambda k: '{"task_id": "' + k + '", "status": ',
    "status 5": lambda k: record_json(k, status=5),
    "started yesterday": lambda k: record_json(k, started_at="yesterday"),
    # adopted, a repeat this fast would make a run per millisecond for ever; at 0, end in an error
    "repeats every ms": lambda k: record_json(k, status="scheduled", every=0.001, series=k),
    "repeats every 0 s": lambda k: record_json(k, status="scheduled", every=0, series=k),
}


# A run row whose columns say otherwise than its record: found by the wrong filters, counted wrong.
LYING_COLUMNS = {
    "its status column lies": {"status": "failed"},
    "its app column lies": {"app": "other"},
    "its session column lies": {"session_id": "s-elsewhere"},
}
WHERE_BAD_RUNS_ARE = [("an old-layout row", what) for what in sorted(BAD_RUNS)] + [
    ("a row of the run table", what) for what in [*sorted(BAD_RUNS), *LYING_COLUMNS]]


def plant_bad_run(home, where, what):
    """A bad run: a diskcache row ``run/<id>`` of a store made before the run table (the
    migration at open skips it and leaves it for doctor), or a row of the table itself."""
    bad = new_task_id()
    if where == "an old-layout row":
        raw_row(home, f"run/{bad}", BAD_RUNS[what](bad))
    elif what in LYING_COLUMNS:
        table_row(home, bad, record_json(bad), **LYING_COLUMNS[what])
    else:
        table_row(home, bad, BAD_RUNS[what](bad))
    return bad


@pytest.mark.parametrize("where, what", WHERE_BAD_RUNS_ARE)
def test_a_malformed_run_row_is_skipped_with_one_warning_and_doctor_moves_it(tmp_path, caplog, capsys, where, what):
    home = tmp_path / "store"
    (good,) = good_store(home)
    bad = plant_bad_run(home, where, what)
    if where == "a row of the run table":
        with contextlib.closing(sqlite3.connect(home / "db" / "cache.db")) as db:
            planted = db.execute("SELECT * FROM capsule_runs WHERE task_id = ?", (bad,)).fetchone()
    app = cpsl.App(home=home)
    for _ in range(3):
        app.store.poll()
        assert [r["task_id"] for r in app.store.runs()] == [good]
    assert app.get_task(bad) is None
    assert len(warnings_naming(caplog, f"run/{bad}")) == 1
    code, out, _ = cli(capsys, "--home", str(home), "--json", "tasks")
    assert code == 0 and [r["task_id"] for r in json.loads(out)] == [good]
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and f"run/{bad}" in out and "--fix" in out
    if what in LYING_COLUMNS:
        assert f"its {next(iter(LYING_COLUMNS[what]))} column says" in out
    code, out, _ = cli(capsys, "--home", str(home), "doctor", "--fix")
    assert code == 0 and "moved 1" in out and "counted" not in out
    with sqlite3.connect(home / "quarantine.db") as kept:
        if where == "an old-layout row":
            assert kept.execute("SELECT key FROM moved").fetchall() == [(f"run/{bad}",)]
        else:  # the whole row, unchanged
            assert kept.execute("SELECT * FROM moved_runs").fetchall()[0][3:] == planted
    assert cli(capsys, "--home", str(home), "doctor")[0] == 0  # the counts are right without the row
    assert stat.S_IMODE(os.stat(home / "quarantine.db").st_mode) & 0o077 == 0
    assert [r["task_id"] for r in app.store.runs()] == [good] and app.store.count_runs() == 1


def test_a_pickled_key_and_a_pickled_row_are_listed_and_moved(tmp_path, capsys):
    home = tmp_path / "store"
    good_store(home)
    raw_row(home, pickle.dumps(("run/x",)), json.dumps({}), raw=0)
    raw_row(home, "run/y", pickle.dumps({"task_id": "y"}), mode=4)
    code, out, _ = cli(capsys, "--home", str(home), "--json", "doctor")
    listed = json.loads(out)
    assert code == 1 and {r["key"] for r in listed} == {"<pickled key, row %d>" % listed[0]["row"], "run/y"}
    assert cli(capsys, "--home", str(home), "doctor", "--fix")[0] == 0
    assert cli(capsys, "--home", str(home), "doctor")[0] == 0


def foreign_writer(home):
    """Another program on the store: diskcache with its default (pickling) disk."""
    return diskcache.Cache(str(home / "db"))


def announce(foreign, keys_json):
    """Append a change-feed entry the way capsule_nb does, its keys given as JSON text."""
    with foreign.transact():
        seq = foreign.incr("seq")
        foreign.set(f"chg/{seq:012d}", keys_json)


def test_a_pickled_row_or_entry_in_the_change_feed_never_stops_poll(app, caplog):
    foreign = foreign_writer(app.home)
    evil = new_task_id()
    table_row(app.home, evil, pickle.dumps({"task_id": evil}), status="running")  # a pickle, not a record
    announce(foreign, json.dumps([f"run/{evil}"]))
    for _ in range(3):
        app.store.poll()  # raised on every call, for ever, before
    assert len(warnings_naming(caplog, f"run/{evil}")) == 1
    with foreign.transact():  # an entry that is itself a pickle
        seq = foreign.incr("seq")
        foreign.set(f"chg/{seq:012d}", [f"run/{evil}"])
    app.store.poll()
    later = new_task_id()
    table_row(app.home, later, record_json(later))  # a good row, written after the bad ones
    announce(foreign, json.dumps([f"run/{later}"]))
    until_sync(lambda: app.store.poll() is not None and app.get_task(later) is not None)
    assert app.get_task(later).snapshot()["status"] == "completed"
    assert len(warnings_naming(caplog, f"run/{evil}")) == 1
    foreign.close()


def test_every_read_of_a_bad_table_row_skips_it_with_one_warning(tmp_path, caplog):
    """Open (the unfinished runs), get, find and poll all meet the row; one warning names it,
    and nothing raises. (The counts, kept by triggers from the columns, include it until
    `capsule-nb doctor --fix` moves it aside.)"""
    home = tmp_path / "store"
    (good,) = good_store(home)
    bad = new_task_id()
    table_row(home, bad, record_json(bad, status="completed"), status="running")  # its columns lie
    app = cpsl.App(home=home)
    assert len(warnings_naming(caplog, f"run/{bad}")) == 1  # met at open, among the unfinished runs
    assert app.store.unfinished_runs() == []

    @app.task
    def job():
        return 1

    assert app.get_task(bad) is None
    assert [h.task_id for h in job.find()] == [good] and job.find(status="running") == []
    with foreign_writer(home) as foreign:
        announce(foreign, json.dumps([f"run/{bad}"]))
    assert app.store.poll() == [] and app.get_task(bad) is None
    assert len(warnings_naming(caplog, f"run/{bad}")) == 1
    assert "its status column says 'running' but its record says 'completed'" in app.store.problem(f"run/{bad}")


def test_a_run_row_whose_task_id_is_not_text_is_skipped(tmp_path, caplog, capsys):
    home = tmp_path / "store"
    (good,) = good_store(home)
    table_row(home, b"\x00a blob", record_json("x"), status="running")
    store = Store(home)  # its status makes it one of the unfinished runs read at open
    try:
        assert store.unfinished_runs() == [] and [r["task_id"] for r in store.runs()] == [good]
    finally:
        store.close()
    assert len(warnings_naming(caplog, "run/b'\\x00a blob'")) == 1
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and "run/b'\\x00a blob': its task_id is bytes, not text" in out
    code, out, _ = cli(capsys, "--home", str(home), "doctor", "--fix")
    assert code == 0 and "moved 1" in out and cli(capsys, "--home", str(home), "doctor")[0] == 0


@pytest.mark.parametrize("tamper", [
    "UPDATE capsule_run_counts SET n = 99 WHERE status = 'completed'",  # a count that lies
    "DELETE FROM capsule_run_counts WHERE status = 'running'",  # a running run the store would not look for
    "DROP TABLE capsule_run_counts",
])
def test_doctor_finds_run_counts_that_lie_and_fix_counts_again(tmp_path, capsys, tamper):
    home = tmp_path / "store"
    good_store(home, runs=2)
    running = new_task_id()
    table_row(home, running, record_json(running, status="running", completed_at=None))
    with sqlite3.connect(home / "db" / "cache.db") as db:
        db.execute(tamper)
    db.close()
    code, out, _ = cli(capsys, "--home", str(home), "--json", "doctor")
    (listed,) = json.loads(out)
    assert code == 1 and listed["key"] == "capsule_run_counts" and "--fix" in listed["problem"]
    code, out, _ = cli(capsys, "--home", str(home), "doctor", "--fix")
    assert code == 0 and out == f"counted the runs of {home} again: the kept counts were wrong\n"
    assert cli(capsys, "--home", str(home), "doctor")[:2] == (0, f"no bad rows in {home}\n")
    store = Store(home)
    try:
        assert store.run_counts() == {("completed",): 2, ("running",): 1}
        assert [r["task_id"] for r in store.unfinished_runs()] == [running]
    finally:
        store.close()


def test_bad_lock_schedule_and_document_rows_do_not_break_their_users(app, capsys):
    foreign = foreign_writer(app.home)
    foreign.set("lock/report:1", '["not", "a", "lock"]')
    foreign.set("sched/default/tick", '"not a schedule"')
    foreign.close()
    with sqlite3.connect(app.home / "db" / "cache.db") as db:  # documents live in their own table
        db.execute("""INSERT INTO capsule_docs (collection, doc_id, doc) VALUES ('items', 'a', '{"_id": "b"}')""")
    db.close()

    @app.task(lock="report:{n}")
    def report(n):
        return n

    handle = report.submit(1)
    until_sync(lambda: handle.snapshot()["status"] == "completed")
    assert cli(capsys, "--home", str(app.home), "schedules")[:2] == (0, "no schedules\n")
    items = app.collection("items")
    assert items.update_one({"_id": "a"}, {"$set": {"x": 1}}) == {"matched": 0, "modified": 0}
    assert items.insert_one({"_id": "a", "x": 2}).value["x"] == 2  # the bad row is simply replaced


@pytest.mark.parametrize("key, value", [
    ("sqlite_journal_mode", "delete"),  # was: every thread but the opener's locked out
    ("sqlite_synchronous", 0),  # was: commits lost at a power cut
    ("sqlite_query_only", 1),  # was: run as a pragma on every new connection
    ("sqlite_cache_size", 10**6),  # was: a 4 GB page cache per connection
    ("sqlite_foreign_keys", "1; DROP TABLE capsule_runs"),
    ("disk_min_file_size", "many"),
    ("disk_store", 5),  # was: diskcache's Disk.store replaced
    ("_disk", "not a disk"),  # was: the cache's Disk replaced
])
def test_a_settings_row_written_behind_our_back_never_sets_how_the_store_runs(tmp_path, capsys, caplog, key, value):
    """diskcache reads its settings from a table of the database; capsule_nb's own rule.
    The open, the writer, the maintenance pass (which answers a cancel from the CLI) and
    every new thread's connection run as if the row were not there."""
    home = tmp_path / "store"
    (kept,) = good_store(home)
    with sqlite3.connect(home / "db" / "cache.db") as db:
        db.execute("INSERT OR REPLACE INTO Settings (key, value) VALUES (?, ?)", (key, value))
    db.close()
    app = cpsl.App(home=home)
    try:
        @app.task
        async def job(hold):
            if hold:
                await asyncio.sleep(60)
            return ["x"] * 20_000  # its record is big

        stopped, finished = job.submit(True), job.submit(False)
        until_sync(lambda: stopped.snapshot()["status"] == "running")
        assert cli(capsys, "--home", str(home), "cancel", stopped.task_id)[0] == 0  # answered by the upkeep's pass
        until_sync(lambda: stopped.snapshot()["status"] == "cancelled")
        until_sync(lambda: finished.snapshot()["status"] == "completed")
        app.collection("tickets").insert_one({"text": "y" * 100_000})  # a big value: diskcache's Disk
        app.store.flush()
        pragmas = {}

        def connect():  # a thread's first use of the store opens its connection
            pragmas.update((name, app.store._cache._sql(f"PRAGMA {name}").fetchone()[0])
                           for name in ("journal_mode", "synchronous", "query_only", "cache_size", "mmap_size"))

        thread = threading.Thread(target=connect)
        thread.start()
        thread.join()
        assert pragmas == {"journal_mode": "wal", "synchronous": 1, "query_only": 0, "cache_size": 512, "mmap_size": 0}
    finally:
        app.close()
    assert record_on_disk(home, finished.task_id)["status"] == "completed"
    assert record_on_disk(home, kept)["status"] == "completed"
    store = Store(home)
    try:
        assert store.get_run(stopped.task_id)["status"] == "cancelled"
        assert store.run_counts() == {("completed",): 2, ("cancelled",): 1}
    finally:
        store.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------- 4. callbacks


class _Servers:
    """Local HTTP endpoints for callbacks, each stopping by itself after ``lifetime`` seconds."""

    def __init__(self, lifetime=20.0):
        self.lifetime = lifetime
        self.closed_after = []  # seconds a drip connection lasted until the client gave up
        self.posts = []
        self._stop = []

    def fast(self):
        posts = self.posts

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append((time.monotonic(), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        threading.Timer(self.lifetime, server.shutdown).start()
        self._stop.append(server.shutdown)
        return f"http://127.0.0.1:{server.server_port}/hook"

    def slow(self, drip_every=None):
        """Accepts, reads the request, then answers one byte every ``drip_every`` seconds
        (never, if None), until the client closes or its lifetime ends."""
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(self.lifetime)
        ends = time.monotonic() + self.lifetime

        def serve():
            with listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(0.2)
                    request = b""
                    while not _whole_request(request) and time.monotonic() < ends:
                        with contextlib.suppress(socket.timeout):
                            request += conn.recv(65536)
                    start = time.monotonic()
                    answer = iter(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    next_byte = start + (drip_every or self.lifetime)
                    while time.monotonic() < ends:
                        try:
                            if conn.recv(1) == b"":  # the client closed
                                break
                        except socket.timeout:
                            pass
                        except OSError:
                            break
                        if time.monotonic() >= next_byte:
                            next_byte += drip_every
                            try:
                                conn.sendall(bytes([next(answer, 32)]))
                            except OSError:
                                break
                    self.closed_after.append(time.monotonic() - start)

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/slow"

    def close(self):
        for stop in self._stop:
            stop()


def _whole_request(data):
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        return False
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


def test_a_callback_server_dripping_one_byte_every_2s_is_timed_out(app, caplog):
    from capsule_nb.engine.callbacks import TIMEOUT_SECONDS

    servers = _Servers()
    url = servers.slow(drip_every=2.0)

    @app.task(callback_url=url)
    def done():
        return 1

    done.submit()
    until_sync(lambda: servers.closed_after, timeout=TIMEOUT_SECONDS + 10)
    assert servers.closed_after[0] < TIMEOUT_SECONDS + 2  # the whole request, not each read, is bounded
    until_sync(lambda: f"no complete answer within {TIMEOUT_SECONDS:g} s" in caplog.text)
    servers.close()


async def test_a_hung_callback_endpoint_does_not_hold_up_the_others(app):
    servers = _Servers()
    hung, fast = servers.slow(), servers.fast()

    @app.task(callback_url=hung)
    def stuck_hook():
        return 1

    @app.task(callback_url=fast)
    def good_hook(n):
        return n

    stuck_hook.submit()
    await until(lambda: stuck_hook.count(status="completed") == 1)
    sent = time.monotonic()
    handles = [good_hook.submit(n) for n in range(3)]
    await until(lambda: len(servers.posts) == 3, timeout=4)  # the hung one holds its post for 5 s
    assert all(at - sent < 3 for at, _ in servers.posts)
    assert [body["task_id"] for _, body in servers.posts] == [h.task_id for h in handles]  # in order
    await until(lambda: servers.closed_after, timeout=10)  # and the hung one is given up in time
    servers.close()


# ------------------------------------------------------------ 5. sizes


def test_replies_are_capped_per_message_and_per_run_and_the_record_says_so(logic_app):
    @logic_app.task
    def chatty(session):
        for n in range(20):
            session.reply(str(n % 10) * 200_000)  # 20 replies of 200,000 characters

    record = chatty.submit().snapshot()
    kept = record["messages"]
    assert all(m["truncated"] and len(m["text"]) < MAX_MESSAGE_CHARS + 100 for m in kept)
    assert kept[-1]["text"].startswith("9" * MAX_MESSAGE_CHARS) and kept[-1]["text"].endswith(
        "[cut: 136,000 more characters]")
    assert sum(len(m["text"]) for m in kept) <= MAX_MESSAGES_CHARS
    assert record["messages_dropped"] == 20 - len(kept) > 0
    assert len(json.dumps(record)) < MAX_MESSAGES_CHARS * 1.1


def test_the_message_count_cap_still_holds_and_is_counted(logic_app):
    @logic_app.task
    def ticks(session):
        for _ in range(MAX_MESSAGES + 50):
            session.log("tick")

    record = ticks.submit().snapshot()
    assert len(record["messages"]) == MAX_MESSAGES and record["messages_dropped"] == 50


def test_a_streamed_reply_stops_growing_at_the_cap(logic_app):
    @logic_app.task
    def stream(session):
        with session.stream_reply() as out:
            for _ in range(100):
                out.write("y" * 10_000)

    (message,) = stream.submit().snapshot()["messages"]
    assert message["truncated"] and MAX_MESSAGE_CHARS <= len(message["text"]) < MAX_MESSAGE_CHARS + 100


def test_a_document_over_the_size_cap_is_refused_and_nothing_changes(app):
    from capsule_nb.collections import MAX_DOCUMENT_BYTES

    items = app.collection("items")
    with pytest.raises(ValueError, match=f"over the {MAX_DOCUMENT_BYTES:,}-byte cap"):
        items.insert_one({"blob": "x" * MAX_DOCUMENT_BYTES})
    assert items.count() == 0
    items.insert_one({"_id": "a", "blob": "x" * (MAX_DOCUMENT_BYTES // 2)})
    with pytest.raises(ValueError, match="cap on a document"):
        items.update_one({"_id": "a"}, {"$push": {"more": "y" * (MAX_DOCUMENT_BYTES // 2)}})
    assert "more" not in items.find_one({"_id": "a"})


# ------------------------------------------------------ 6. impossible cron


def test_an_impossible_cron_is_refused_at_decoration_and_nothing_is_saved(app, capsys):
    with pytest.raises(ValueError, match=r"bad cron '0 0 30 2 \*': it never fires"):
        @app.schedule("0 0 30 2 *")
        def never():
            pass

    assert app.store.items("sched/") == [] and app.schedules() == []
    assert cli(capsys, "--home", str(app.home), "schedules")[:2] == (0, "no schedules\n")


def test_the_schedules_listing_survives_a_stored_impossible_cron(app, capsys):
    app.store.update_value("sched/default/old", lambda _: {"cron": "0 0 30 2 *", "tz": "Mars/Base",
                                                             "last_due": "yesterday"})
    code, out, _ = cli(capsys, "--home", str(app.home), "schedules")
    assert code == 0 and "old" in out and "bad:" in out
    code, out, _ = cli(capsys, "--home", str(app.home), "--json", "schedules")
    assert code == 0 and json.loads(out)[0]["next"].startswith("bad: bad cron")


# ----------------------------------------------------------- 7. the CLI


def test_the_cli_renders_records_of_wrong_types_and_marks_them(tmp_path, capsys):
    home = tmp_path / "store"
    (good,) = good_store(home)
    five, yesterday = new_task_id(), new_task_id()
    raw_row(home, f"run/{five}", record_json(five, status=5))
    raw_row(home, f"run/{yesterday}", record_json(yesterday, started_at="yesterday", attempt="one"))
    code, out, _ = cli(capsys, "--home", str(home), "tasks")
    assert code == 0 and good in out and five not in out
    code, _, err = cli(capsys, "--home", str(home), "show", five)
    assert code == 2 and "damaged (status 5 is not a known status)" in err
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    table = out[out.index("TASK ID"):]
    assert code == 1 and "?5" in table and "?'one'/1" in table  # shown, and marked
    row = next(line for line in table.splitlines() if line.startswith(yesterday))
    assert row.split()[-1] == "?"  # elapsed of "yesterday" cannot be computed


def test_json_output_does_not_build_the_text_table(app, capsys, monkeypatch):
    import capsule_nb.ui.text

    @app.task
    def job():
        return 1

    handle = job.submit()
    until_sync(lambda: handle.snapshot()["status"] == "completed")

    def refuse(records):
        raise AssertionError("the text table was built for --json")

    monkeypatch.setattr(capsule_nb.ui.text, "table_text", refuse)
    code, out, _ = cli(capsys, "--home", str(app.home), "--json", "tasks")
    assert code == 0 and len(json.loads(out)) == 1


def test_a_corrupt_store_exits_2_with_a_clean_message(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    for name in os.listdir(home / "db"):
        if name.startswith("cache.db-"):
            os.unlink(home / "db" / name)
    (home / "db" / "cache.db").write_bytes(b"this is not a database" * 1000)
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "--home", str(home), "tasks"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("capsule-nb tasks: cannot") and str(home) in done.stderr


@pytest.mark.parametrize("lost", ["emptied", "deleted"])
def test_a_store_whose_database_was_lost_beside_its_value_files_is_refused_not_started_anew(tmp_path, lost):
    """db/cache.db cut to 0 bytes (a copy or restore cut short, a full disk), or deleted: the
    store opened as a new empty one over the old value files, and doctor gave an all-clear."""
    home = tmp_path / "store"
    # Another process made the store and has ended: this one's threads, which keep the store
    # open after app.close(), would read the cut file meanwhile (SQLite then drops the WAL).
    made = subprocess.run([sys.executable, "-c", f"""if True:
        import asyncio
        import capsule_nb as cpsl
        app = cpsl.App(home={str(home)!r})

        @app.task
        def big():
            return "y" * 200_000  # its result lives in a value file

        assert asyncio.run(big.submit().result()) == "y" * 200_000
        app.close()
        """], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    for name in os.listdir(home / "db"):
        if name.startswith("cache.db"):
            path = home / "db" / name
            path.unlink() if lost == "deleted" or name != "cache.db" else os.truncate(path, 0)
    for command in ("tasks", "doctor"):
        done = subprocess.run([sys.executable, "-m", "capsule_nb", "--home", str(home), command],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "has lost its database" in done.stderr and "value file(s)" in done.stderr
    with pytest.raises(StoreError, match="has lost its database"):
        Store(home)
    assert not (home / "db" / "cache.db").exists() or (home / "db" / "cache.db").stat().st_size == 0  # untouched


# ------------------------------------------------------ 8. clear errors


@pytest.mark.parametrize("call, error, says", [
    (lambda c: c.find({1: "x"}), TypeError, "got the key 1"),
    (lambda c: c.find(sort=5), TypeError, "got 5"),
    (lambda c: c.update_one({}, {"$set": {"_id.x": 1}}), ValueError, r"_id cannot be changed \(\$set '_id.x'\)"),
    (lambda c: c.update_one({}, {"$set": {"name.first": "x"}}), ValueError, "'name' holds 'Ada', not a document"),
    (lambda c: c.update_one({}, {"$inc": {"n": 1e308}}), ValueError, "overflows"),
    (lambda c: c.update_one({}, {"$set": {"n": float("inf")}}), TypeError, "stored as JSON"),
    (lambda c: c.update_one({}, {"$inc": {"n": float("nan")}}), TypeError, "finite"),
    (lambda c: c.update_one({}, {"$set": {"a..b": 1}}), ValueError, "an empty part"),
])
def test_bad_collection_calls_name_the_value_and_store_nothing(app, call, error, says):
    items = app.collection("items")
    items.insert_one({"_id": "a", "name": "Ada", "n": 1e308})
    with pytest.raises(error, match=says):
        call(items)
    assert items.find() == [{"_id": "a", "id": "a", "name": "Ada", "n": 1e308}]


def test_a_100k_deep_document_or_filter_is_a_clear_error(app):
    deep = {}
    inner = deep
    for _ in range(100_000):
        inner["a"] = {}
        inner = inner["a"]
    items = app.collection("items")
    with pytest.raises(ValueError, match="nested more than 100 levels deep"):
        items.insert_one(deep)
    with pytest.raises(ValueError, match="nested more than 100 levels deep"):
        items.find({"a": deep})
    with pytest.raises(ValueError, match="nested more than 100 levels deep"):
        items.insert_one({"list": [[[[x] for x in range(3)]]], **{"a": deep}})
    assert items.count() == 0


# ------------------------------------------------------ 9. repeat interval


def test_a_repeat_faster_than_a_second_is_refused(logic_app):
    @logic_app.task
    def tick():
        return 1

    with pytest.raises(ValueError, match=r"'every 0.0001s': repeats must be at least 1 s apart"):
        tick.schedule("every 0.0001s")
    assert tick.count() == 0
    assert tick.schedule("every 1s").snapshot()["every"] == 1.0


def test_a_lost_key_is_replaced_with_a_warning_saying_what_that_costs(tmp_path):
    """A deleted ``secret.key`` of a store with rows is replaced (the documented reset), and
    the opening process says that what the old key signed now reads as a bad signature; a
    brand-new store makes its key without a word."""
    def open_in_a_new_process(home):
        return subprocess.run([sys.executable, "-c", f"import capsule_nb as cpsl; cpsl.App(home={str(home)!r}).close()"],
                              capture_output=True, text=True, timeout=120)

    new = open_in_a_new_process(tmp_path / "new")
    assert new.returncode == 0 and "secret.key" not in new.stderr, new.stderr
    home = tmp_path / "store"
    good_store(home)
    (home / "secret.key").unlink()
    reopened = open_in_a_new_process(home)
    assert reopened.returncode == 0, reopened.stderr
    assert "had no secret.key, so a new key was made" in reopened.stderr
    assert "now reads as 'bad signature'" in reopened.stderr
    assert (home / "secret.key").is_file()


def test_a_payload_moved_onto_another_runs_row_is_refused_and_doctor_names_it(tmp_path, capsys):
    """Two runs' signed results swapped with sqlite3: each was signed with the store's key, so
    both were accepted, and run A answered with B's result (w57). A payload is now signed for
    its row; a payload signed before that (bytes alone) still reads."""
    import hashlib
    import hmac

    from capsule_nb.store.disk import SIGNATURE_BYTES
    from capsule_nb.store.folder import load_key

    home = tmp_path / "store"
    app = cpsl.App(home=home)

    @app.task
    def pair(label: str) -> tuple:  # a tuple is no JSON value: it is kept as a signed payload
        return (label, "tuple")

    a, b = pair.submit(label="AAA"), pair.submit(label="BBB")
    assert asyncio.run(a.result(timeout=10)) == ("AAA", "tuple") and asyncio.run(b.result(timeout=10)) == ("BBB", "tuple")
    app.close()
    db = sqlite3.connect(home / "db" / "cache.db")
    rows = dict(db.execute("SELECT key, value FROM Cache WHERE key IN (?, ?)",
                           (f"payload/{a.task_id}/result", f"payload/{b.task_id}/result")))
    with db:
        for mine, theirs in ((a, b), (b, a)):
            db.execute("UPDATE Cache SET value = ? WHERE key = ?",
                       (rows[f"payload/{theirs.task_id}/result"], f"payload/{mine.task_id}/result"))
    db.close()

    app = cpsl.App(home=home)
    try:
        with pytest.raises(StoreError, match=f"payload/{a.task_id}/result .* bad signature .*for another row"):
            asyncio.run(app.get_task(a.task_id).result(timeout=10))
        code, out, _ = cli(capsys, "--home", str(home), "doctor")
        assert code == 1 and out.count("moved here from another row") == 2, out

        # A payload from before (signed over its bytes alone) still reads, on its own row.
        blob = rows[f"payload/{a.task_id}/result"][SIGNATURE_BYTES:]
        unbound = hmac.new(load_key(home), blob, hashlib.sha256).digest() + blob
        app.store._cache.set(f"payload/{a.task_id}/result", unbound)
        app.runtime.results._recent.clear()
        assert asyncio.run(app.get_task(a.task_id).result(timeout=10)) == ("AAA", "tuple")
    finally:
        app.close()


@pytest.mark.parametrize("seq", ["-100", str(10**12), "1.5", '"abc"'])
def test_a_damaged_change_feed_counter_is_named_listed_and_moved_aside(tmp_path, capsys, seq):
    """w57: a negative counter passed as whole, and every write failed with "can only
    concatenate str (not "int") to str", naming nothing; doctor found nothing. A counter is a
    whole number an entry's 12-digit name can hold."""
    home = tmp_path / "store"
    (good,) = good_store(home)
    raw_row(home, "seq", seq)
    with pytest.raises(StoreError, match=re.escape(f"counter (row 'seq') is damaged ({json.loads(seq)!r})")):
        cpsl.App(home=home)  # at open, before anything is accepted that could not be written
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and "seq: the change-feed counter is a whole number from 0 to 999999999999" in out, out
    assert cli(capsys, "--home", str(home), "doctor", "--fix")[0] == 0
    app = cpsl.App(home=home)
    try:
        a_run_completes(app)
        assert {r["task_id"] for r in app.store.runs()} >= {good}  # nothing already there was lost
    finally:
        app.close()


def test_session_data_stored_as_no_object_reads_as_empty_and_is_named(tmp_path, caplog, capsys):
    """w57: ``[1, 2]`` written as a session's data broke ``session.data`` for good (reads, writes,
    ``len`` and ``repr`` raised AttributeError) and doctor found nothing: a session's data is a
    JSON object, and another row is skipped with one warning naming it, as broken JSON is."""
    home = tmp_path / "store"
    good_store(home)
    app = cpsl.App(home=home)
    session = app.owner_session
    row = f"session/{session.id}/data"
    app.close()
    raw_row(home, row, "[1, 2]")
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and f"{row}: expected a JSON object, not [1, 2]" in out, out
    app = cpsl.App(home=home)
    try:
        data = app.owner_session.data
        assert dict(data) == {} and len(data) == 0 and "theme" not in data
        assert len(warnings_naming(caplog, row)) == 1
        data["theme"] = "dark"  # a write makes it a session's data again
        assert app.owner_session.data == {"theme": "dark"}
    finally:
        app.close()
    assert cli(capsys, "--home", str(home), "doctor")[0] == 0


def test_a_result_whose_payload_row_was_removed_says_so_not_that_retention_pruned_it(tmp_path):
    home = tmp_path / "store"
    app = cpsl.App(home=home)

    @app.task
    def pair() -> tuple:  # kept as a signed payload
        return ("AAA", "tuple")

    handle = pair.submit()
    assert asyncio.run(handle.result(timeout=10)) == ("AAA", "tuple")
    app.close()
    with contextlib.closing(sqlite3.connect(home / "db" / "cache.db")) as db, db:
        db.execute("DELETE FROM Cache WHERE key = ?", (f"payload/{handle.task_id}/result",))
    app = cpsl.App(home=home)
    try:
        with pytest.raises(ValueError, match=f"the store has the run but not the row payload/{handle.task_id}/result"):
            asyncio.run(app.get_task(handle.task_id).result(timeout=10))
    finally:
        app.close()


@pytest.mark.parametrize("kept", ["garbage", "a folder"])
def test_doctor_fix_blames_a_broken_quarantine_db_not_the_store_and_moves_nothing(tmp_path, capsys, kept):
    home = tmp_path / "store"
    good_store(home)
    raw_row(home, "run/y", pickle.dumps({"task_id": "y"}), mode=4)
    if kept == "garbage":
        (home / "quarantine.db").write_bytes(b"not a database, " * 100)
    else:
        (home / "quarantine.db").mkdir()
    code, _, err = cli(capsys, "--home", str(home), "doctor", "--fix")
    assert code == 2 and f"cannot keep the bad rows in {home / 'quarantine.db'}" in err, err
    assert "nothing was moved" in err and "cannot read the capsule_nb store" not in err
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and "run/y" in out  # still there, for a fix once quarantine.db is moved aside


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_database_replaced_or_removed_under_an_open_store_refuses_new_runs(tmp_path, caplog, how):
    """A reset (``rm -r`` of the store) or a restore from a backup while a kernel has the store
    open: SQLite goes on writing the file it opened, which nobody reads any more, so the
    kernel's new runs were lost without a word. It says so, once, and takes no new runs."""
    import shutil

    home = tmp_path / "store"
    app = cpsl.App(home=home)
    try:
        job = a_run_completes(app)

        @app.schedule("0 0 1 1 *")
        def tick() -> None:
            job.submit()

        app.store.flush()
        db = home / "db" / "cache.db"
        if how == "replaced":  # a restore: the same bytes, another file
            shutil.copy(db, tmp_path / "backup.db")
            os.replace(tmp_path / "backup.db", db)
        else:
            shutil.rmtree(home / "db")
        until_sync(lambda: app.store.failure is not None, 10, what="the maintenance pass noticing")
        with pytest.raises(StoreError, match=f"was {'replaced by another file' if how == 'replaced' else 'removed'} "
                                             "while this process had it open"):
            job.submit()
        assert len([r for r in caplog.records if "while this process had it open" in r.getMessage()]) == 1
        for second in (1, 2, 3):  # a schedule's ticks meanwhile: one line, not a traceback each (w60)
            tick._tick(dt.datetime(2030, 1, 1, 0, 0, second, tzinfo=dt.timezone.utc))
        refused = [r for r in caplog.records if "tick at" in r.getMessage()]
        assert len(refused) == 1 and refused[0].exc_info is None and "not run" in refused[0].getMessage()
    finally:
        app.close()
