"""process=True through the task API: isolation, kills, sessions, pickling, and the Dask cluster."""

import os
import socket
import sys
import threading
import time

import pytest

from capsule_nb.store import retention

from .conftest import process_gone, until, worker_pids

jupyter_client = pytest.importorskip("jupyter_client")


class CountsPickles:
    """A non-JSON argument that counts how often this process pickles it."""

    pickled = 0

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        type(self).pickled += 1
        return CountsPickles, (self.value,)


async def test_a_process_run_uses_the_notebooks_app_collections_and_tasks_as_capsule_code_does(app):
    """Capsule code keeps ``app``, ``threads = app.collection(...)`` and its tasks at module
    level and uses them inside ``process=True`` tasks (Capsule re-imports the module there).
    Here they go to the worker by reference (they used to fail the submit: a store holds
    locks): the same collection and app on the same store, opened there, with the notebook's
    retention. A task submitted there runs in that worker, and the notebook sees its end."""
    retention.keep(app.store, app.name, 12_345)
    cell: dict = {"__name__": "__main__", "app": app, "threads": app.collection("threads")}
    exec(
        "def other(x):\n"
        "    return x * 2\n"
        "def sync_threads(owner, session=None):\n"
        "    threads.insert_one({'owner': owner})\n"
        "    app.collection('threads').insert_one({'owner': owner, 'via': 'app'})\n"
        "    handle = other.submit(21)\n"
        "    session.show_task(handle)\n"  # (the kernel looks it up: it is on disk first)
        "    return handle.task_id, app.keep_finished\n",
        cell,
    )
    cell["other"] = app.task(cell["other"])
    sync_threads = app.task(process=True)(cell["sync_threads"])
    handle = sync_threads.submit("ops", session=app.session)
    task_id, kept = await handle.result(timeout=60)
    assert [m for m in handle.snapshot()["messages"] if "KeyError" in m["text"]] == []
    assert kept == 12_345
    assert [(d["owner"], d.get("via")) for d in app.collection("threads").find()] == [("ops", None), ("ops", "app")]
    assert await app.get_task(task_id).result(timeout=10) == 42
    assert app.get_task(task_id).snapshot()["owner"] != app.runtime.owner  # it ran in the worker


async def test_a_function_defined_in_a_cell_sees_the_globals_of_each_submit(app):
    """A cell's function goes by value, with the globals it reads then: a worker must see
    the value a global had at each submit, however the call's pickles are kept."""
    cell: dict = {"__name__": "__main__"}
    exec("LIMIT = 1\ndef read_limit(scale):\n    return LIMIT * scale\n", cell)
    read_limit = app.task(process=True)(cell["read_limit"])
    assert await read_limit.submit(10).result(timeout=60) == 10
    cell["LIMIT"] = 2
    assert await read_limit.submit(10).result(timeout=60) == 20



def _say(session, label):  # importable: it goes by reference, and a worker keeps it between jobs
    session.reply(label)
    return os.getpid()


async def test_a_worker_keeps_an_importable_function_and_its_session_but_rebuilds_a_cells(app):
    """A worker keeps what the bytes of an importable function and the runtime's session
    unpickled to, for the next job (rebuilding the session cost ~15 µs a job); each run still
    gets a session of its own, so what it says goes to that run. A cell's function is rebuilt
    for each job, with the globals of its submit: a job's changes to them never reach the next."""
    app.runtime.processes.max_workers = 1  # one worker: every job after the first finds what it kept
    say = app.task(process=True)(_say)
    handles = [say.submit(label=f"run {n}") for n in range(4)]
    pids = {await h.result(timeout=60) for h in handles}
    assert len(pids) == 1 and pids != {os.getpid()}
    assert [[(m["kind"], m["text"]) for m in h.snapshot()["messages"]] for h in handles] == [
        [("reply", f"run {n}")] for n in range(4)]

    cell: dict = {"__name__": "__main__"}
    exec("COUNT = 0\ndef count():\n    global COUNT\n    COUNT += 1\n    return COUNT, __import__('os').getpid()\n",
         cell)
    count = app.task(process=True)(cell["count"])
    first, second = [await count.submit().result(timeout=60) for _ in range(2)]
    assert first == (1, second[1]) and second[0] == 1  # one worker, and each job began from COUNT = 0


