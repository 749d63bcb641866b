"""A real ipykernel killed with SIGKILL leaves nothing stuck: its runs are recovered."""

import os
import signal
import sys

import pytest

import capsule_nb as cpsl

from .conftest import until_sync

jupyter_client = pytest.importorskip("jupyter_client")


def execute(client, code: str, timeout: float = 30) -> str:
    """Run ``code`` in the kernel and return its stdout (raising on an error)."""
    msg_id = client.execute(code)
    out = []
    while True:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            raise AssertionError("\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(out)


def test_sigkill_of_a_kernel_recovers_its_runs_and_lock(tmp_path):
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": str(tmp_path)})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        output = execute(client, """
%load_ext capsule_nb
import threading, time, os
@cpsl.task(lock="nightly")
def stuck():
    threading.Event().wait()

@cpsl.task
async def quick():
    return "kept"

q = await quick.submit()
await q.wait(10)
h = await stuck.submit()
while h.snapshot()["status"] != "running":
    time.sleep(0.01)
cpsl.configure().store.flush()
print(h.task_id, q.task_id, os.getpid())
""")
        stuck_id, quick_id, pid = output.split()
        os.kill(int(pid), signal.SIGKILL)
        until_sync(lambda: not manager.is_alive(), timeout=30)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    app = cpsl.App(home=tmp_path)
    record = app.get_task(stuck_id).snapshot()
    assert record["status"] == "failed" and record["error"] == "interrupted"
    assert app.get_task(quick_id).snapshot()["result"] == "kept"

    @app.task(lock="nightly", on_lock="reject")
    def stuck():
        return "free again"

    handle = stuck.submit()  # the dead kernel's lock does not block the key
    until_sync(lambda: handle.snapshot()["status"] == "completed")
