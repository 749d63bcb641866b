"""Store faults: a full or read-only disk, a damaged database. Clear errors, nothing lost."""

import errno
import sqlite3

import pytest

import capsule_nb as cpsl
from capsule_nb.errors import StoreError

from ..conftest import record_on_disk, until, until_sync


@pytest.mark.parametrize("fault", [
    OSError(errno.ENOSPC, "No space left on device"),
    sqlite3.OperationalError("attempt to write a readonly database"),
])
async def test_a_disk_that_refuses_writes_then_recovers(app, monkeypatch, fault):
    @app.task
    def work(n):
        return n

    before = await work.submit(1)
    assert await before.result(timeout=5) == 1
    app.store.flush()
    real_set = app.store._cache.set

    def refuse(key, value, *args, **kwargs):
        raise fault

    monkeypatch.setattr(app.store._cache, "set", refuse)
    during = work.submit(2)  # accepted in memory; the write fails
    with pytest.raises(StoreError, match=str(app.home)):
        await during  # the durability promise is not given
    with pytest.raises(StoreError, match=str(app.home)):
        work.submit(3)  # refused at once while the disk refuses writes
    assert await before.result() == 1  # what was on disk before is still readable
    monkeypatch.setattr(app.store._cache, "set", real_set)  # the disk is repaired
    await until(lambda: app.store.failure is None, timeout=5)
    app.store.flush()
    assert record_on_disk(app.home, during.task_id)["task_name"] == "work"
    assert await during.result(timeout=5) == 2
    assert await work.submit(4).result(timeout=5) == 4


def test_closing_an_app_while_the_disk_refuses_writes_says_so(app, monkeypatch, caplog):
    """What close could not make durable is logged with the store's path (it was passed over)."""
    import threading

    gate = threading.Event()

    @app.task
    def work(n):
        gate.wait(10)  # live at the close, which has its end to record
        return n

    handle = work.submit(1)
    until_sync(lambda: handle.snapshot()["status"] == "running")
    app.store.flush()

    def refuse(key, value, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app.store._cache, "set", refuse)
    app.close()
    gate.set()
    assert "could not record how its live runs end" in caplog.text and str(app.home) in caplog.text


def test_a_garbage_database_file_is_a_clear_error(tmp_path):
    (tmp_path / "db").mkdir(parents=True)
    (tmp_path / "db" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(tmp_path)):
        cpsl.App(home=tmp_path)


def test_a_truncated_database_is_a_clear_error(tmp_path):
    home = tmp_path / "store"
    app = cpsl.App(home=home)
    app.collection("c").insert_many([{"n": i, "pad": "x" * 500} for i in range(400)])
    app.close()
    app.store.close()
    from capsule_nb import store

    store._stores.clear()  # a new process would open it afresh
    db = home / "db" / "cache.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    for extra in ("cache.db-wal", "cache.db-shm"):
        (home / "db" / extra).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=str(home)):
        cpsl.App(home=home)