async def test_a_cell_run_again_lets_its_old_function_and_defaults_go(app):
    """Re-running a cell defines the task anew: the function it replaced, and what its
    defaults hold, must be freed once its runs are done, not kept by the process pool."""
    import gc
    import weakref

    class Big:
        pass

    old = []
    for n in range(2):
        cell: dict = {"__name__": "__main__", "Big": Big}
        exec(f"def shift(x, big=Big()):\n    return x + {n}\n", cell)
        shift = app.task(process=True, name="shift")(cell["shift"])
        assert await shift.submit(1).result(timeout=60) == 1 + n
        old.append(weakref.ref(cell["shift"].__defaults__[0]))
        del cell, shift
    gc.collect()
    assert old[0]() is None  # the first cell's default went with its function


async def test_each_argument_is_pickled_once_across_retries_and_the_resumable_copy(app):
    @app.task(process=True, retries=1)
    def flaky(box, path):
        if not os.path.exists(path):  # the first attempt fails, the retry succeeds
            open(path, "w").close()
            raise ConnectionError("once")
        return box.value * 2

    CountsPickles.pickled = 0
    handle = flaky.submit(CountsPickles(21), str(app.home / "attempted"))
    assert await handle.result(timeout=60) == 42
    record = handle.snapshot()
    assert record["attempt"] == 2 and record["args_payload"] is True  # kept for resuming, and retried
    assert app.store.get_payload(handle.task_id, "args")[0][0].value == 21
    assert CountsPickles.pickled == 1


async def test_runs_in_another_process_and_returns(app):
    @app.task(process=True)
    def whoami(n):
        return os.getpid(), n * 2

    pid, value = await whoami.submit(21).result(timeout=60)
    assert value == 42 and pid != os.getpid()


@pytest.mark.parametrize("body, expect", [
    ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    ("import os; os._exit(3)", "exited with code 3"),
    ("x = bytearray(512 * 2**20)", "memory limit"),
])
async def test_a_crashing_child_fails_its_run_and_the_next_run_works(app, body, expect):
    @app.task(process=True, retries=1, memory_limit="64MiB", name="crashy")
    def crashy():
        exec(body)

    handle = crashy.submit()
    assert await handle.wait(60) == "failed"
    record = handle.snapshot()
    assert expect in record["error"] and record["attempt"] == 2  # retried once, crashed again

    @app.task(process=True, name="fine")
    def fine():
        return "still here"

    assert await fine.submit().result(timeout=60) == "still here"


@pytest.mark.parametrize("body, attempts", [
    ("import ctypes; ctypes.string_at(0)", 2),  # killed by a signal: retried whatever retry_for says
    ("import os; os._exit(3)", 1),  # an exit code is the task's own failure: retry_for decides
])
async def test_a_child_killed_by_a_signal_is_retried_whatever_retry_for_names(app, body, attempts):
    """Capsule's runner: "a child killed by a signal always gives retry". With ``retry_for``
    set, a segfault used to fail at once."""
    @app.task(process=True, retries=1, retry_for=[ValueError], name="crashy_for")
    def crashy():
        exec(body)

    handle = crashy.submit()
    assert await handle.wait(60) == "failed"
    assert handle.snapshot()["attempt"] == attempts


async def test_timeout_and_cancel_kill_the_child(app):
    @app.task(process=True, timeout=1)
    def stuck(path):
        with open(path, "w") as fh:
            fh.write(str(os.getpid()))
        while True:
            time.sleep(0.01)

    for how in ("timeout", "cancel"):
        marker = app.home / f"{how}.pid"
        handle = stuck.submit(str(marker))
        await until(lambda: marker.exists() and marker.read_text(), timeout=30)
        pid = int(marker.read_text())
        if how == "cancel":
            started = time.monotonic()
            assert await handle.cancel() is True
        else:
            started = time.monotonic()
        assert await handle.wait(10) == ("timeout" if how == "timeout" else "cancelled")
        if how == "cancel":
            assert time.monotonic() - started < 1.0
        await until(lambda: process_gone(pid), timeout=2)


async def test_cancel_a_run_waiting_for_a_worker_while_all_are_busy(app):
    app.runtime.processes.max_workers = 1

    @app.task(process=True)
    def hold(path):
        open(path, "w").close()
        while True:
            time.sleep(0.01)

    marker = app.home / "busy"
    busy = hold.submit(str(marker))
    await until(marker.exists, timeout=30)
    waiting = hold.submit(str(app.home / "never"))  # no worker free: it waits in the pool's queue
    assert await waiting.cancel() is True
    assert await waiting.wait(5) == "cancelled" and not (app.home / "never").exists()
    assert await busy.cancel() is True
    assert await busy.wait(5) == "cancelled"


