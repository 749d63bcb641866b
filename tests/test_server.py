"""The Jupyter server extension (capsule_nb.ui.server): what a view whose kernel is gone asks.

A real ``jupyter server`` with a token, started in this environment, where
``pip install`` of the package enabled the extension; requests go over HTTP
as the browser's would. A run whose process was SIGKILLed is recorded as a
kernel would record it, so views drawn by the server say what became of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import capsule_nb as cpsl
from capsule_nb.ui import server

from .conftest import process_gone, until_sync
from .lab import _free_port

TOKEN = "capsule-test-token"


class Server:
    def __init__(self, base: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_RUNTIME_DIR=str(base / "runtime"))
        (base / "root").mkdir()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--ServerApp.port={self.port}", "--ServerApp.ip=127.0.0.1",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", "--ServerApp.open_browser=False",
             f"--ServerApp.root_dir={base / 'root'}", "--ServerApp.allow_root=True"],
            env=env, stdout=subprocess.DEVNULL, stderr=(base / "server.log").open("wb"), start_new_session=True)
        until_sync(self._up, 60, 0.2, "the Jupyter server to answer")

    def _up(self) -> bool:
        try:
            self.get("api/status")
            return True
        except OSError:
            assert self.process.poll() is None, "the Jupyter server exited"
            return False

    def get(self, path: str, token: str | None = TOKEN, method: str = "GET", **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(f"{self.url}/{path}{query}", method=method,
                                         headers={"Authorization": f"token {token}"} if token else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(20)


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server"))
    try:
        yield running
    finally:
        running.stop()


def test_pip_install_enabled_the_extension() -> None:
    listed = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"],
                            capture_output=True, text=True, timeout=60)
    lines = (listed.stdout + listed.stderr).splitlines()
    assert any("capsule_nb.ui.server" in line and "enabled" in line for line in lines), lines
    assert any("capsule_nb.ui.server" in line and "OK" in line for line in lines), lines


def test_the_server_answers_a_cards_record_and_a_board(jupyter: Server, tmp_path: Path) -> None:
    app = cpsl.App(home=tmp_path / "store")
    try:
        @app.task
        async def report(rows: int, session=None):
            await session.notify(f"counting {rows} rows")
            return {"rows": rows}

        done = report.submit(42)
        until_sync(lambda: done.snapshot()["status"] == "completed", 10)
        app.store.flush()
        home = str(app.home)

        answer = jupyter.get("capsule-nb/api/cards", home=home, ids=f"{done.task_id},nope")
        card = answer["cards"][done.task_id]
        assert list(answer["cards"]) == [done.task_id] and answer["now"] > 0
        assert card["run"]["status"] == "completed" and card["run"]["result_repr"] == "{'rows': 42}"
        assert card["messages"][0]["text"] == "counting 42 rows" and card["run"]["orphaned"] is False

        view = {"app": app.name, "columns": [["Done", ["completed"]], ["Other", ["failed", "running"]]],
                "filter": {"task_name": "report"}, "limits": {}, "page": 10, "selected": done.task_id}
        board = jupyter.get("capsule-nb/api/board", home=home, view=json.dumps(view))
        assert [(lane["label"], lane["count"]) for lane in board["lanes"]] == [("Done", 1), ("Other", 0)]
        assert board["lanes"][0]["cards"][0]["said"] == "counting 42 rows"
        assert board["detail"]["task_id"] == done.task_id and board["total"] == 1
    finally:
        app.close()


def test_the_server_refuses_what_it_should(jupyter: Server, tmp_path: Path) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        jupyter.get("capsule-nb/api/cards", token=None, home=str(tmp_path), ids="x")
    assert refused.value.code == 403  # no token, no records
    nowhere = tmp_path / "not-a-store"
    assert "no capsule_nb store" in jupyter.get("capsule-nb/api/cards", home=str(nowhere), ids="x")["missing"]
    assert not nowhere.exists()  # asking never makes a store
    app = cpsl.App(home=tmp_path / "store")
    app.close()
    with pytest.raises(urllib.error.HTTPError) as bad:
        jupyter.get("capsule-nb/api/board", home=str(app.home), view=json.dumps({"app": "default", "columns": "x"}))
    assert bad.value.code == 400 and "columns" in bad.value.read().decode()


def test_a_cancel_filed_through_the_server_is_answered_by_the_runs_kernel(jupyter: Server, tmp_path: Path) -> None:
    """What a card's Cancel does while its kernel runs a cell (js/live.js): the server asks
    the run's owner through the store, and the owner's maintenance pass stops the run."""
    app = cpsl.App(home=tmp_path / "store")
    try:
        @app.task
        async def stuck():
            await asyncio.sleep(3600)

        @app.task
        async def quick():
            return 1

        running, done = stuck.submit(), quick.submit()
        until_sync(lambda: running.snapshot()["status"] == "running" and done.snapshot()["status"] == "completed", 10)
        app.store.flush()
        home = str(app.home)

        with pytest.raises(urllib.error.HTTPError) as refused:  # a write is a POST, with a token
            jupyter.get("capsule-nb/api/cancel", home=home, task_id=running.task_id)
        assert refused.value.code == 405
        with pytest.raises(urllib.error.HTTPError) as refused:
            jupyter.get("capsule-nb/api/cancel", token=None, method="POST", home=home, task_id=running.task_id)
        assert refused.value.code == 403
        assert running.snapshot()["status"] == "running"

        assert jupyter.get("capsule-nb/api/cancel", method="POST", home=home, task_id=done.task_id) == {
            "asked": False, "status": "completed", "said": f"run {done.task_id} had already finished"}
        assert jupyter.get("capsule-nb/api/cancel", method="POST", home=home, task_id="nope") == {
            "asked": False, "status": None, "said": "run nope is not in this store"}
        assert jupyter.get("capsule-nb/api/cancel", method="POST", home=home, task_id=running.task_id) == {
            "asked": True, "status": "running"}
        until_sync(lambda: running.snapshot()["status"] == "cancelled", 10, what="the owner answering the cancel")
        assert done.snapshot()["status"] == "completed"
    finally:
        app.close()


def test_a_dead_kernels_runs_are_recorded_for_the_views_that_ask(tmp_path: Path) -> None:
    """No kernel has the store open: a saved notebook's card and board, drawn by the server, must
    not show "running" for a run nobody runs (w55: the board counted it under Running). The
    server records it as a kernel would, and cancels a waiting run of the dead process."""
    home = str(tmp_path / "store")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, time
        import capsule_nb as cpsl
        app = cpsl.App(home={home!r})

        @app.task
        async def stuck():
            await asyncio.sleep(3600)

        h = stuck.submit()
        later = stuck.schedule(delay="1h")
        while h.snapshot()["status"] != "running":
            time.sleep(0.01)
        app.store.flush()
        print(h.task_id, later.task_id, flush=True)
        time.sleep(3600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        task_id, waiting_id = child.stdout.readline().split()
        assert server.cards(home, [task_id])["cards"][task_id]["run"]["status"] == "running"
    finally:
        child.kill()
        child.wait(10)
    until_sync(lambda: process_gone(child.pid), 10)
    card = server.cards(home, [task_id])["cards"][task_id]
    assert (card["run"]["status"], card["run"]["error"], card["run"]["orphaned"]) == ("failed", "interrupted", False)
    view = {"columns": [["Running", ["running"]], ["Failed", ["failed"]]], "selected": task_id}
    board = server.board(home, view)
    running, failed = board["lanes"]
    assert (running["count"], running["cards"]) == (0, [])
    assert failed["count"] == 1 and [c["task_id"] for c in failed["cards"]] == [task_id]
    assert board["detail"]["run"]["status"] == "failed"

    assert server.cancel(home, waiting_id) == {"asked": True, "status": "cancelled",
                                               "said": f"run {waiting_id} cancelled: the process that held it is gone"}
    assert server.cancel(home, task_id)["said"] == f"run {task_id} had already finished"
    app = cpsl.App(home=home)  # what any process reads: the disk, not the server's memory
    try:
        assert {r["task_id"]: r["status"] for r in app.store.runs()} == {task_id: "failed", waiting_id: "cancelled"}
    finally:
        app.close()


def test_a_store_reset_under_the_server_is_read_afresh(tmp_path: Path) -> None:
    """The server outlives kernels: a store deleted and made again (``rm -r``, a restore) while
    it had it open was read from the old, deleted file for as long as the server ran, so saved
    views showed runs that were gone and never the new ones."""
    import shutil

    home = tmp_path / "store"

    def a_run() -> str:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, capsule_nb as cpsl
            app = cpsl.App(home={str(home)!r})
            h = app.task(lambda: 1, name="one").submit()
            asyncio.run(h.wait(10)); app.close(); print(h.task_id)
        """)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1]

    old = a_run()
    assert set(server.cards(str(home), [old])["cards"]) == {old}
    shutil.rmtree(home)
    new = a_run()
    assert set(server.cards(str(home), [old, new])["cards"]) == {new}
