import asyncio
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

import capsule_nb as cpsl


@pytest.fixture(autouse=True, scope="session")
def default_store_outside_the_checkout(tmp_path_factory):
    """A test that uses the default app (``cpsl.current_session()`` outside any app) gets a
    store of the session's, not ``./.capsule`` in the checkout the suite runs from."""
    if "CAPSULE_NB_HOME" in os.environ:
        yield
        return
    os.environ["CAPSULE_NB_HOME"] = str(tmp_path_factory.mktemp("default-home"))
    try:
        yield
    finally:
        os.environ.pop("CAPSULE_NB_HOME", None)


@pytest.fixture(autouse=True)
def no_stray_children():
    """Kill what a test spawned (``test_durability.spawn``) and left running, pass or fail."""
    yield
    from .test_durability import SPAWNED

    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def app(tmp_path: Path):
    """An App with a store of its own: tests never share state."""
    application = cpsl.App(home=tmp_path / "store")
    yield application
    application.close()


async def until(predicate, timeout: float = 10.0, interval: float = 0.005):
    """Wait for ``predicate()`` to be true, failing after ``timeout`` seconds (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


def record_on_disk(home: Path, task_id: str) -> dict | None:
    """A run's record as the disk has it, read over a connection of our own (no capsule_nb code)."""
    with contextlib.closing(sqlite3.connect(Path(home) / "db" / "cache.db", timeout=30)) as db:
        row = db.execute("SELECT record FROM capsule_runs WHERE task_id = ?", (task_id,)).fetchone()
    return None if row is None else json.loads(row[0])


def until_sync(predicate, timeout: float = 10.0, interval: float = 0.005, what: str = ""):
    """``until`` for sync code: returns the predicate's first truthy value, fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        time.sleep(interval)
    return value


def process_gone(pid: int) -> bool:
    """The PID no longer names a live process (a zombie nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # (gone between the two looks: reading says ESRCH)
        return True


def worker_pids(pool) -> list[int]:
    """The pids of a ``ProcessPool``'s workers that are up."""
    with pool._lock:
        return sorted(w.pid for w in pool._workers if w.ready)


@pytest.fixture
def logic_app(tmp_path: Path):
    """An App in immediate mode: a submit runs to its end before it returns (no threads, no timers)."""
    application = cpsl.App(home=tmp_path / "store", executor="immediate")
    yield application
    application.close()
