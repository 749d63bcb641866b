"""What is inside a store folder, not only the folder itself, must be the user's alone.

A folder others can read and enter (0755) lets them reach ``db/``: if ``db/``, the
database or a value folder under it is writable by them (or theirs), they could have
written rows the store would trust, so it is not "made private" and used; it is refused
with the path and the fix. A folder already private whose ``db/`` or database is open
to others (left so by a version that made the folder private without looking inside)
is refused too. Holds as root: modes by os.chmod, owners by os.chown.
"""

import os
import stat
from pathlib import Path

import pytest

import capsule_nb as cpsl
from capsule_nb.errors import StoreError

from .test_hostile_store import good_store


def _refused(home, culprit, says):
    with pytest.raises(StoreError) as refused:
        cpsl.App(home=home)
    message = str(refused.value)
    assert str(culprit) in message and says in message, message
    return message


@pytest.mark.parametrize("top", [0o755, 0o700])
@pytest.mark.parametrize("inside", ["db", "db/cache.db"])
def test_a_database_others_can_write_is_refused_however_private_the_folder(tmp_path, top, inside):
    home = tmp_path / "store"
    good_store(home)
    os.chmod(home / inside, 0o777 if inside == "db" else 0o666)
    os.chmod(home, top)
    message = _refused(home, home / inside, "writable by other users")
    assert "chmod" in message
    assert stat.S_IMODE(os.stat(home).st_mode) == top  # refused, not made private and used


def test_a_value_folder_others_could_write_through_a_readable_store_is_refused(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    value_folder = home / "db" / "ab" / "cd"
    value_folder.mkdir(parents=True)
    os.chmod(value_folder, 0o777)  # what diskcache makes under umask 000
    os.chmod(home, 0o755)
    message = _refused(home, value_folder, "writable by other users")
    assert f"chmod -R go-w {home}" in message  # the fix, named
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o755  # refused, not made private and used
    os.chmod(home, 0o700)  # nobody else could ever reach it: a value folder's mode does not matter
    app = cpsl.App(home=home)
    try:
        assert [r["status"] for r in app.store.runs()] == ["completed"]
    finally:
        app.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_database_of_another_user_in_a_store_is_refused(tmp_path):
    home = tmp_path / "store"
    good_store(home)
    os.chown(home / "db" / "cache.db", 4321, 4321)
    message = _refused(home, home / "db" / "cache.db", "belongs to user id 4321")
    assert f"not to you ({os.getuid()})" in message and "the store is not used" in message
    assert f"chown -R {os.getuid()} {home}" in message  # the fix that fixes it: a chmod leaves the owner (w57)


@pytest.mark.parametrize("linked", ["db", "db/cache.db"])
def test_a_database_reached_through_a_link_is_refused_wherever_it_points(tmp_path, linked):
    """w57: ``db/cache.db`` (or ``db/``) linked to a file others may write was used: the checks
    looked at the link. SQLite follows it and keeps its journal beside the target, so a link
    is refused whatever it points at, and the data where it points is left as it was."""
    home = tmp_path / "store"
    (task_id,) = good_store(home)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / Path(linked).name
    os.rename(home / linked, moved)
    os.chmod(moved, 0o777 if linked == "db" else 0o666)
    os.symlink(moved, home / linked)
    before = sorted((p.name, p.stat().st_size) for p in elsewhere.rglob("*"))
    message = _refused(home, home / linked, "is a symbolic link")
    assert str(moved) in message and "point --home" in message
    assert sorted((p.name, p.stat().st_size) for p in elsewhere.rglob("*")) == before
    os.unlink(home / linked)  # put back where it belongs, it opens with its run
    os.rename(moved, home / linked)
    os.chmod(home / linked, 0o700 if linked == "db" else 0o600)
    app = cpsl.App(home=home)
    try:
        assert app.get_task(task_id).snapshot()["status"] == "completed"
    finally:
        app.close()


def test_a_private_store_is_opened_as_before(tmp_path, caplog):
    home = tmp_path / "store"
    (task_id,) = good_store(home)
    os.chmod(home, 0o755)
    app = cpsl.App(home=home)
    try:
        assert app.get_task(task_id).snapshot()["status"] == "completed"
        assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    finally:
        app.close()


def test_the_fix_a_refusal_names_pastes_into_a_shell_whatever_the_path(tmp_path):
    """w58: the advice named `chmod -R go-w /tmp/x/my store`, which a shell reads as two paths
    (the second, ``store``, in whatever folder the user is in)."""
    import shlex

    home = tmp_path / "my store"
    good_store(home)
    os.chmod(home / "db", 0o777)
    message = _refused(home, home / "db", "writable by other users")
    command = message.split("`chmod -R go-w ")[1].split("`")[0]
    assert shlex.split(command) == [str(home)]
