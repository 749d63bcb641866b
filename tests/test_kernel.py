"""capsule_nb in a real ipykernel, driven over ZMQ by jupyter_client.

One kernel serves the whole module (``kernel`` fixture); each test defines
tasks of its own names. Every wait is on a condition with a deadline: an
iopub message arriving, a cell going idle, a record reaching a status on
disk. Only the cells that stand for a busy user block with ``time.sleep``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from capsule_nb.cli import main
from capsule_nb.demo import find_notebook, kernel_env, run_notebook

from .kernels import kernel_manager
from capsule_nb.store import Store

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ harness


class Cell:
    """What the kernel sent on iopub for one execute request (a live view: late messages count)."""

    def __init__(self, kernel: "Kernel", msg_id: str):
        self.kernel = kernel
        self.msg_id = msg_id

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.kernel.by_parent.get(self.msg_id, [])

    def _of(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] == msg_type]

    def stream(self, name: str = "stdout") -> str:
        return "".join(m["content"]["text"] for m in self._of("stream") if m["content"]["name"] == name)

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def displays(self) -> list[str]:
        """``text/plain`` of each display_data sent under this cell, in order."""
        return [m["content"]["data"].get("text/plain", "") for m in self._of("display_data")]

    @property
    def results(self) -> list[str]:
        return [m["content"]["data"].get("text/plain", "") for m in self._of("execute_result")]

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self._of("error")
        return errors[0]["content"] if errors else None

    @property
    def busy(self) -> bool:
        return self.kernel.state(self.msg_id) == "busy"

    @property
    def done(self) -> bool:
        return self.kernel.state(self.msg_id) == "idle"

    def index(self, predicate: Callable[[dict[str, Any]], bool]) -> int:
        """Position in the kernel's whole iopub log of the first of this cell's messages matching."""
        for i, m in enumerate(self.kernel.log):
            if m["parent_header"].get("msg_id") == self.msg_id and predicate(m):
                return i
        raise AssertionError(f"no such message under cell {self.msg_id}")


class Kernel:
    """A kernel and a client that records every iopub message, grouped by parent msg_id."""

    def __init__(self, home: Path, cwd: Path):
        self.home = home
        self.km = kernel_manager()
        self.km.start_kernel(env=kernel_env(home), cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.log: list[dict[str, Any]] = []
        self.by_parent: dict[str, list[dict[str, Any]]] = {}
        self.setup: Cell | None = None

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)  # graceful: the kernel's exit hooks run

    def pump(self, timeout: float = 0.05) -> None:
        """Fold in what iopub has sent (waiting up to ``timeout`` for the first message)."""
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                return
            self.log.append(msg)
            self.by_parent.setdefault(msg["parent_header"].get("msg_id"), []).append(msg)
            timeout = 0

    def state(self, msg_id: str) -> str | None:
        states = [m["content"]["execution_state"] for m in self.by_parent.get(msg_id, [])
                  if m["msg_type"] == "status"]
        return states[-1] if states else None

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what or predicate}")
            if not self.km.is_alive():
                raise AssertionError(f"the kernel died while waiting for: {what or predicate}")
            self.pump()

    def send(self, code: str, cell: str | None = None) -> Cell:
        """Start executing ``code``; returns at once. ``cell``: the notebook cell id JupyterLab
        and Notebook 7 send with each execution (``metadata.cellId``)."""
        if cell is None:
            return Cell(self, self.kc.execute(textwrap.dedent(code), allow_stdin=False))
        content = {"code": textwrap.dedent(code), "silent": False, "store_history": True,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
        msg = self.kc.session.msg("execute_request", content, metadata={"cellId": cell})
        self.kc.shell_channel.send(msg)
        return Cell(self, msg["header"]["msg_id"])

    def finish(self, cell: Cell, timeout: float = 30, allow_error: bool = False) -> Cell:
        self.wait_for(lambda: cell.done, timeout, f"cell {cell.msg_id} to finish")
        if cell.error and not allow_error:
            raise AssertionError("cell raised:\n" + "\n".join(cell.error["traceback"]))
        return cell

    def run(self, code: str, timeout: float = 30, allow_error: bool = False, cell: str | None = None) -> Cell:
        return self.finish(self.send(code, cell), timeout, allow_error)

    def value(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate ``expression`` (``await`` allowed) in the kernel; its JSON comes back."""
        cell = self.run(f"print('\\x00' + __import__('json').dumps({expression}, default=str))", timeout)
        return json.loads(cell.stdout.rsplit("\x00", 1)[1])


