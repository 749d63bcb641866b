"""A tqdm bar inside a task feeds the run's progress instead of printing frames."""

import asyncio

import pytest

tqdm = pytest.importorskip("tqdm").tqdm


async def test_tqdm_in_a_thread_task_drives_progress(app):
    seen = []

    @app.task
    def crunch(n):
        for _ in tqdm(range(n), desc="crunching", mininterval=0):
            pass
        return n

    unsubscribe = app.store.events.subscribe(lambda r: r.get("progress") and seen.append(r["progress"]["done"]))
    handle = crunch.submit(50)
    assert await handle.result(timeout=5) == 50
    unsubscribe()
    record = handle.snapshot()
    assert record["progress"] == {"done": 50, "total": 50, "message": "crunching"}
    assert len(set(seen)) > 2 and seen == sorted(seen)  # it moved, forward
    assert not any("crunching" in chunk["text"] for chunk in record["output"])  # no bar frames as output


async def test_tqdm_outside_a_run_prints_as_usual(app, capsys):
    @app.task
    def warm():
        return 1

    await warm.submit().wait(5)  # the patch is in place from here on
    for _ in tqdm(range(3), desc="plain", mininterval=0):
        await asyncio.sleep(0)
    assert "plain" in capsys.readouterr().err
