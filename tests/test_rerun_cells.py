"""What notebook users do all the time: re-run (and edit) the cells that define tasks,
schedules and apps, while work from the earlier versions is still going.

A real ipykernel driven over ZMQ (the harness of ``test_kernel``); every wait is
on a condition with a deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_kernel import Kernel, loaded_kernel, wait_on_disk


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    with loaded_kernel(tmp_path_factory, "rerun", """
        %load_ext capsule_nb
        import asyncio, threading, time
        import capsule_nb as cpsl

        async def runs_started_after(query, since, n, timeout=30):
            '''The first ``n`` completed runs of ``query`` that started after ``since``.'''
            deadline = time.monotonic() + timeout
            while True:
                runs = [h.snapshot() for h in await query.find(status="completed")]
                runs = sorted((r for r in runs if r["started_at"] > since), key=lambda r: r["started_at"])
                if len(runs) >= n or time.monotonic() > deadline:
                    return runs[:n]
                await asyncio.sleep(0.1)
        """) as k:
        yield k


def test_runs_that_start_after_a_task_cell_is_rerun_run_the_edited_body(kernel: Kernel) -> None:
    """The user fixes a task's body and re-runs its cell: the retry of a run that failed on the
    old body, a run queued behind it on its key and the next runs of a series all run the fix
    (Capsule's runner looks the handler up by name at each dispatch); the task is listed once."""
    kernel.run(
        """
        edit_gate = threading.Event()

        @cpsl.task(lock="edited", on_lock="queue", retries=1)
        def edited(n):
            edit_gate.wait(20)
            raise RuntimeError("the old body")

        @cpsl.task
        def edited_tick():
            return "the old body"

        h_first, h_queued = edited.submit(1), edited.submit(2)
        h_series = edited_tick.schedule("every 1s")
        """
    )
    first = kernel.value("h_first.task_id")
    wait_on_disk(kernel, first, {"running"})  # its first attempt runs the old body
    kernel.run(
        """
        @cpsl.task(lock="edited", on_lock="queue", retries=1)
        def edited(n):
            return f"the new body {n}"

        @cpsl.task
        def edited_tick():
            return "the new body"

        edited_at = time.time()
        edit_gate.set()
        """
    )
    facts = kernel.value(
        """{
        "first": [await h_first.result(timeout=20), h_first.attempt],
        "queued": await h_queued.result(timeout=20),
        "series": [r["result"] for r in await runs_started_after(edited_tick, edited_at, 2)],
        "listed": [t.name for t in cpsl.app.default_app().tasks_defined()].count("edited"),
        }""",
        timeout=60,
    )
    kernel.run("await h_series.cancel()")
    assert facts == {"first": ["the new body 1", 2], "queued": "the new body 2",
                     "series": ["the new body", "the new body"], "listed": 1}


def test_a_queued_process_run_runs_the_body_of_the_rerun_cell(kernel: Kernel, tmp_path: Path) -> None:
    """``process=True`` pickles the function at submit; a run that starts after the cell was
    re-run is pickled again, so the worker runs the edited body too."""
    gate = tmp_path / "gate"
    kernel.run(
        f"""
        @cpsl.task(lock="edited_process", on_lock="queue", process=True)
        def edited_process(n):
            import os, time
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.01)
            return f"the old body {{n}}"

        hp_first, hp_queued = edited_process.submit(1), edited_process.submit(2)
        """
    )
    wait_on_disk(kernel, kernel.value("hp_first.task_id"), {"running"})
    kernel.run(
        """
        @cpsl.task(lock="edited_process", on_lock="queue", process=True)
        def edited_process(n):
            return f"the new body {n}"
        """
    )
    gate.touch()
    results = kernel.value("[await hp_first.result(timeout=30), await hp_queued.result(timeout=30)]", timeout=60)
    assert results == ["the old body 1", "the new body 2"]


def test_rerunning_an_app_cell_with_a_schedule_fires_only_the_edited_schedule(kernel: Kernel) -> None:
    """``app = cpsl.App(...)`` and ``@app.schedule`` in one cell, edited and re-run: the cell
    gets the same app back, so the new definition replaces the old one and every later tick
    runs the edited body (before, the first app lived on and its schedule kept firing)."""
    cell = """
        app = cpsl.App("rerun-app", home="rerun-app-store")
        apps_made = [*globals().get("apps_made", []), app]

        @app.schedule("* * * * * *")
        def heartbeat():
            return "{body}"
        """
    kernel.run(cell.format(body="the old body"))
    kernel.run(cell.format(body="the new body"))
    facts = kernel.value(
        """{
        "same app": apps_made[0] is apps_made[1],
        "ticks": [r["result"] for r in await runs_started_after(heartbeat.runs, time.time(), 4)],
        }""",
        timeout=60,
    )
    kernel.run("heartbeat.pause()")
    assert facts == {"same app": True, "ticks": ["the new body"] * 4}


def test_rerunning_a_cell_that_starts_repeats_replaces_the_repeats_it_started(kernel: Kernel) -> None:
    """A cell that starts a repeat, run again (edited, or after a restart and "Run all"), has
    its earlier repeats stopped: before, each run of the cell added a series. The repeats one
    run of the cell starts all stay, another cell's stay, and without a cell id (a script, the
    classic notebook) each call starts a repeat of its own."""
    kernel.run(
        """
        @cpsl.task
        def poll_region(region):
            return region

        def live_series():
            return sorted({r["series"] for r in cpsl.app.default_app().store.unfinished_runs()
                           if r["task_name"] == "poll_region"})
        """
    )
    starts = 'hs = [poll_region.schedule("every 1h", region=r) for r in ("eu", "us")]'
    kernel.run(starts, cell="cell-a")
    first = kernel.value("[h.task_id for h in hs]")
    kernel.run(starts.replace('"us"', '"asia"'), cell="cell-a")  # edited and run again
    second = kernel.value("[h.task_id for h in hs]")
    kernel.run('other = poll_region.schedule("every 1h", region="eu")', cell="cell-b")
    kernel.run('loose = [poll_region.schedule("every 1h", region="eu") for _ in range(2)]')  # no cell id
    loose = kernel.value("[h.task_id for h in loose]")
    facts = kernel.value(
        """{"first": [await h.wait(timeout=20) for h in [cpsl.app.default_app().get_task(t) for t in %r]],
            "live": live_series()}""" % (first,),
        timeout=60,
    )
    assert facts["first"] == ["cancelled", "cancelled"]
    assert facts["live"] == sorted(second + [kernel.value("other.task_id")] + loose)
    kernel.run("for h in [*hs, other, *loose]: h.cancel()")
