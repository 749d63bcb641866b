"""A store on a real disk that fills up (a small tmpfs, mounted for the test: root only)."""

import contextlib
import os
import subprocess
import traceback

import pytest

import capsule_nb as cpsl
from capsule_nb.errors import StoreError

from ..conftest import until


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path / "disk"``; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount):
    """Write a file until the disk is full; returns it (delete it to free the disk)."""
    filler = mount / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


def frames(exc):
    return len(traceback.extract_tb(exc.__traceback__))


async def test_refusals_on_a_full_disk_do_not_pile_up_on_one_error_then_it_recovers(small_disk):
    app = cpsl.App(home=small_disk / "store")

    @app.task
    def work(n):
        return n

    try:
        before = await work.submit(0)
        assert await before.result(timeout=10) == 0
        filler = fill(small_disk)
        during = work.submit(1)  # accepted in memory; the writer cannot commit it
        with pytest.raises(StoreError, match=str(app.home)):
            await during
        first = None
        for n in range(20):
            with pytest.raises(StoreError, match=str(app.home)) as refused:
                work.submit(n)
            first = first or frames(refused.value)
        # Each refusal is its own error: re-raising one object grows its traceback with every
        # raise, keeping every frame (and its locals) alive for as long as the disk stays full.
        assert frames(refused.value) == first
        filler.unlink()  # the disk has room again
        await until(lambda: app.store.failure is None, timeout=10)
        assert await during.result(timeout=10) == 1 and await before.result() == 0
        assert await work.submit(2).result(timeout=10) == 2
    finally:
        app.close()
        app.store.close()
        from capsule_nb import store

        store._stores.pop(app.store.path, None)
