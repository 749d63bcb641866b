"""The terminal CLI: tasks, show, cancel (of a live kernel's run), prune, schedules."""

import json
import os
import subprocess
import sys
import time

import pytest

import capsule_nb as cpsl
from capsule_nb.cli import main

from .conftest import until_sync
from .test_durability import OWNER_OF_A_RUNNING_RUN, lines_until, spawn


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_show_and_json(app, capsys):
    @app.task
    def ok(n):
        print("working", n)
        return n * 2

    @app.task
    def bad():
        raise ValueError("nope")

    a, b = ok.submit(21), bad.submit()
    until_sync(lambda: a.snapshot()["status"] == "completed" and b.snapshot()["status"] == "failed")
    app.store.flush()
    home = str(app.home)
    code, out, _ = cli(capsys, "--home", home, "tasks")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["TASK", "ID", "NAME"]
    assert rows[0].split()[:3] == [b.task_id, "bad", "failed"] and rows[1].split()[:3] == [a.task_id, "ok", "completed"]
    assert cli(capsys, "--home", home, "tasks", "--status", "failed")[1].count("\n") == 2
    code, out, _ = cli(capsys, "--home", home, "--json", "tasks", "--name", "ok")
    assert [r["task_id"] for r in json.loads(out)] == [a.task_id]
    code, out, _ = cli(capsys, "--home", home, "show", a.task_id)
    assert "result: 42" in out and "| working 21" in out
    code, out, _ = cli(capsys, "--home", home, "show", b.task_id)
    assert "error: ValueError: nope" in out and "Traceback" in out
    # An --app with no runs on the store says which apps have some: "no runs" alone read as
    # an empty store (w64); an app that has runs, none of that status, says just that.
    assert cli(capsys, "--home", home, "tasks", "--app", "nope")[1].strip() == \
        f"no runs (no app 'nope' has runs on {home}; its apps: {app.name})"
    assert cli(capsys, "--home", home, "tasks", "--app", app.name, "--status", "cancelled")[1].strip() == "no runs"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"capsule-nb {cpsl.__version__}"


def test_unknown_id_and_not_a_store_exit_2(app, tmp_path, capsys):
    code, _, err = cli(capsys, "--home", str(app.home), "show", "nope")
    assert code == 2 and "no run 'nope'" in err
    code, _, err = cli(capsys, "--home", str(tmp_path / "empty"), "tasks")
    assert code == 2 and "is not a capsule_nb store" in err
    assert not (tmp_path / "empty").exists()  # a typo never creates a store
    (tmp_path / "a file").write_text("not a store")
    code, _, err = cli(capsys, "--home", str(tmp_path / "a file"), "tasks")  # (was a NotADirectoryError traceback)
    assert code == 2 and "is not a capsule_nb store" in err
    code, _, err = cli(capsys, "--home", str(app.home), "tasks", "--status", "done")
    assert code == 2 and "unknown status 'done'" in err
    code, _, err = cli(capsys, "--home", "", "tasks")  # (was a TypeError traceback, exit 1: w57)
    assert code == 2 and err.strip() == "capsule-nb tasks: --home: home is the path of a store folder, not ''"
    for limit in ("-3", "99999999999999999999"):
        with pytest.raises(SystemExit) as refused:  # (argparse's own exit, with usage)
            cli(capsys, "--home", str(app.home), "tasks", "--limit", limit)
        assert refused.value.code == 2 and f"--limit: not a whole number from 0 to 2**63 - 1: '{limit}'" in (
            capsys.readouterr().err)


def test_prune_older_than(app, capsys):
    @app.task
    def quick():
        return 1

    handles = [quick.submit() for _ in range(3)]
    until_sync(lambda: all(h.snapshot()["status"] == "completed" for h in handles))
    old = handles[0].task_id
    app.store.update_run(old, lambda r: dict(r, completed_at=time.time() - 8 * 86400))
    app.store.flush()
    code, out, _ = cli(capsys, "--home", str(app.home), "prune", "--older-than", "7d")
    assert code == 0 and "pruned 1 finished runs" in out
    assert app.get_task(old) is None and app.tasks.count() == 2
    assert cli(capsys, "--home", str(app.home), "prune", "--older-than", "soon")[0] == 2


def test_show_and_cancel_take_the_end_of_an_id_as_a_boards_card_shows_it(app, capsys):
    """A board's card shows a run's last 6 characters: ``show`` and ``cancel`` find the run by
    them, and say which runs when more than one id ends so."""
    from capsule_nb.record import new_record

    @app.task
    def later():
        return 1

    waiting = later.schedule(delay="1h")
    now = time.time()
    twins = ["0" * 18 + "beef00", "1" * 18 + "beef00"]
    for task_id in twins:
        app.store.put_run(new_record(task_id=task_id, app="default", task_name="later", status="completed",
                                     attempt=1, max_attempts=1, created_at=now, updated_at=now))
    app.store.flush()
    home = str(app.home)
    code, out, _ = cli(capsys, "--home", home, "--json", "show", waiting.task_id[-6:].upper())  # (any case)
    assert code == 0 and json.loads(out)["task_id"] == waiting.task_id
    code, out, _ = cli(capsys, "--home", home, "--json", "show", waiting.task_id[-6:])
    assert code == 0 and json.loads(out)["task_id"] == waiting.task_id
    code, out, _ = cli(capsys, "--home", home, "--json", "cancel", waiting.task_id[-6:])
    assert code == 0 and json.loads(out) == {"task_id": waiting.task_id, "cancelled": True, "status": "cancelled"}
    code, out, err = cli(capsys, "--home", home, "show", "beef00")
    assert code == 2 and "more than one run's id ends with 'beef00'" in err and all(t in err for t in twins)
    code, out, err = cli(capsys, "--home", home, "show", twins[1])  # a whole id is never a tail
    assert code == 0 and twins[1] in out
    code, out, err = cli(capsys, "--home", home, "show", "f00d42")
    assert code == 2 and "no run 'f00d42'" in err
    code, out, err = cli(capsys, "--home", home, "show", waiting.task_id[-3:])  # (w51: said "no run" alone)
    assert code == 2 and "give at least 4 characters of a run's id" in err


