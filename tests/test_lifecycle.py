"""Process lifecycle: a script's runs, exit while work is in flight, and reading them back."""

import subprocess
import sys
import textwrap

import capsule_nb as cpsl


def run_script(code: str, home, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env={"CAPSULE_NB_HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


def test_plain_script_without_a_loop_uses_a_daemon_loop(tmp_path):
    done = run_script(
        """
        import capsule_nb as cpsl, asyncio

        @cpsl.task
        async def hello(name):
            print("printing", name)
            return f"hello {name}"

        h = hello.submit("script")
        # a sync script has no loop: the runtime runs one in a daemon thread
        print(asyncio.run(h.result(timeout=10)))
        print(h.task_id)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result, task_id = done.stdout.split()[-3:-1], done.stdout.split()[-1]
    assert " ".join(result) == "hello script"
    app = cpsl.App(home=tmp_path)
    record = app.get_task(task_id).snapshot()
    assert record["status"] == "completed" and record["output"] == [{"stream": "stdout", "text": "printing script\n"}]


def test_exit_with_work_in_flight_marks_it_interrupted(tmp_path):
    done = run_script(
        """
        import capsule_nb as cpsl, threading

        started = threading.Event()

        @cpsl.task
        def forever():
            started.set()
            threading.Event().wait()

        @cpsl.task(retries=2)
        def forever_with_retries():
            threading.Event().wait()

        @cpsl.task
        def later():
            pass

        a = forever.submit()
        b = forever_with_retries.submit()
        c = later.schedule(delay="1h")
        started.wait(10)
        import time
        while b.snapshot()["status"] != "running":
            time.sleep(0.01)
        print(a.task_id, b.task_id, c.task_id)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    a, b, c = done.stdout.split()
    app = cpsl.App(home=tmp_path)
    assert app.get_task(a).snapshot()["status"] == "failed"
    assert app.get_task(a).snapshot()["error"] == "interrupted"
    assert app.get_task(b).snapshot()["status"] == "retry"  # attempts left: resumable
    assert app.get_task(c).snapshot()["status"] == "scheduled"  # waiting runs wait for the next kernel