def disk_record(home: Path, task_id: str) -> dict[str, Any] | None:
    """The run's record as another process reads it from the store on disk."""
    store = Store(home)
    try:
        return store.get_run(task_id)
    finally:
        store.close()


def wait_on_disk(kernel: Kernel, task_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        record = disk_record(kernel.home, task_id)
        return record if record is not None and record["status"] in statuses else None

    return kernel.wait_for(reached, timeout, f"run {task_id} to be {statuses} on disk")


@contextlib.contextmanager
def loaded_kernel(tmp_path_factory: pytest.TempPathFactory, name: str, setup: str) -> Iterator[Kernel]:
    """A test module's kernel: a store and folder of its own, ``setup`` (which loads the extension) run first."""
    base = tmp_path_factory.mktemp(name)
    k = Kernel(base / "store", cwd=base)
    try:
        k.setup = k.run(setup)
        yield k
    finally:
        k.close()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    with loaded_kernel(tmp_path_factory, "kernel", """
        %load_ext capsule_nb
        import asyncio, json, logging, os, sys, threading, time
        import capsule_nb as cpsl
        """) as k:
        yield k


# -------------------------------------------------------------------- tests


def test_load_ext_binds_the_extension_and_the_session(kernel: Kernel) -> None:
    assert kernel.setup is not None and kernel.setup.error is None
    facts = kernel.value(
        """{
        "loaded": "capsule_nb" in get_ipython().extension_manager.loaded,
        "magics": sorted(m for m in ("tasks", "task", "capsule") if m in get_ipython().magics_manager.magics["line"]),
        "session": type(session).__name__,
        "cpsl": cpsl.__name__,
        }"""
    )
    assert facts == {"loaded": True, "magics": ["capsule", "task", "tasks"], "session": "Session",
                     "cpsl": "capsule_nb"}


def test_async_and_sync_tasks_with_and_without_await(kernel: Kernel) -> None:
    kernel.run(
        """
        @cpsl.task
        async def add(x, y=2):
            await asyncio.sleep(0.05)
            return x + y

        square_gate = threading.Event()

        @cpsl.task()
        def slow_square(x):
            square_gate.wait(30)
            return {"square": x * x, "thread": threading.current_thread().name}

        h_add = await add.submit(1, y=41)
        h_sq = slow_square.submit(7)
        """
    )
    assert kernel.value("[type(h_add).__name__, type(h_sq).__name__]") == ["TaskHandle", "TaskHandle"]
    assert kernel.value("await h_sq.status()") in ("pending", "running")
    kernel.run("square_gate.set()")
    assert kernel.value("await h_sq.wait(30)") == "completed"
    assert kernel.value("await h_sq.status()") == "completed"
    assert kernel.value("await h_add.result(30)") == 42
    result = kernel.value("await h_sq.result()")
    assert result["square"] == 49 and result["thread"].startswith("capsule-task")
    record = kernel.value("h_sq.snapshot()")
    assert record["task_name"] == "slow_square" and record["status"] == "completed"
    assert record["attempt"] == 1 and record["params"] == {"x": 7} and record["result"] == result
    assert record["started_at"] <= record["completed_at"]
    assert kernel.value("h_add.snapshot()['params']") == {"x": 1, "y": 41}
    # The await forgotten (w51): the cell says what to write, not "<coroutine object ...>".
    for what in ("result", "wait"):
        (shown,) = kernel.run(f"h_add.{what}()").results
        assert shown == f"<{what}() of run {kernel.value('h_add.task_id')}, not awaited: write `await h.{what}()` " \
                        f"(in a script, `asyncio.run(h.{what}())`)>"
    assert kernel.run("asyncio.sleep(0)").results[0].startswith("<coroutine object sleep at")  # others as ever
    assert "not awaited" in kernel.run("forgotten = h_add.result()\nforgotten").results[0]
    assert kernel.value("await forgotten") == 42  # still the coroutine it was: awaited later, it gives the value


def test_sync_task_finishes_while_a_cell_blocks_the_kernel(kernel: Kernel, tmp_path: Path) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    submitting = kernel.run(
        f"""
        @cpsl.task
        def grind(steps, session=None):
            _until = time.monotonic() + 30
            while not os.path.exists({str(started)!r}) and time.monotonic() < _until:
                time.sleep(0.01)  # do the work only once the blocking cell holds the kernel
            done = 0
            for _ in range(steps):
                time.sleep(0.02)
                done += 1
            session.reply(f"ground {{done}} steps")
            return done

        h_grind = grind.submit(25, session=session)
        """
    )
    task_id = kernel.value("h_grind.task_id")
    # A user's long blocking cell: it holds the kernel's main thread and loop until we release it.
    blocking = kernel.send(
        f"""
        open({str(started)!r}, "w").close()
        _until = time.monotonic() + 60
        while not os.path.exists({str(release)!r}) and time.monotonic() < _until:
            time.sleep(0.02)
        print("released")
        """
    )
    try:
        kernel.wait_for(lambda: blocking.busy, 10, "the blocking cell to start")
        record = wait_on_disk(kernel, task_id, {"completed", "failed", "timeout", "cancelled"})
        kernel.wait_for(lambda: "ground 25 steps" in submitting.displays, 10, "the reply under the submitting cell")
        kernel.pump()
        assert blocking.busy, "the blocking cell ended before the run finished: the test proves nothing"
    finally:
        release.touch()
    assert record["status"] == "completed" and record["result"] == 25
    assert kernel.finish(blocking).stdout == "released\n" and blocking.displays == []
    assert kernel.value("[h_grind.snapshot()['status'], await h_grind.result()]") == ["completed", 25]


def test_capsule_code_replies_under_the_cell_that_submitted_it(kernel: Kernel) -> None:
    kernel.run(
        """
        @cpsl.task(retries=1, timeout=120)
        async def build_report(session: cpsl.Session | None = None, report_id="daily", duration=5):
            await session.notify(f"Building the {report_id} report", detail=f"{duration} sections")
            for section in range(duration):
                await asyncio.sleep(0.2)
            await session.reply(f"Report {report_id} is ready ({duration} sections)")
            return {"report_id": report_id, "sections": duration}
        """
    )
    submitting = kernel.send(
        """
        handle = await build_report.submit(session=session, report_id="daily")
        await session.show_task(handle, message="Building the daily report")
        """
    )
    later = kernel.send("print(await handle.wait(60))")  # queued: it runs as soon as the first is done
    kernel.finish(submitting)

    def reply_in(cell: Cell) -> bool:
        return any("Report daily is ready" in text for text in cell.displays)

    kernel.wait_for(lambda: reply_in(submitting), 30, "the reply under the submitting cell")
    kernel.finish(later)
    assert later.stdout == "completed\n"
    assert not reply_in(later) and "Report daily" not in later.stdout
    # The reply arrived while the later cell was executing, yet went to the submitting cell.
    def is_reply(m: dict[str, Any]) -> bool:
        return m["msg_type"] == "display_data" and "Report daily is ready" in str(m["content"])

    def state(name: str) -> Callable[[dict[str, Any]], bool]:
        return lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == name

    assert later.index(state("busy")) < submitting.index(is_reply) < later.index(state("idle"))
    displays = submitting.displays
    assert any(text.startswith("[notify] Building the daily report") for text in displays)
    assert any("Building the daily report [" in text for text in displays), displays  # the task card
    record = kernel.value("handle.snapshot()")
    assert record["status"] == "completed" and record["result"] == {"report_id": "daily", "sections": 5}
    assert record["session_id"] == kernel.value("session.id")
    assert [m["kind"] for m in record["messages"]] == ["notify", "reply"]


def test_task_output_stays_out_of_later_cells_and_is_stored(kernel: Kernel) -> None:
    kernel.run(
        """
        go_async, go_thread = asyncio.Event(), threading.Event()

        @cpsl.task
        async def chatty_async(n):
            await go_async.wait()
            for i in range(n):
                print(f"async-chatter {i}")
                await asyncio.sleep(0.02)
            return n

        @cpsl.task
        def chatty_thread(n):
            go_thread.wait(30)
            for i in range(n):
                print(f"thread-chatter {i}", flush=True)
                print(f"thread-err {i}", file=sys.stderr)
                logging.getLogger("chatty").warning("thread-log %d", i)
                time.sleep(0.02)
            return n

        h_ca = chatty_async.submit(10)
        h_ct = chatty_thread.submit(10)
        """
    )
    # A sync cell that is busy while the thread task prints, then an async one while the async task does.
    sync_cell = kernel.run(
        """
        go_thread.set()
        print("sync cell output")
        _until = time.monotonic() + 30
        while h_ct.snapshot()["status"] not in ("completed", "failed") and time.monotonic() < _until:
            time.sleep(0.01)
        """
    )
    async_cell = kernel.run("go_async.set(); print('async cell output'); print(await h_ca.wait(30), await h_ct.wait(30))")
    kernel.pump()
    assert sync_cell.stdout == "sync cell output\n" and sync_cell.stream("stderr") == ""
    assert async_cell.stdout == "async cell output\ncompleted completed\n"
    leaked = [m for m in kernel.log if m["msg_type"] == "stream" and "chatter" in m["content"]["text"]]
    assert leaked == []
    outputs = kernel.value(
        "{n: [[o['stream'], o['text']] for o in h.snapshot()['output']] for n, h in (('a', h_ca), ('t', h_ct))}"
    )
    async_text = "".join(text for _, text in outputs["a"])
    assert async_text == "".join(f"async-chatter {i}\n" for i in range(10))
    by_stream: dict[str, str] = {}
    for stream, text in outputs["t"]:
        by_stream[stream] = by_stream.get(stream, "") + text
    assert by_stream["stdout"] == "".join(f"thread-chatter {i}\n" for i in range(10))
    assert by_stream["stderr"] == "".join(f"thread-err {i}\n" for i in range(10))
    assert "thread-log 9" in by_stream["log"]


def test_logging_basicconfig_in_a_cell_works_once_the_extension_is_loaded(kernel: Kernel) -> None:
    """A notebook's usual first lines about logging, after ``%load_ext capsule_nb`` and a
    run: ``basicConfig`` used to do nothing, because capsule_nb's capture was a handler on
    the root logger. A run's records still stay with the run, out of the cell."""
    kernel.run(
        """
        import logging

        @cpsl.task
        def logs_a_step(step):
            logging.getLogger("app.task").info("step %s", step)
            return step

        await logs_a_step.submit(0).wait(30)
        """
    )
    cell = kernel.run(
        """
        logging.basicConfig(level=logging.INFO, format="%(levelname)s|%(name)s|%(message)s")
        logging.getLogger("app").info("info from the cell")
        h_log = logs_a_step.submit(1)
        print(await h_log.wait(30))
        """
    )
    kernel.wait_for(lambda: cell.done, what="the logging cell")
    kernel.pump()
    assert cell.stream("stderr") == "INFO|app|info from the cell\n"
    assert cell.stdout == "completed\n"
    kept = kernel.value("[o['text'] for o in h_log.snapshot()['output'] if o['stream'] == 'log']")
    assert kept == ["INFO app.task: step 1\n"]
    kernel.run("logging.root.handlers.clear(); logging.root.setLevel(logging.WARNING)")


def test_current_session_in_a_cell_and_in_tasks(kernel: Kernel) -> None:
    kernel.run(
        """
        @cpsl.task
        async def who_async():
            s = cpsl.current_session()
            return [s.id, s is session]

        @cpsl.task
        def who_sync():
            s = cpsl.current_session()
            return [s.id, s is session]
        """
    )
    notebook_id = kernel.value("session.id")
    assert kernel.value("[cpsl.current_session() is session, cpsl.current_session().id]") == [True, notebook_id]
    bound = kernel.value(
        "[await who_async.submit(session=session).result(), await who_sync.submit(session=session).result()]"
    )
    assert bound == [[notebook_id, True], [notebook_id, True]]
    unbound = kernel.value("[await who_async.submit().result(), await who_sync.submit().result()]")
    for session_id, is_notebook in unbound:
        assert session_id.startswith("owner:") and is_notebook is False


def test_magics_show_the_store_the_board_and_a_card(kernel: Kernel) -> None:
    kernel.run(
        """
        @cpsl.task
        def magic_probe():
            return "probed"

        h_probe = magic_probe.submit()
        await h_probe.wait(30)
        """
    )
    task_id = kernel.value("h_probe.task_id")
    capsule = kernel.run("%capsule")
    assert str(kernel.home.resolve()) in capsule.stdout
    assert "runs" in capsule.stdout and "completed" in capsule.stdout

    tasks = kernel.run("%tasks")
    board = "\n".join(tasks.displays) + tasks.stdout
    assert "magic_probe" in board and task_id in board and "Completed" in board
    one_task = "\n".join(kernel.run("%tasks build_report").displays)  # a board of one task's runs
    assert "build_report" in one_task and "magic_probe" not in one_task
    typo = kernel.run("%tasks magic_prob")  # an empty board said nothing of the typo
    assert "no task named 'magic_prob'" in typo.stdout and "magic_probe" in typo.stdout
    assert "usage: %tasks [task_name]" in kernel.run("%tasks --status failed").stdout

    card = "\n".join(kernel.run("%task {h_probe.task_id}").displays)
    assert "magic_probe" in card and task_id in card and "[completed]" in card and "probed" in card
    by_its_end = "\n".join(kernel.run(f"%task {task_id[-6:]}").displays)  # as a board's card shows the id
    assert "magic_probe" in by_its_end and task_id in by_its_end

    shown = kernel.run("h_probe")  # a cell ending in a handle: its live card (it was frozen text, w47)
    (result,) = [m["content"]["data"] for m in shown.messages if m["msg_type"] == "execute_result"]
    assert "application/vnd.jupyter.widget-view+json" in result
    assert result["text/plain"].startswith("magic_probe [completed]") and "(as of " in result["text/plain"]

    missing = kernel.run("%task 0000nope")
    assert "no run '0000nope'" in missing.stdout
    assert "usage: %task <task id>" in kernel.run("%task").stdout


def test_show_task_shows_the_card_once(kernel: Kernel) -> None:
    kernel.run("@cpsl.task\ndef card_probe():\n    return 1\n\nh_card = card_probe.submit()\nawait h_card.wait(30)")
    awaited = kernel.run("await session.show_task(h_card, message='Card probe')")
    plain = kernel.run("session.show_task(h_card)")
    assert len(awaited.displays) == 1 and len(plain.displays) == 1
    assert awaited.results == [] and plain.results == []


def test_a_process_task_failing_in_a_cell_function_shows_the_cell_and_its_line(kernel: Kernel) -> None:
    """A thread task's traceback names the cell's file and shows the failing line; a
    ``process=True`` one said only ``File "<dynamic-code>", line 4, in checked_ratio``
    (cloudpickle renames the code it sends by value), so nobody could tell where it failed."""
    kernel.run(
        """
        def checked_ratio_body(a, b):
            scaled = a * 10
            return scaled / b  # the failing line

        @cpsl.task(process=True)
        def checked_ratio(a, b):
            return checked_ratio_body(a, b)

        @cpsl.task
        def checked_ratio_in_thread(a, b):
            return checked_ratio_body(a, b)

        h_ratios = [checked_ratio.submit(1, 0), checked_ratio_in_thread.submit(1, 0)]
        _ = [await h.wait(60) for h in h_ratios]
        """, timeout=90,
    )
    in_process, in_thread = kernel.value("[h.snapshot()['traceback'] for h in h_ratios]")
    assert "ZeroDivisionError" in in_process and "<dynamic-code>" not in in_process
    assert "return scaled / b  # the failing line" in in_thread  # what a process run must match
    cell_file = in_thread.split('File "')[-1].split('"')[0]  # the cell's file, as ipykernel names it
    assert f'File "{cell_file}"' in in_process
    assert "return scaled / b  # the failing line" in in_process
    assert "return checked_ratio_body(a, b)" in in_process


def test_reload_ext_while_a_task_runs_leaves_no_error_behind(kernel: Kernel) -> None:
    kernel.run(
        """
        @cpsl.task
        async def outlives_reload():
            await asyncio.sleep(0.3)
            return "done"

        h_outlives = outlives_reload.submit()
        await asyncio.sleep(0.05)
        """
    )
    cell = kernel.run(
        """
        %reload_ext capsule_nb
        _bodies = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_async_body"]
        await asyncio.wait(_bodies, timeout=10)
        print(json.dumps([h_outlives.snapshot()["status"], [repr(t.exception()) for t in _bodies]]))
        """
    )
    status, errors = json.loads(cell.stdout)
    assert status in ("failed", "cancelled") and errors == ["None"]


def test_the_notebooks_session_follows_configure_home_to_the_new_store(tmp_path: Path) -> None:
    """The docs say: ``configure(home=...)`` first. The ``session`` that ``%load_ext`` put in
    the namespace kept the old app's: its documents and data went to the old store."""
    k = Kernel(tmp_path / "old", cwd=tmp_path)
    try:
        k.run(f"""
            %load_ext capsule_nb
            cpsl.configure(home={str(tmp_path / "new")!r})
            await session.db.things.insert_one({{"a": 1}})
            session.data["seen"] = True
            """)
        facts = k.value('{"same": cpsl.current_session() is session, '
                        '"count": cpsl.configure().collection("things").count()}')
    finally:
        k.close()
    assert facts == {"same": True, "count": 1}
    old = Store(tmp_path / "old")
    try:
        assert old.docs("things") == []
    finally:
        old.close()


def test_kernel_shutdown_records_running_work_as_interrupted(tmp_path: Path) -> None:
    k = Kernel(tmp_path / "store", cwd=tmp_path)
    try:
        k.run(
            """
            import threading
            import capsule_nb as cpsl  # a plain import, no %load_ext: exit still records the run

            @cpsl.task
            def forever():
                # Blocks in one call: at exit IPython clears the namespace, and a task that then
                # trips over a missing global would hit the _finish-after-shutdown bug (see the
                # %reload_ext test) and have its "interrupted" overwritten.
                threading.Event().wait()

            h_forever = forever.submit()
            """
        )
        task_id = k.value("h_forever.task_id")
        wait_on_disk(k, task_id, {"running"})
    finally:
        k.close()
    record = disk_record(k.home, task_id)
    assert record is not None
    assert record["status"] == "failed" and record["error"] == "interrupted"


def test_a_kernel_shut_down_after_process_runs_exits_by_itself_having_recorded_them(tmp_path: Path) -> None:
    """At a shutdown ipykernel ends the children of its process group one signal after another,
    and multiprocessing's resource tracker (there once a process run was made) ignores SIGTERM:
    the kernel waited for it, then its manager killed it, its exit handlers never run. Now the
    kernel closes its apps and stops those helpers when told to shut down: it exits by itself,
    its live runs are recorded by it, and none of its children is left."""
    import psutil

    home = tmp_path / "store"
    k = Kernel(home, cwd=tmp_path)
    try:
        k.run("import math, threading\nimport capsule_nb as cpsl\n"
              "root = cpsl.task(process=True)(math.sqrt)\n"
              "assert await root.submit(4.0).result(timeout=60) == 2.0\n"
              "@cpsl.task\ndef hang():\n    threading.Event().wait()\n"
              "h_hang = hang.submit()")
        task_id = k.value("h_hang.task_id")
        wait_on_disk(k, task_id, {"running"})
        kernel_process = k.km.provisioner.process
        children = psutil.Process(kernel_process.pid).children(recursive=True)
        assert children  # the forkserver, its resource tracker and a worker
    finally:
        k.close()
    assert kernel_process.returncode == 0  # it exited; it was not killed (-15)
    record = disk_record(home, task_id)
    assert (record["status"], record["error"]) == ("failed", "interrupted")  # recorded by the kernel itself
    assert [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []


def test_a_kernel_shutdown_leaves_a_process_run_interrupted_and_its_key_held_while_it_runs(tmp_path: Path) -> None:
    """A shutdown or restart from Jupyter makes ipykernel end the children in its process
    group, the forkserver among them, but not a worker (it leads a group of its own), which
    runs on until the kernel is gone. So the run ends ``interrupted``, not as a crash of its
    worker, and a run queued on its key in another process starts only once that body has
    stopped."""
    from .conftest import until_sync
    from .test_durability import lines_until, spawn

    beats, home = tmp_path / "beats", tmp_path / "store"
    task = f"""
        @cpsl.task(process=True, lock="one-at-a-time", on_lock="queue")
        def beating(tag):
            while True:
                with open({str(beats)!r}, "a") as fh:
                    fh.write(f"{{tag}} {{time.time()}}\\n")
                time.sleep(0.01)
        """
    k = Kernel(home, cwd=tmp_path)
    try:
        k.run("import time\nimport capsule_nb as cpsl\n" + textwrap.dedent(task) + "h_beating = beating.submit('kernel')")
        task_id = k.value("h_beating.task_id")
        wait_on_disk(k, task_id, {"running"})
        waiting = spawn(textwrap.dedent(task).replace("@cpsl.task", "@app.task") + textwrap.dedent("""
            h = beating.submit("other")
            app.store.flush()
            print(h.status(), flush=True)
            print("queued", flush=True)
            threading.Event().wait()
            """), home)
        assert lines_until(waiting, "queued") == ["pending"]
    finally:
        k.close()
    record = until_sync(lambda: (r := disk_record(home, task_id)) and r["status"] != "running" and r,
                        timeout=30, what="the run to be settled")  # by the other process, if the kernel was ended
    assert (record["status"], record["error"]) == ("failed", "interrupted")

    def spans() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {}
        for line in beats.read_text().splitlines():
            tag, _, at = line.partition(" ")
            if at:
                times.setdefault(tag, []).append(float(at))
        return times

    until_sync(lambda: "other" in spans(), timeout=30, what="the run queued on the key to start")
    assert max(spans()["kernel"]) < min(spans()["other"])  # the two bodies never overlapped


def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    path = find_notebook()
    assert json.loads(path.read_text()) == json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
    nb = run_notebook(path, tmp_path / "store", timeout=60, cwd=tmp_path)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "Crunching numbers [" in text  # the task card
    assert "completed attempt 1 of 1" in text
    assert "parse_feed failed: ValueError" in text
    store = Store(tmp_path / "store")
    try:
        statuses = sorted((r["task_name"], r["status"]) for r in store.runs())
    finally:
        store.close()
    assert statuses == [("crunch", "completed"), ("fetch_quote", "completed"), ("parse_feed", "failed")]


def test_quickstart_notebook_has_no_saved_outputs() -> None:
    nb = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_demo_command_runs_the_quickstart(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CAPSULE_NB_HOME"}
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("fetch_quote", "crunch", "parse_feed"):
        assert name in out
    assert "[completed]" in out and "[failed]" in out
    assert "reply: Crunched 8 steps" in out and "ValueError" in out
    assert not (tmp_path / ".capsule").exists()  # the demo's store is a temporary one
    assert "store   a temporary one, removed at the end (--home PATH keeps it)" in out  # (it printed a path now gone)


def test_demo_command_fails_when_the_notebook_fails(tmp_path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('broken on purpose')")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "demo", "--notebook", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "broken on purpose" in done.stderr


def test_cli_needs_a_command_and_an_existing_notebook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert main(["demo", "--notebook", str(tmp_path / "missing.ipynb")]) == 2
    assert "no notebook at" in capsys.readouterr().err
