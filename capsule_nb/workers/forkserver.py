"""The forkserver that starts worker processes, and what a pool needs of ``multiprocessing``
process-wide: set up when the first pool is made (never at import), and stopped with the
pools when a kernel is shut down."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import multiprocessing.spawn
import multiprocessing.util
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ProcessPool

log = logging.getLogger("capsule_nb")

CONTEXT = multiprocessing.get_context("forkserver")
starting = threading.local()  # ``starting.worker``: this thread is starting one of our workers
pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()  # every pool of this process

_hooks_lock = threading.Lock()
_hooks_installed = False


def install_hooks() -> None:
    """What a pool needs of ``multiprocessing``, set up once per process:

    * the forkserver preloads ``capsule_nb.workers.child``, so a new worker is a cheap fork;
    * our workers skip re-running the parent's ``__main__`` (``_without_main``);
    * at exit, idle workers are killed before multiprocessing joins its children (a
      ``Finalize`` with a priority runs first, at interpreter exit and in a Dask worker).
    """
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        CONTEXT.set_forkserver_preload(["capsule_nb.workers.child"])
        original = multiprocessing.spawn.get_preparation_data

        def _without_main(name: str) -> dict:
            """multiprocessing's start data, minus "re-run the parent's ``__main__``" for our workers.

            A worker gets each call by value, so it never needs the parent's main
            module; re-running it would execute a script's top level (its task
            definitions, its submits) in every worker. Other processes started by
            this interpreter are left as multiprocessing makes them.
            """
            data = original(name)
            if getattr(starting, "worker", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        multiprocessing.spawn.get_preparation_data = _without_main
        multiprocessing.util.Finalize(None, _shutdown_all, exitpriority=100)


def may_start_children() -> bool:
    process = multiprocessing.current_process()
    return not process.daemon and not getattr(process, "_inheriting", False)


def _shutdown_all() -> None:
    for pool in list(pools):
        try:
            pool.shutdown(wait=True)
        except Exception:  # the next pool's workers must still go
            log.debug("capsule_nb: could not shut down %r", pool, exc_info=True)


def stop_children() -> None:
    """Kill every pool's workers, then stop the forkserver and multiprocessing's resource
    tracker, for a kernel being shut down. ipykernel ends the children of its process group
    one signal after another, and the tracker ignores SIGTERM: the kernel waited seconds for
    it, then was killed, its exit handlers never run. (``_stop`` is how multiprocessing's own
    tests stop both; they start again on demand.)"""
    _shutdown_all()
    for helper in (multiprocessing.forkserver._forkserver, multiprocessing.resource_tracker._resource_tracker):
        try:
            helper._stop()
        except Exception:  # not running, or another Python's internals: the kernel's signals still end it
            log.debug("capsule_nb: could not stop %r", helper, exc_info=True)