def test_home_and_json_go_before_or_after_every_store_command(app, capsys):
    # docs/api.md: "`--home PATH` and `--json` go before or after the command"
    @app.task
    def later():
        return 1

    first, second = later.schedule(delay="1h"), later.schedule(delay="1h")
    app.store.flush()
    home = str(app.home)
    commands = [["tasks"], ["show", first.task_id], ["prune", "--older-than", "7d"], ["schedules"], ["doctor"]]
    for command in commands:
        before = cli(capsys, "--home", home, "--json", *command)
        after = cli(capsys, *command, "--home", home, "--json")
        assert before[0] == after[0] == 0 and json.loads(before[1]) == json.loads(after[1]), command
    code, out, _ = cli(capsys, "--home", home, "--json", "cancel", first.task_id)
    assert code == 0 and json.loads(out) == {"task_id": first.task_id, "cancelled": True, "status": "cancelled"}
    code, out, _ = cli(capsys, "cancel", second.task_id, "--home", home, "--json")
    assert code == 0 and json.loads(out) == {"task_id": second.task_id, "cancelled": True, "status": "cancelled"}
    code, out, _ = cli(capsys, "cancel", second.task_id, "--home", home, "--json")
    assert code == 1 and json.loads(out) == {"task_id": second.task_id, "cancelled": False, "status": "cancelled"}
    code, out, _ = cli(capsys, "prune", "--older-than", "7d", "--home", home, "--json")
    assert code == 0 and json.loads(out) == {"pruned": 0, "older_than": "7d"}


def test_schedules_listing(app, capsys):
    @app.schedule("0 9 * * 1", tz="Europe/Paris", name="weekly_digest")
    def weekly_digest():
        pass

    code, out, _ = cli(capsys, "--home", str(app.home), "schedules")
    line = next(line for line in out.splitlines() if line.startswith("weekly_digest"))
    assert "0 9 * * 1" in line and "Europe/Paris" in line and "next 20" in line and "T09:00:00+0" in line
    weekly_digest.pause()
    rows = json.loads(cli(capsys, "--home", str(app.home), "--json", "schedules")[1])
    assert rows == [dict(rows[0], name="weekly_digest", paused=True, next=None, defined=True)]


def test_a_schedule_no_live_kernel_defines_is_listed_as_not_firing(tmp_path, capsys):
    """Its kernel killed, the listing still gave the next time it would fire: nothing fires it (w46)."""
    definer = spawn("""
        @app.schedule("0 9 * * *", tz="Europe/Paris", name="daily")
        def daily():
            pass

        print("defined", flush=True)
        threading.Event().wait()
        """, tmp_path)
    lines_until(definer, "defined")
    listed = json.loads(cli(capsys, "--home", str(tmp_path), "--json", "schedules")[1])
    assert [(r["name"], r["defined"], r["next"][11:19]) for r in listed] == [("daily", True, "09:00:00")]
    definer.kill()
    definer.wait(10)
    code, out, _ = cli(capsys, "--home", str(tmp_path), "schedules")
    header, line = out.splitlines()
    assert "not firing: no live kernel defines it" in line and "next" not in line
    assert line.index("not firing") == header.index("WHEN") and line[header.index("LAST"):] == "-"  # (aligned)


def test_cancel_reaches_the_live_process_that_owns_the_run(tmp_path):
    """And ``show`` says the cancel was asked while the owner has not taken it up (here its
    maintenance pass waits for a file): it said "running", as if nothing had been asked."""
    go = tmp_path / "answer"
    owner = spawn(OWNER_OF_A_RUNNING_RUN.replace(
        'print("running", flush=True)\n',
        f'app.runtime.upkeep.stop()\nprint("running", flush=True)\n'
        f'while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\napp.runtime.upkeep.start()\n'), tmp_path)

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "capsule_nb", "--home", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60, env=os.environ)

    try:
        (task_id,) = lines_until(owner, "running")
        done = command("cancel", task_id)
        assert done.returncode == 0, done.stderr
        assert f"run {task_id}: asked of the process that holds it" in done.stdout
        shown = command("show", task_id)
        assert "[running]" in shown.stdout and "cancel asked" in shown.stdout, shown.stdout
        go.touch()
        lines_until(owner, "stopped")
        assert "cancel asked" not in command("show", task_id).stdout
        assert cpsl.App(home=tmp_path).get_task(task_id).status() == "cancelled"
    finally:
        owner.kill()
        owner.wait(10)


def test_a_listing_piped_into_head_ends_quietly(app):
    """``capsule-nb tasks | head -2``: the reader closes the pipe, and the listing printed a
    BrokenPipeError traceback and exited 1 (w59)."""
    @app.task
    def job(i: int = 0) -> int:
        return i

    handles = [job.submit(i=i) for i in range(3000)]  # more than a pipe holds
    until_sync(lambda: all(h.snapshot()["status"] == "completed" for h in handles), 60)
    app.store.flush()
    listing = subprocess.Popen([sys.executable, "-m", "capsule_nb", "--home", str(app.home), "tasks", "--limit", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = [listing.stdout.readline() for _ in range(2)]
    listing.stdout.close()  # as head does once it has its lines
    assert listing.wait(60) == 0 and listing.stderr.read() == b""
    assert head[0].startswith(b"TASK ID") and b"completed" in head[1]
