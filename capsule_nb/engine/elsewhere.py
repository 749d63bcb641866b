"""Cancel and refresh of a run that no runtime of this process works on.

Its live owner is asked through the store: a cancel request it answers at its next
pass, a refresh it reads when the run's deadline comes (``store.refreshes``). A run
nobody works on (its owner died, or this process let it go) is cancelled on disk,
where a process adopting it at the same moment cannot also take it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..record import CLAIMED, FINISHED, RUNNING, RunRecord
from ..store import Store, refreshes
from ..store.owners import owner_alive
from .upkeep import cancelled, last_seen

if TYPE_CHECKING:
    from .runtime import Runtime


def cancel(runtime: "Runtime", task_id: str) -> bool:
    """True if the run was cancelled on disk, or its live owner was asked to."""
    runtime.store.poll()  # (its end may be on disk already: a request for it said True, w50)
    for _ in range(3):  # an adoption between our look and our claim: look again
        record = runtime.store.get_run(task_id)
        if record is None:
            return False
        if record["status"] in FINISHED:
            return runtime.cancel_series(record)
        owner = record.get("owner", "")
        if owner != runtime.owner and owner_alive(owner):
            runtime.store.request_cancel(task_id)
            return True

        claimed = cancel_unheld(runtime.store, task_id, owner)
        if claimed is not None:
            if claimed.get("lock_key"):
                runtime.queues.wake_all()
            return True
        runtime.store.poll()
    return False


def cancel_unheld(store: Store, task_id: str, owner: str) -> RunRecord | None:
    """Record as ``cancelled`` on disk a run that ``owner`` left and nobody works on (it died, or
    this process let the run go), unless someone took the run over meanwhile, and free its lock
    key; gives the new record, or None. The Jupyter server cancels a dead kernel's runs so too."""
    seen = last_seen(store, owner)  # (a dead owner's run ended then, if it ran)

    def settle(disk: RunRecord, _requested: bool) -> RunRecord | None:
        if disk.get("owner", "") != owner:
            return None
        return cancelled(disk, seen if disk["status"] in (RUNNING, CLAIMED) else None)

    claimed = store.claim_run(task_id, settle)
    if claimed is not None and claimed.get("lock_key"):
        store.locks.release(claimed["lock_key"], task_id)
    return claimed


def refresh(runtime: "Runtime", task_id: str) -> bool:
    """True if the run is running with a deadline, for a live owner, who was asked."""
    runtime.store.poll()  # (its end may be on disk already)
    record = runtime.store.get_run(task_id)
    if (record is None or record["status"] != RUNNING or record.get("deadline") is None
            or not owner_alive(record.get("owner", ""))):
        return False
    refreshes.ask(runtime.store, task_id)
    return True
