"""The process pool and the Dask backend, against real processes (not through tasks)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import capsule_nb as cpsl
from capsule_nb.engine.executors import forward_to
from capsule_nb.workers.outcome import JobKilled, WorkerCrashed
from capsule_nb.workers.pickling import check_picklable
from capsule_nb.workers.pool import ProcessPool

from .conftest import process_gone, until_sync, worker_pids


@pytest.fixture(scope="module")
def pool():
    p = ProcessPool(max_workers=2)
    yield p
    p.shutdown()


class Recorder:
    """An on_message that keeps every call and can wait for one."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self._cond = threading.Condition()

    def __call__(self, kind: str, data: dict) -> None:
        with self._cond:
            self.calls.append((kind, data))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for call in self.calls:
                    if predicate(*call):
                        return call
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such message within {timeout}s; got {self.calls}")
                self._cond.wait(left)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def notebook(source: str) -> dict:
    """Run ``source`` as a notebook cell would: its functions live in ``__main__``, not in a module."""
    namespace = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), "<cell>", "exec"), namespace)
    return namespace


def started_and_printing(recorder: Recorder) -> None:
    recorder.wait_for(lambda kind, data: kind == "capture" and "running" in data["text"])


# --------------------------------------------------------------------------- #
# Running, by value, reused
# --------------------------------------------------------------------------- #


def test_notebook_function_with_closure_and_globals_runs_in_another_pid(pool):
    cell = notebook(
        """
        import os
        RATE = 3

        def helper(x):
            return x * RATE

        def make(offset):
            def task(x):
                return helper(x) + offset, os.getpid()
            return task
        """
    )
    task = cell["make"](100)
    assert task.__module__ == "__main__"
    outcome = pool.run(task, (2,)).wait(30)
    assert outcome.ok, outcome.error
    value, pid = outcome.value
    assert value == 106
    assert pid != os.getpid() and pid == outcome.pid


def test_small_jobs_reuse_the_same_worker(pool):
    pids = [pool.run(os.getpid).wait(30).value for _ in range(5)]
    assert len(set(pids)) == 1
    assert pids[0] in worker_pids(pool)


def test_async_function_is_run_to_completion(pool):
    cell = notebook(
        """
        import asyncio
        async def fetch(x):
            await asyncio.sleep(0)
            return x + 1
        """
    )
    assert pool.run(cell["fetch"], (41,)).wait(30).value == 42


def test_exception_comes_back_with_the_childs_traceback(pool):
    cell = notebook(
        """
        def parse(text):
            return int(text)
        def task(text):
            return parse(text)
        """
    )
    outcome = pool.run(cell["task"], ("x",)).wait(30)
    assert outcome.kind == "error"
    assert outcome.error_type == "ValueError"
    assert "invalid literal" in outcome.message
    assert isinstance(outcome.exception, ValueError)
    assert "in parse" in outcome.traceback and "in task" in outcome.traceback
    assert outcome.error.startswith("ValueError: invalid literal")


def test_two_jobs_run_at_once_in_two_processes(pool, tmp_path):
    jobs = [pool.run(_meet, (str(tmp_path), 2)) for _ in range(2)]  # each returns only once both run
    assert len({job.wait(30).value for job in jobs}) == 2


def _meet(folder: str, count: int) -> int:
    open(os.path.join(folder, str(os.getpid())), "w").close()
    _until_file(lambda: len(os.listdir(folder)) >= count)
    return os.getpid()


