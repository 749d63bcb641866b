"""kill -9 a real kernel in the middle of everything; a new kernel finds nothing stuck."""

import os
import signal

import pytest

import capsule_nb as cpsl
from ..kernels import kernel_manager

from ..conftest import until_sync

jupyter_client = pytest.importorskip("jupyter_client")

SETUP = """
%load_ext capsule_nb
import asyncio, os, threading, time

@cpsl.task(lock="sync:{name}")
def thread_job(name):
    threading.Event().wait()

@cpsl.task(lock="async:{name}", retries=1)
async def async_job(name):
    await asyncio.Event().wait()

@cpsl.task(process=True, lock="proc:{name}")
def process_job(name, path):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        time.sleep(0.05)

@cpsl.task
def later(tag):
    session.db.fired.insert_one({"tag": tag, "pid": os.getpid()})

handles = [thread_job.submit("a"), async_job.submit("b"), process_job.submit("c", PIDFILE)]
soon = later.schedule(delay="3s", tag="soon")
while not all(h.snapshot()["status"] == "running" for h in handles) or not os.path.exists(PIDFILE):
    await asyncio.sleep(0.01)
cpsl.configure().store.flush()
print(*(h.task_id for h in handles), soon.task_id, os.getpid())
"""


def start(home):
    manager = kernel_manager()
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": str(home)})
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return manager, client


def run(client, code, timeout=60):
    out = []
    reply = client.execute_interactive(code, timeout=timeout,
                                       output_hook=lambda m: out.append(m["content"].get("text", "")))
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


def test_sigkill_with_locks_thread_async_process_and_scheduled_runs(tmp_path):
    home, pidfile = tmp_path / "store", tmp_path / "child.pid"
    manager, client = start(home)
    try:
        out = run(client, f"PIDFILE = {str(pidfile)!r}\n" + SETUP)
        thread_id, async_id, process_id, soon_id, kernel_pid = out.split()
        child_pid = int(pidfile.read_text())
        os.kill(int(kernel_pid), signal.SIGKILL)
        until_sync(lambda: not manager.is_alive(), timeout=30)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    # the worker process of the dead kernel does not outlive it
    until_sync(lambda: not os.path.exists(f"/proc/{child_pid}") or
               open(f"/proc/{child_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=10)

    manager, client = start(home)  # the next kernel on the same store
    try:
        run(client, """
%load_ext capsule_nb
import os
@cpsl.task
def later(tag):
    session.db.fired.insert_one({"tag": tag, "pid": os.getpid()})
""")
        app = cpsl.App(home=home)
        get = lambda task_id: app.get_task(task_id).snapshot()  # noqa: E731
        assert get(thread_id)["status"] == "failed" and get(thread_id)["error"] == "interrupted"
        assert get(process_id)["status"] == "failed" and get(process_id)["error"] == "interrupted"
        assert get(async_id)["status"] == "retry"  # an attempt left: resumable
        until_sync(lambda: app.collection("fired").count() == 1, timeout=30)
        # the new kernel records the run as completed just after the task body wrote its document
        until_sync(lambda: app.get_task(soon_id).status() == "completed", timeout=30)
        for key in ("sync:a", "async:b", "proc:c"):  # no lock stays held
            holder = (app.store.get(f"lock/{key}") or {}).get("task_id")
            assert holder is None or app.store.get_run(holder)["status"] != "running"

        @app.task(lock="sync:{name}", on_lock="reject")
        def thread_job(name):
            return "free"

        assert thread_job.submit("a").task_id != thread_id
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
