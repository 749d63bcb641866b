"""A store damaged below the level of rows: bytes that are not UTF-8 where SQLite keeps
text, a value file with a flipped byte. Such a row is set aside like any other bad row
(one warning, listed and moved by `capsule-nb doctor`); it never makes a listing, the
open or doctor itself fail, and nothing else in the store is lost."""

import contextlib
import json
import sqlite3
import subprocess
import sys

import pytest

import capsule_nb as cpsl
from capsule_nb.errors import StoreError
from capsule_nb.record import new_task_id
from capsule_nb.store.store import Store

from .test_hostile_store import cli, good_store, record_json, warnings_naming


def not_utf8(text):
    """``text`` as UTF-8 with its first ``~`` turned into the byte 0xff, as a flipped bit leaves it."""
    return text.encode().replace(b"~", b"\xff", 1)


def plant_not_utf8_rows(home):
    """A running run, a lock and a document whose text is not UTF-8, written as another
    program (or a flipped bit) would: straight into SQLite. Returns the run's id and record."""
    bad = new_task_id()
    record = not_utf8(record_json(bad, status="running", completed_at=None, display_name="~"))
    with contextlib.closing(sqlite3.connect(home / "db" / "cache.db")) as db, db:
        db.execute("INSERT INTO capsule_runs (task_id, app, task_name, status, record) "
                   "VALUES (?, 'default', 'job', 'running', CAST(? AS TEXT))", (bad, record))
        db.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, "
                   "mode, filename, value) VALUES ('lock/k', 1, 0, NULL, 0, 0, NULL, 0, 1, NULL, CAST(? AS TEXT))",
                   (not_utf8('{"task_id": "~", "owner": "x"}'),))
        db.execute("INSERT INTO capsule_docs (collection, doc_id, doc) VALUES ('c', 'bad', CAST(? AS TEXT))",
                   (not_utf8('{"_id": "bad", "name": "~"}'),))
    return bad, record


def test_text_that_is_not_utf8_is_a_bad_row_set_aside_never_a_broken_store(tmp_path, caplog, capsys):
    home = tmp_path / "store"
    (good,) = good_store(home)
    with contextlib.closing(Store(home)) as store:
        store.write_docs("c", {"good": lambda _: {"_id": "good"}})
    bad, planted = plant_not_utf8_rows(home)
    app = cpsl.App(home=home)  # the run is read at open, among the unfinished runs
    try:
        assert app.store.unfinished_runs() == []
        assert [r["task_id"] for r in app.store.runs()] == [good] and app.get_task(bad) is None
        assert app.store.get("lock/k") is None
        assert [doc["_id"] for doc in app.collection("c").find()] == ["good"]
        for key in (f"run/{bad}", "lock/k", "doc/c/bad"):
            assert len(warnings_naming(caplog, key)) == 1, key
            assert "UTF-8" in app.store.problem(key)
        code, out, _ = cli(capsys, "--home", str(home), "--json", "tasks")
        assert code == 0 and [r["task_id"] for r in json.loads(out)] == [good]
        code, out, _ = cli(capsys, "--home", str(home), "--json", "doctor")
        assert code == 1 and {r["key"] for r in json.loads(out)} == {f"run/{bad}", "lock/k"}
        code, out, _ = cli(capsys, "--home", str(home), "doctor", "--fix")
        assert code == 0 and "moved 2" in out
        assert cli(capsys, "--home", str(home), "doctor")[0] == 0
        with contextlib.closing(sqlite3.connect(home / "quarantine.db")) as kept:
            kept.text_factory = bytes
            assert kept.execute("SELECT record FROM moved_runs").fetchall() == [(planted,)]  # whole, unchanged
        assert app.store.count_runs() == 1 and app.store.get_run(good)["status"] == "completed"
    finally:
        app.close()


def test_a_value_file_with_a_byte_that_is_not_utf8_is_a_bad_row(tmp_path, caplog, capsys):
    home = tmp_path / "store"
    good_store(home)
    with contextlib.closing(Store(home)) as store:
        store.set("sched/default/big", {"note": "~" + "x" * 100_000})  # big: diskcache keeps it in a file
        store.set("sched/default/small", {"note": "kept"})
    (value_file,) = (home / "db").rglob("*.val")
    value_file.write_bytes(not_utf8(value_file.read_text()))
    with contextlib.closing(Store(home)) as store:
        assert store.get("sched/default/big") is None and "UTF-8" in store.problem("sched/default/big")
        assert [key for key, _ in store.items("sched/")] == ["sched/default/small"]
    assert len(warnings_naming(caplog, "sched/default/big")) == 1
    code, out, _ = cli(capsys, "--home", str(home), "doctor")
    assert code == 1 and "sched/default/big" in out and "UTF-8" in out


def damage_documents_table(home):
    """Zero the root page of the documents table, as a torn write or a bad sector leaves it."""
    db_file = home / "db" / "cache.db"
    with contextlib.closing(sqlite3.connect(db_file)) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'capsule_docs'").fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db_file, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\x00" * page_size)


def test_a_damaged_database_page_is_named_by_doctor_and_by_queries_never_all_clear(tmp_path, capsys):
    home = tmp_path / "store"
    (good,) = good_store(home)
    with contextlib.closing(Store(home)) as store:
        store.write_docs("c", {str(n): (lambda n: lambda _: {"_id": str(n), "pad": "x" * 400})(n) for n in range(300)})
    damage_documents_table(home)
    code, out, err = cli(capsys, "--home", str(home), "doctor")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, (code, out, err)
    assert str(home / "db" / "cache.db") in err and "damaged" in err and ".recover" in err
    assert cli(capsys, "--home", str(home), "doctor", "--fix")[0] == 2  # moves nothing out of a damaged file
    app = cpsl.App(home=home)
    try:
        assert app.get_task(good).snapshot()["status"] == "completed"  # what is intact still reads
        with pytest.raises(StoreError) as refused:
            app.collection("c").find()
        assert str(home) in str(refused.value) and "capsule-nb doctor" in str(refused.value)
    finally:
        app.close()


def test_a_write_ahead_log_removed_under_an_open_store_is_named_with_what_to_do(tmp_path):
    """Someone deletes ``db/cache.db-wal`` while a kernel has the store open: a process
    opening it then is refused with SQLite's 'disk I/O error' and what to do about it."""
    home = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, capsule_nb as cpsl\napp = cpsl.App(home={str(home)!r})\n"
                               f"app.task(lambda: None).submit(); app.store.flush()\nprint('open', flush=True)\n"
                               f"sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        (home / "db" / "cache.db-wal").unlink()
        opened = subprocess.run([sys.executable, "-c", f"import capsule_nb as cpsl; cpsl.App(home={str(home)!r})"],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.communicate("\n", timeout=60)
    assert opened.returncode != 0
    assert f"cannot open the capsule_nb store at {home}: disk I/O error" in opened.stderr
    assert "close those kernels and open it again" in opened.stderr