async def test_sessions_and_collections_from_the_child(app):
    @app.task(process=True)
    def report(session, name):
        session.notify(f"starting {name}")
        session.progress(1, 2, "half")
        session.log("a log line")
        print("printed in the child")
        session.db.reports.insert_one({"name": name, "pid": os.getpid()})
        session.reply("done")
        return name

    handle = report.submit(name="daily", session=app.session)
    assert await handle.result(timeout=60) == "daily"
    record = handle.snapshot()
    assert [(m["kind"], m["text"]) for m in record["messages"]] == [
        ("notify", "starting daily"), ("log", "a log line"), ("reply", "done")]
    assert record["progress"] == {"done": 1, "total": 2, "message": "half"}
    assert "printed in the child" in "".join(x["text"] for x in record["output"])
    doc = app.collection("reports").find_one({"name": "daily"})
    assert doc["pid"] != os.getpid()


async def test_show_task_in_the_child_without_a_cell_is_recorded_once_and_keeps_no_card(app):
    @app.task
    def target():
        return 1

    @app.task(process=True)
    def announce(task_id, session):
        session.show_task(task_id, message="from the child")

    shown = target.submit()
    listeners = app.store.events._all
    handle = announce.submit(shown.task_id, session=app.session)
    assert await handle.wait(60) == "completed"
    assert [(m["kind"], m["text"]) for m in handle.snapshot()["messages"]] == [("show_task", shown.task_id)]
    assert dict(app.store.events._by_run) == {} and app.store.events._all == listeners  # its card was closed


async def test_pickling_problems_are_clear(app):
    @app.task(process=True)
    def takes(value):
        return type(value).__name__

    with pytest.raises(TypeError, match="value"):
        takes.submit(threading.Lock())
    assert app.tasks.count() == 0

    @app.task(process=True)
    def gives():
        return threading.Lock()

    handle = gives.submit()
    assert await handle.wait(60) == "failed"
    assert "lock" in handle.snapshot()["error"].lower()

    sock = socket.socket()
    try:
        uses_socket = app.task(process=True, name="uses_socket")(lambda: sock.getsockname())
        with pytest.raises(TypeError, match="socket"):
            uses_socket.submit()
    finally:
        sock.close()


async def test_locks_retries_and_statuses_as_in_kernel(app):
    attempts = app.home / "attempts"

    @app.task(process=True, retries=2, lock="job:{key}")
    def flaky(key, path):
        with open(path, "a") as fh:
            fh.write("x")
        if len(open(path).read()) < 3:
            raise ConnectionError("try again")
        return key

    first = flaky.submit("a", str(attempts))
    joined = flaky.submit("a", str(attempts))
    assert joined.task_id == first.task_id
    assert await first.result(timeout=60) == "a"
    assert first.snapshot()["attempt"] == 3


def _run_in_a_kernel(home, code: str) -> None:
    """``code`` run as one cell of a real kernel on the store at ``home``; it must end ok."""
    from .kernels import kernel_manager

    manager = kernel_manager()
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": str(home)})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(code, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_a_notebook_function_with_closures_runs_in_a_process(tmp_path):
    _run_in_a_kernel(tmp_path, """
%load_ext capsule_nb
import os
FACTOR = 7

def helper(x):
    return x * FACTOR

@cpsl.task(process=True)
def scaled(n):
    return os.getpid(), [helper(i) for i in range(n)]

pid, values = await scaled.submit(4).result(timeout=60)
assert pid != os.getpid() and values == [0, 7, 14, 21], (pid, values)
""")


def test_a_process_task_calls_a_notebook_schedule_inline(tmp_path):
    """Capsule's templates call a scheduled function inline from a task. In a process task the
    schedule, defined in a cell, went to the worker by value, and could not be pickled (its timer)."""
    _run_in_a_kernel(tmp_path, """
%load_ext capsule_nb
import os

@cpsl.schedule("0 9 1 1 *")
async def yearly_digest():
    return f"digest from {os.getpid()}"

@cpsl.task(process=True)
async def monitor():
    return await yearly_digest()

said = await monitor.submit().result(timeout=60)
assert said.startswith("digest from ") and said != f"digest from {os.getpid()}", said
assert not yearly_digest.paused and yearly_digest.next_runs(1)[0].month == 1
""")


