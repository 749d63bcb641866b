"""A store written by the release (capsule_nb 0.1.0) opens in this version: migrated once, nothing lost.

``fixtures/store-0.1.0.tar.gz`` is a store the release made, and
``fixtures/store-0.1.0.json`` what the release's public API read from it
(``fixtures/make_release_store.py`` made both and says how). Here the same
reading, ``describe()``, is done by this version and compared.

The processes that made the store are gone, but they named their host
``FIXTURE_HOST``, and a run of another host's process counts as alive: opened as
extracted, nothing in the store is recovered, so it must read exactly as the
manifest says. ``release_store(here=True)`` renames that host to this machine's
in the release's rows, before this version opens them (the release's format, not
this version's), so those runs become runs of dead processes of this machine.
"""

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

import capsule_nb as cpsl

from .conftest import until
from .fixtures.make_release_store import APPS, FIXTURE_HOST, MANIFEST, TARBALL, describe
from .test_durability import SPAWNED, lines_until

FIXTURES = Path(__file__).parent / "fixtures"
MAKER = FIXTURES / "make_release_store.py"

pytestmark = pytest.mark.timeout(300)


def release_store(tmp_path: Path, *, here: bool = False) -> Path:
    """The release's store, extracted; with ``here``, its processes are this machine's (and dead)."""
    with tarfile.open(FIXTURES / TARBALL) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    home = tmp_path / "store"
    os.chmod(home, 0o700)  # the store refuses a folder or key others could use
    os.chmod(home / "secret.key", 0o600)
    if here:
        rows = sum(len(app["runs"]) for app in _manifest()["apps"].values())
        with contextlib.closing(sqlite3.connect(home / "db" / "cache.db")) as db, db:
            moved = db.execute(
                "UPDATE Cache SET value = replace(value, ?, ?) WHERE key LIKE 'run/%' AND instr(value, ?) > 0",
                (f"{FIXTURE_HOST}:", f"{socket.gethostname()}:", f"{FIXTURE_HOST}:")).rowcount
        assert moved == rows, f"{moved} of the release's {rows} run rows named the fixture's host"
    return home


def _manifest(*, here: bool = False) -> dict[str, Any]:
    """What the release read; with ``here``, as ``release_store(here=True)`` renamed the owners' host."""
    text = (FIXTURES / MANIFEST).read_text()
    return json.loads(text.replace(f'"{FIXTURE_HOST}:', f'"{socket.gethostname()}:') if here else text)


def _runs(view: dict[str, Any], app: str) -> dict[str, dict[str, Any]]:
    return {run["task_id"]: run for run in view["apps"][app]["runs"]}


def _assert_kept(got: dict[str, Any], want: dict[str, Any]) -> None:
    """``got`` is the run ``want`` was: every field the release showed, equal, its whole
    record included (this version may add fields, never drop or change one)."""
    for field, value in want.items():
        if field != "record":
            assert got[field] == value, f"run {want['task_id']} ({want['task_name']}): {field}"
    _assert_record_kept(got["record"], want["record"])