def _until_file(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the other side never came")
        time.sleep(0.005)


# --------------------------------------------------------------------------- #
# Crashes
# --------------------------------------------------------------------------- #


def test_segfault_fails_the_job_with_the_signal_and_where_it_happened(pool):
    outcome = pool.run(ctypes.string_at, (0,)).wait(30)
    assert outcome.kind == "crashed"
    assert outcome.message == "worker process died: killed by SIGSEGV"
    assert isinstance(outcome.exception, WorkerCrashed)
    assert "Segmentation fault" in outcome.traceback and "string_at" in outcome.traceback
    assert process_gone(outcome.pid)
    assert pool.run(sum, ([1, 2],)).wait(30).value == 3


def test_os_exit_fails_the_job_with_the_exit_code(pool):
    outcome = pool.run(os._exit, (3,)).wait(30)
    assert outcome.kind == "crashed"
    assert outcome.message == "worker process died: exited with code 3"
    assert outcome.exitcode == 3
    assert pool.run(sum, ([1, 2],)).wait(30).value == 3


def test_memory_limit_fails_the_job_and_the_worker_is_replaced(pool):
    outcome = pool.run(bytearray, (512 * 2**20,), memory_limit=64 * 2**20).wait(30)
    assert outcome.kind == "error"
    assert outcome.error_type == "MemoryError"
    assert "memory limit of 64 MiB exceeded" in outcome.message
    until_sync(lambda: process_gone(outcome.pid))  # a worker that ran out of memory is not reused
    after = pool.run(os.getpid).wait(30)
    assert after.ok and after.value != outcome.pid
    # the limit was for that job only: the same size works without one
    assert pool.run(len, (bytearray(1),)).wait(30).value == 1
    assert pool.run(_allocate, (128 * 2**20,)).wait(30).value == 128 * 2**20


def _allocate(n: int) -> int:
    return len(bytearray(n))


def test_a_crash_leaves_jobs_in_flight_alone(pool, tmp_path):
    recorder = Recorder()
    go_on = tmp_path / "go-on"
    slow = pool.run(_print_then_wait_for, (str(go_on),), on_message=recorder)
    started_and_printing(recorder)
    crash = pool.run(os._exit, (7,))
    assert crash.wait(30).kind == "crashed"
    assert not slow.done()
    go_on.touch()
    assert slow.wait(30).value == "went on"


def _print_then_wait_for(path: str) -> str:
    print("running", flush=True)
    _until_file(lambda: os.path.exists(path))
    return "went on"


def _print_then_sleep(seconds: float) -> str:
    print("running", flush=True)
    time.sleep(seconds)
    return "slept"


# --------------------------------------------------------------------------- #
# Kill
# --------------------------------------------------------------------------- #


def test_kill_ends_the_job_within_a_second_and_leaves_no_process(pool):
    recorder = Recorder()
    job = pool.run(_sleep_with_a_grandchild, on_message=recorder)
    _, data = recorder.wait_for(lambda kind, data: kind == "capture" and "running" in data["text"])
    grandchild = int(data["text"].split()[1])
    worker = job.pid
    started = time.monotonic()
    assert job.kill("timeout") is True
    outcome = job.wait(timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert outcome.kind == "killed" and outcome.reason == "timeout"
    assert isinstance(outcome.exception, JobKilled)
    assert process_gone(worker)  # reaped before wait() returned
    until_sync(lambda: process_gone(grandchild), timeout=1.0)  # its process group went with it
    assert job.kill("again") is False
    assert pool.run(os.getpid).wait(30).ok


def _sleep_with_a_grandchild() -> None:
    child = subprocess.Popen(["sleep", "60"])
    print(f"running {child.pid}", flush=True)
    time.sleep(60)


def test_kill_of_a_queued_job_never_runs_it():
    with ProcessPool(max_workers=1) as one:
        recorder = Recorder()
        busy = one.run(_print_then_sleep, (30,), on_message=recorder)
        started_and_printing(recorder)
        queued = one.run(os.getpid)
        assert queued.pid is None
        assert queued.kill("cancel") is True
        outcome = queued.wait(1.0)
        assert outcome.kind == "killed" and outcome.reason == "cancel" and outcome.pid is None
        busy.kill("cancel")
        assert busy.wait(1.0).kind == "killed"
        assert one.run(os.getpid).wait(30).ok


def test_kill_after_the_end_changes_nothing(pool):
    job = pool.run(os.getpid)
    outcome = job.wait(30)
    assert job.kill("late") is False
    assert job.wait(0) is outcome and outcome.ok


def test_workers_die_with_their_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys
        from capsule_nb.workers.pool import ProcessPool
        if __name__ == "__main__":
            pool = ProcessPool(1)
            job = pool.run(__import__("time").sleep, (60,))
            while job.pid is None:
                __import__("time").sleep(0.01)
            print(job.pid, flush=True)
            os._exit(0)  # no atexit, no cleanup: as if the kernel were killed
        """
    ))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    worker = int(out.stdout.split()[0])
    until_sync(lambda: process_gone(worker), timeout=5.0)
    assert process_gone(worker)


def test_shutdown_kills_running_jobs_and_refuses_new_ones():
    one = ProcessPool(max_workers=1)
    recorder = Recorder()
    job = one.run(_print_then_sleep, (30,), on_message=recorder)
    started_and_printing(recorder)
    one.shutdown()
    outcome = job.wait(1.0)
    assert outcome.kind == "killed"
    assert process_gone(outcome.pid)
    with pytest.raises(RuntimeError, match="shut down"):
        one.run(os.getpid)


def _bytes_after_prints(size: int, prints: int) -> bytes:
    for i in range(prints):
        print(f"line {i}")
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


def test_results_of_every_size_and_messages_sent_back_to_back_arrive_whole(pool):
    """The reader takes what a worker sent in one read and cuts it into messages: a message
    split over reads (the 64 KiB read, multiprocessing's 16 KiB boundary where it sends the
    length and the bytes apart, a big result), and many messages arriving at once, each
    come out as sent and in order."""
    for size in (0, 1, 16375, 16376, 16377, 65530, 65536, 65537, 1 << 20, 9 * 2**20 + 7):
        recorder = Recorder()
        outcome = pool.run(_bytes_after_prints, (size, 50), on_message=recorder).wait(60)
        assert outcome.ok, outcome.error
        assert outcome.value == bytes(range(256)) * (size // 256) + bytes(size % 256)
        printed = "".join(data["text"] for kind, data in recorder.calls if kind == "capture")
        assert printed == "".join(f"line {i}\n" for i in range(50))
    burst = [pool.run(_bytes_after_prints, (i * 997, 0)) for i in range(200)]
    assert [len(job.wait(60).value) for job in burst] == [i * 997 for i in range(200)]


# --------------------------------------------------------------------------- #
# Messages, output and sessions from the child
# --------------------------------------------------------------------------- #


def test_prints_logs_and_run_messages_reach_on_message_in_order(pool):
    cell = notebook(
        """
        import logging, sys, threading
        import capsule_nb.engine.context
        def task():
            current_run = capsule_nb.engine.context.current_run  # a ContextVar itself does not pickle
            print("to stdout")
            print("to stderr", file=sys.stderr)
            logging.getLogger("mine").warning("careful")
            threading.Thread(target=print, args=("from a thread",)).start()
            run = current_run.get()
            first = run.message("reply", "hello", detail="d")
            run.extend_message(first, " world")
            run.progress(1, 2, "half")
            print("partial line, no newline")
            return "done"
        """
    )
    recorder = Recorder()
    outcome = pool.run(cell["task"], on_message=recorder).wait(30)
    assert outcome.value == "done"
    calls = recorder.calls
    assert calls[0] == ("started", {"pid": outcome.pid})
    text = {stream: "".join(d["text"] for k, d in calls if k == "capture" and d["stream"] == stream)
            for stream in ("stdout", "stderr", "log")}
    assert "to stdout\n" in text["stdout"] and "from a thread\n" in text["stdout"]
    assert "partial line, no newline" in text["stdout"]
    assert text["stderr"] == "to stderr\n"
    assert text["log"] == "WARNING mine: careful\n"
    message = next(d for k, d in calls if k == "message")
    assert message["kind"] == "reply" and message["text"] == "hello" and message["extra"] == {"detail": "d"}
    assert ("extend", {"id": message["id"], "text": " world"}) in calls
    assert ("progress", {"done": 1, "total": 2, "message": "half"}) in calls
    assert recorder.kinds().index("message") < recorder.kinds().index("extend") < recorder.kinds().index("progress")


class FakeRun:
    def __init__(self):
        self.calls = []

    def capture(self, stream, text):
        self.calls.append(("capture", stream, text))

    def message(self, kind, text, **extra):
        self.calls.append(("message", kind, text, extra))
        return f"parent-{len(self.calls)}"

    def extend_message(self, message_id, text):
        self.calls.append(("extend", message_id, text))

    def end_message(self, message_id):
        self.calls.append(("end", message_id))

    def progress(self, done, total, message):
        self.calls.append(("progress", done, total, message))


def test_session_calls_in_the_child_reach_the_run_and_db_works(pool, tmp_path):
    app = cpsl.App(home=tmp_path / "store")
    try:
        session = app.session  # crosses by value: the same id and user, the store by path
        cell = notebook(
            """
            import capsule_nb as cpsl
            def report(n, session):
                session.reply(f"starting {n}")
                session.notify("heads up", detail="more")
                session.log("a log line")
                session.progress(1, n)
                with session.stream_reply() as out:
                    out.write("a")
                    out.write("b")
                session.db.reports.insert_one({"n": n})
                session.data["last"] = n
                print("printed")
                return session.id, cpsl.current_session() is session
            """
        )
        run = FakeRun()
        outcome = pool.run(cell["report"], (3,), session=session, session_param="session",
                           on_message=forward_to(run)).wait(30)
        assert outcome.ok, outcome.traceback
        assert outcome.value == (app.session.id, True)
        stream_id = next(i + 1 for i, c in enumerate(run.calls) if c[:2] == ("message", "stream"))
        assert run.calls == [
            ("message", "reply", "starting 3", {}),
            ("message", "notify", "heads up", {"detail": "more"}),
            ("message", "log", "a log line", {}),
            ("progress", 1, 3, None),
            ("message", "stream", "a", {}),
            ("extend", f"parent-{stream_id}", "b"),
            ("end", f"parent-{stream_id}"),
            ("capture", "stdout", "printed\n"),
        ]
        app.store.poll()  # the child's writes were flushed before the job ended
        assert [doc["n"] for doc in app.db.reports.find()] == [3]
        assert app.session.data["last"] == 3
    finally:
        app.close()


# --------------------------------------------------------------------------- #
# What cannot be pickled
# --------------------------------------------------------------------------- #


def test_unpicklable_argument_is_a_type_error_naming_it(pool):
    def task(a, conn, *, options=None):
        return a

    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"cannot send .*task\(\) to a worker process: "
                                        r"argument 'conn' \(position 1\) is a _thread\.lock"):
        check_picklable((1, lock), {}, task)
    with pytest.raises(TypeError, match=r"argument 'options'\['db'\]\[0\] is a _thread\.lock"):
        check_picklable((1, 2), {"options": {"db": [lock]}}, task)
    with pytest.raises(TypeError, match=r"argument 'conn'"):
        pool.run(task, (1, lock))
    check_picklable((1, 2), {"options": {"db": [1]}}, task)  # fine: no error


def test_function_closing_over_a_socket_is_refused_naming_the_variable(pool):
    sock = socket.socket()
    try:
        cell = notebook(
            """
            def make(sock):
                def send():
                    return sock.fileno()
                return send
            """
        )
        with pytest.raises(TypeError, match=r"cannot send make\.<locals>\.send\(\) to a worker process: the function "
                                                r"\(closure variable 'sock'\) is a socket\.socket"):
            pool.run(cell["make"](sock))
    finally:
        sock.close()


def test_unpicklable_return_value_fails_naming_the_value(pool):
    cell = notebook(
        """
        import sqlite3
        class Holder:
            pass
        def task():
            holder = Holder()
            holder.conn = sqlite3.connect(":memory:")
            return {"holder": holder}
        """
    )
    outcome = pool.run(cell["task"]).wait(30)
    assert outcome.kind == "error" and outcome.error_type == "TypeError"
    assert "the return value['holder'].conn is a sqlite3.Connection" in outcome.message
    assert pool.run(os.getpid).wait(30).ok


def test_bad_memory_limit_is_refused(pool):
    with pytest.raises(ValueError, match="memory_limit"):
        pool.run(os.getpid, memory_limit=-1)


# --------------------------------------------------------------------------- #
# Dask
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def dask_backend():
    distributed = pytest.importorskip("distributed")
    from capsule_nb.workers.dask import DaskBackend

    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster:  # any free port
        with distributed.Client(cluster) as client:
            backend = DaskBackend(client)
            yield backend
            backend.shutdown()


def test_dask_runs_a_notebook_function_elsewhere_with_its_messages(dask_backend):
    cell = notebook(
        """
        import os
        SCALE = 10
        def task(x):
            print("hello from dask")
            return x * SCALE, os.getpid()
        """
    )
    recorder = Recorder()
    job = dask_backend.run(cell["task"], (4,), on_message=recorder)
    outcome = job.wait(60)
    assert outcome.ok, outcome.error
    assert outcome.value[0] == 40 and outcome.value[1] != os.getpid()
    assert job.pid == outcome.value[1] and job.worker_address.startswith("tcp://")
    assert ("capture", {"stream": "stdout", "text": "hello from dask\n"}) in recorder.calls  # before wait() returned


def test_dask_takes_a_big_argument_without_warning_of_a_large_graph(dask_backend):
    """Dask warns of a "large graph" (from 10 MB) and advises scattering the data, which a
    user cannot do for the graph capsule_nb builds: a big call is scattered for them."""
    big = b"x" * 12_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = dask_backend.run(len, (big,)).wait(60)
        small = dask_backend.run(len, (b"xy",)).wait(60)
    assert outcome.ok and outcome.value == len(big)
    assert small.ok and small.value == 2
    assert [str(w.message) for w in caught if "large graph" in str(w.message)] == []


def test_dask_error_and_crash(dask_backend):
    cell = notebook(
        """
        def task():
            raise KeyError("missing")
        """
    )
    outcome = dask_backend.run(cell["task"]).wait(60)
    assert outcome.kind == "error" and outcome.error_type == "KeyError" and "missing" in outcome.message
    assert isinstance(outcome.exception, KeyError)
    crashed = dask_backend.run(os._exit, (3,)).wait(60)
    assert crashed.kind == "crashed" and crashed.message == "worker process died: exited with code 3"
    assert dask_backend.run(sum, ([1, 2],)).wait(60).value == 3


def test_dask_kill_stops_the_child_within_a_second(dask_backend):
    recorder = Recorder()
    job = dask_backend.run(_print_then_sleep, (60,), on_message=recorder)
    started_and_printing(recorder)
    pid = job.pid
    started = time.monotonic()
    assert job.kill("cancel") is True
    outcome = job.wait(timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert outcome.kind == "killed" and outcome.reason == "cancel"
    until_sync(lambda: process_gone(pid), timeout=1.0)
    assert dask_backend.run(os.getpid).wait(60).ok


def _note_pid_then_sleep(path: str) -> str:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(60)
    return "slept"


def _runs_here(job_id: str) -> bool:
    from capsule_nb.workers import dask

    return job_id in dask._live


def test_a_dask_worker_that_dies_is_a_crash_not_a_second_attempt(dask_backend, tmp_path):
    """Dask starts a task again when the worker running it dies: the run of a task with
    ``retries=0`` ran twice and ended completed, attempt 2 of 1 (w59). The job ends crashed
    once its worker is lost, and the body Dask started again is killed."""
    import signal

    workers = dask_backend.client.run(os.getpid)  # address -> the Dask worker process
    started = tmp_path / "started"
    recorder = Recorder()
    job = dask_backend.run(_note_pid_then_sleep, (str(started),), on_message=recorder)
    until_sync(lambda: job.worker_address is not None and started.exists(), 30, what="the job started")
    os.kill(workers[job.worker_address], signal.SIGKILL)
    outcome = job.wait(timeout=60)
    assert outcome.kind == "crashed" and "Dask started it again" in outcome.message, outcome
    assert [kind for kind, _ in recorder.calls].count("started") == 1
    until_sync(lambda: not any(dask_backend.client.run(_runs_here, job.id).values()), 30,
               what="no worker running the body Dask started again")


def test_warm_starts_a_worker_the_next_job_uses():
    with ProcessPool(max_workers=2) as fresh:
        fresh.warm(1)
        until_sync(lambda: len(worker_pids(fresh)) == 1)
        (pid,) = worker_pids(fresh)
        assert fresh.run(os.getpid).wait(30).value == pid
        fresh.warm(5)  # capped at max_workers
        until_sync(lambda: len(worker_pids(fresh)) == 2)


def test_dask_kill_of_a_queued_job_is_immediate(dask_backend):
    recorders = [Recorder(), Recorder()]
    busy = [dask_backend.run(_print_then_sleep, (60,), on_message=r) for r in recorders]
    for recorder in recorders:  # both Dask workers (one thread each) are taken
        started_and_printing(recorder)
    queued = dask_backend.run(os.getpid)
    started = time.monotonic()
    assert queued.kill("cancel") is True
    outcome = queued.wait(timeout=1.0)
    assert outcome.kind == "killed" and outcome.reason == "cancel" and queued.pid is None
    for job in busy:
        job.kill("timeout")
    assert [job.wait(timeout=1.0).kind for job in busy] == ["killed", "killed"]
    assert time.monotonic() - started < 2.0
    assert dask_backend.run(os.getpid).wait(60).ok