async def test_the_same_tasks_on_a_dask_cluster(app):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster, asynchronous=False)
    try:
        app.runtime.cluster = client
        attempts = app.home / "dask-attempts"

        @app.task(process=True, retries=1)
        def where(path):
            with open(path, "a") as fh:
                fh.write("x")
            if len(open(path).read()) < 2:
                raise ValueError("first attempt fails")
            return os.getpid()

        handle = where.submit(str(attempts))
        pid = await handle.result(timeout=120)
        assert pid != os.getpid() and handle.snapshot()["attempt"] == 2

        @app.task(process=True, timeout=1)
        def forever():
            while True:
                time.sleep(0.01)

        assert await forever.submit().wait(60) == "timeout"
        running = forever.submit()
        await until(lambda: running.snapshot()["status"] == "running", timeout=60)
        assert await running.cancel() is True
        assert await running.wait(30) == "cancelled"
    finally:
        app.runtime.cluster = None
        client.close()
        cluster.close()

    @app.task(process=True, name="local_again")
    def local_again():
        return "local"

    assert await local_again.submit().result(timeout=60) == "local"


async def test_configuring_the_cluster_again_lets_runs_in_flight_end_where_they_run(app):
    """Re-running a ``cpsl.configure(cluster=client)`` cell, or going back to local workers
    with ``cluster=None``, while runs are going: those runs end as their bodies do, on the
    cluster they started on, and the runs submitted after go where it now says. Before, the
    old cluster's runs were killed and failed ``JobKilled: ... backend shut down``."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster, asynchronous=False)
    gate = app.home / "gate"

    @app.task(process=True, name="gated")
    def gated(tag):
        while not os.path.exists(str(gate)):
            time.sleep(0.01)
        return tag, os.getpid()

    try:
        app.runtime.cluster = client
        first = gated.submit("first")
        await until(lambda: first.snapshot()["status"] == "running", timeout=60)
        app.runtime.cluster = client  # the same cell, run again
        second = gated.submit("second")
        await until(lambda: second.snapshot()["status"] == "running", timeout=60)
        app.runtime.cluster = None  # back to this machine while both run on the cluster
        local = gated.submit("local")
        await until(lambda: local.snapshot()["status"] == "running", timeout=60)
        gate.touch()
        results = [await h.result(timeout=60) for h in (first, second, local)]
    finally:
        app.runtime.cluster = None
        client.close()
        cluster.close()
    assert [tag for tag, _ in results] == ["first", "second", "local"]
    local_workers = worker_pids(app.runtime.processes)
    assert results[0][1] not in local_workers and results[1][1] not in local_workers  # on the Dask worker
    assert results[2][1] in local_workers


def test_a_plain_script_without_a_main_guard(tmp_path):
    """Workers get calls by value: a script's top level never runs again inside them."""
    import subprocess

    script = tmp_path / "job.py"
    log = tmp_path / "top-level-runs"
    script.write_text(f"""
import asyncio, os
import capsule_nb as cpsl
with open({str(log)!r}, "a") as fh:
    fh.write(f"{{os.getpid()}}\\n")

@cpsl.task(process=True)
def square(x):
    return x * x

print(asyncio.run(square.submit(12).result(timeout=60)))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAPSULE_NB_HOME": str(tmp_path / "store")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["144"]
    assert len(log.read_text().split()) == 1


def test_a_script_that_ends_with_a_process_run_waiting_leaves_it_to_the_next_one(tmp_path):
    """A script's last line submits and the script ends: the run it could not start is
    left waiting, with no error at exit, and the next process that defines the task runs it."""
    import subprocess

    script = tmp_path / "job.py"
    script.write_text("""
import sys
import capsule_nb as cpsl

@cpsl.task(process=True)
def report(n):
    return n * 2

handle = report.submit(21)
print(handle.task_id)
if len(sys.argv) > 1:
    import asyncio
    print(asyncio.run(cpsl.get_task(sys.argv[1]).result(timeout=60)))
""")
    env = {**os.environ, "CAPSULE_NB_HOME": str(tmp_path / "store")}
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    task_id = first.stdout.split()[0]
    second = subprocess.run([sys.executable, str(script), task_id], capture_output=True, text=True, timeout=120,
                            env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[1] == "42"