def _assert_record_kept(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Every field of the release's record, equal (one that was null may be left out)."""
    lost = {k: v for k, v in want.items() if got.get(k) != v}
    assert not lost, f"run {want['task_id']}: fields lost or changed: {lost} (now {({k: got.get(k) for k in lost})})"


def _assert_holds(view: dict[str, Any], manifest: dict[str, Any]) -> None:
    """``view`` reads exactly as the release read the store."""
    for app, expected in manifest["apps"].items():
        got = _runs(view, app)
        assert [run["task_id"] for run in view["apps"][app]["runs"]] == [run["task_id"] for run in expected["runs"]], \
            f"app {app}: runs lost, doubled, added or out of order"
        for run in expected["runs"]:
            _assert_kept(got[run["task_id"]], run)
        for part in ("count", "by_status", "queries"):
            assert view["apps"][app][part] == expected[part], f"app {app}: {part}"
    for part in ("collections", "session_data", "schedules"):
        assert view[part] == manifest[part], part


def _cli(*args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "capsule_nb", *args, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _describe_in_a_new_process(home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "CAPSULE_NB_FIXTURE_HOST"}
    done = subprocess.run([sys.executable, str(MAKER), "describe", str(home)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _open(home: Path) -> dict[str, cpsl.App]:
    return {name: cpsl.App(name=name, home=home) for name in APPS}


def _close(apps: dict[str, cpsl.App]) -> None:
    for app in apps.values():
        app.close()


async def test_a_release_store_opens_with_every_run_document_and_schedule_it_held(tmp_path):
    manifest = _manifest()
    home = release_store(tmp_path)
    apps = _open(home)
    try:
        seen = await describe(apps, home)
        _assert_holds(seen, manifest)
        # every outcome kind is in the fixture, so none is compared vacuously
        outcomes = [run["outcome"] for app in seen["apps"].values() for run in app["runs"]]
        assert {next(iter(o)) for o in outcomes} >= {"json", "type", "raises", "unfinished"}
        assert {o.get("raises") for o in outcomes} >= {"TaskFailed", "TaskCancelled", "ValueError"}
        point = next(h for h in await apps["alpha"].tasks.find(kind="point"))
        value = await point.result()
        assert (type(value).__name__, value.x, value.y, value.tags) == ("Point", 1, 2.5, ("a", "b"))

        listed = _cli("tasks", "--home", str(home), "--limit", "0")
        records = {run["task_id"]: run["record"] for app in manifest["apps"].values() for run in app["runs"]}
        assert [r["task_id"] for r in listed] == sorted(records, reverse=True)  # each once, newest first
        for record in listed:
            _assert_record_kept(record, records[record["task_id"]])
    finally:
        _close(apps)
    assert _describe_in_a_new_process(home) == seen  # opened again: the same, nothing doubled
    with contextlib.closing(sqlite3.connect(home / "db" / "cache.db")) as db:  # moved, not copied
        assert db.execute("SELECT count(*) FROM Cache WHERE key LIKE 'run/%'").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM capsule_runs").fetchone() == (len(records),)


async def test_what_a_killed_release_process_left_is_recovered_adopted_and_cancelled(tmp_path):
    manifest = _manifest(here=True)
    left = manifest["left_behind"]
    home = release_store(tmp_path, here=True)
    apps = _open(home)
    alpha, beta = apps["alpha"], apps["beta"]
    try:
        running = alpha.get_task(left["running"])
        asked = beta.get_task(left["cancel_requested"])
        # its run left running is recovered at open (no attempts left), the cancel its owner never
        # answered is answered
        await until(lambda: running.status() == "failed" and asked.status() == "cancelled", timeout=30)
        assert running.error == "interrupted" and asked.error == "cancelled"

        # the notebook's cells run again: its waiting runs are adopted and run once
        @alpha.task(lock="slot", on_lock="queue")
        def slot_job(n: int, hold: bool = False) -> int:
            return n * 10

        @alpha.task()
        def double(x: int) -> int:
            return 2 * x

        @alpha.task()
        def tally(items: frozenset) -> int:
            return sum(items)

        @beta.task()
        def ping() -> str:
            return "pong"

        assert await alpha.get_task(left["queued"]).result(timeout=60) == 70  # the lock of the dead run is free
        due = beta.get_task(left["due"])
        wait = max(0.0, due.snapshot()["scheduled_for"] - time.time()) + 60
        assert await due.result(timeout=wait) == "pong"
        assert due.attempt == 1
        for waiting in ("scheduled", "repeating"):
            handle = alpha.get_task(left[waiting])
            assert handle.status() == "scheduled"
            assert handle.cancel() and handle.status() == "cancelled"

        # new runs, on the migrated store
        fresh = [await double.submit(x=50), await ping.submit()]
        assert [await h.result(timeout=60) for h in fresh] == [100, "pong"]
        payload_args = next(h for h in await tally.find() if h.snapshot().get("args_payload"))
        again = alpha.resubmit(payload_args.task_id)  # the release's signed payload of arguments
        assert await again.result(timeout=60) == 6
        threads = alpha.collection("threads")
        assert await threads.update_one({"n": 3}, {"$inc": {"review_count": 1}}) == {"matched": 1, "modified": 1}
        assert (await threads.find_one({"n": 3}))["review_count"] == 3
        added = await threads.insert_one({"subject": "after the upgrade", "n": 100})

        seen = await describe(apps, home)
        left_ids = set(left.values())
        new_ids = [h.task_id for h in [*fresh, again]]
        ids = [run["task_id"] for app in APPS for run in seen["apps"][app]["runs"]]
        released = [run["task_id"] for app in APPS for run in manifest["apps"][app]["runs"]]
        assert sorted(ids) == sorted(released + new_ids), "runs lost or doubled"
        for app, expected in manifest["apps"].items():
            got = _runs(seen, app)
            for run in expected["runs"]:
                if run["task_id"] not in left_ids:
                    _assert_kept(got[run["task_id"]], run)
        assert seen["apps"]["alpha"]["by_status"]["failed"] == manifest["apps"]["alpha"]["by_status"]["failed"] + 1
        docs = {d["_id"]: d for d in seen["collections"]["threads"]["docs"]}
        assert docs.pop(added["_id"])["subject"] == "after the upgrade"
        assert docs.keys() == {d["_id"] for d in manifest["collections"]["threads"]["docs"]}
        assert seen["collections"]["metrics"] == manifest["collections"]["metrics"]
        assert seen["session_data"] == manifest["session_data"]
        assert seen["schedules"] == manifest["schedules"]
    finally:
        _close(apps)
    assert _describe_in_a_new_process(home) == seen  # opened again: the same, nothing doubled


OPENER = """
import asyncio, json, sys
import capsule_nb as cpsl

print("imported", flush=True)
sys.stdin.readline()  # go: both processes open the store at once
home, tag = sys.argv[1:]
alpha, beta = cpsl.App(name="alpha", home=home), cpsl.App(name="beta", home=home)

@beta.task()
def echo(tag: str) -> str:
    return tag

async def main():
    counts = {"alpha": await alpha.tasks.count(), "beta": await beta.tasks.count()}
    handle = await echo.submit(tag=tag)
    print(json.dumps({"counts": counts, "task_id": handle.task_id, "result": await handle.result(timeout=60)}))

asyncio.run(main())
"""


async def test_two_processes_opening_a_release_store_at_once_migrate_it_once(tmp_path):
    manifest = _manifest()
    home = release_store(tmp_path)
    procs = []
    for tag in ("first", "second"):
        proc = subprocess.Popen([sys.executable, "-c", OPENER, str(home), tag], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        SPAWNED.append(proc)
        procs.append(proc)
    for proc in procs:
        lines_until(proc, "imported", timeout=60)
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    expected = {app: manifest["apps"][app]["count"] for app in APPS}
    for report in reports:  # each saw the whole store (and perhaps the other's new run)
        assert report["counts"]["alpha"] == expected["alpha"]
        assert report["counts"]["beta"] in (expected["beta"], expected["beta"] + 1)
    assert [r["result"] for r in reports] == ["first", "second"]

    apps = _open(home)  # a third process, after both
    try:
        seen = await describe(apps, home)
    finally:
        _close(apps)
    new = {r["task_id"] for r in reports}
    assert seen["apps"]["beta"]["count"] == expected["beta"] + 2
    beta = _runs(seen, "beta")
    assert {i: beta.pop(i)["outcome"] for i in new} == {r["task_id"]: {"json": r["result"]} for r in reports}
    seen["apps"]["beta"]["runs"] = list(beta.values())
    for part in ("count", "by_status", "queries"):  # the new runs change these; compared above
        seen["apps"]["beta"][part] = manifest["apps"]["beta"][part]
    _assert_holds(seen, manifest)  # every run of the release once, as it was; nothing else
