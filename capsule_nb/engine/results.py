"""How a return value is kept, and found again.

A JSON value up to ``INLINE_RESULT_CHARS`` goes in the record; anything else
is a signed payload up to the app's ``max_result_bytes``; a value over that
(or one that cannot be pickled) keeps only its repr, and the record says why.
This process also keeps its latest results by identity, so ``result()`` of
a run that just finished here returns the very object the task returned.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..record import RunRecord, json_safe, short_repr
from ..store import Store
from ..store.disk import dumps

INLINE_RESULT_CHARS = 64_000  # bigger JSON results go to a payload
_SHORT = (int, float, bool, type(None))  # JSON values that are never long (an int's digits: 4,300 at most)
REMEMBERED = 1000  # results of this process kept by identity


class Results:
    def __init__(self, store: Store, max_bytes: Callable[[], int]):
        self._store = store
        self._max_bytes = max_bytes
        self._recent: dict[str, Any] = {}
        self._lock = threading.Lock()  # worker threads finish concurrently

    def keep(self, task_id: str, value: Any) -> dict[str, Any]:
        """The record fields that keep ``value`` (storing a payload when it needs one)."""
        if value is None:  # most runs: no identity to remember, nothing to encode
            return {"result": None, "result_repr": "None", "result_kind": "json"}
        with self._lock:
            self._recent[task_id] = value
            if len(self._recent) > REMEMBERED:
                self._recent.pop(next(iter(self._recent)))
        preview = short_repr(value, 500)
        inline, ok = json_safe(value)
        if ok and (type(inline) in _SHORT or len(dumps(inline)) <= INLINE_RESULT_CHARS):
            return {"result": inline, "result_repr": preview, "result_kind": "json"}
        try:
            size = self._store.put_payload(task_id, "result", value, limit=self._max_bytes())
        except Exception as exc:
            return {"result": None, "result_repr": preview, "result_kind": "repr",
                    "result_note": f"result not kept: {exc}"}
        return {"result": None, "result_repr": preview, "result_kind": "payload", "result_bytes": size}

    def load(self, record: RunRecord) -> Any:
        """A completed run's return value; ``ValueError`` when only its repr was kept."""
        task_id = record["task_id"]
        with self._lock:
            if task_id in self._recent:
                return self._recent[task_id]
        kind = record.get("result_kind")
        if kind == "payload":
            try:
                return self._store.get_payload(task_id, "result")
            except KeyError:
                why = ("retention pruned the run (keep_finished)" if self._store.get_run(task_id) is None
                       else f"the store has the run but not the row payload/{task_id}/result, which was removed")
                raise ValueError(f"run {task_id}'s result is no longer in the store: {why}; "
                                 f"its repr: {record.get('result_repr')}") from None
        if kind == "repr":
            raise ValueError(
                f"run {task_id}'s result was not kept ({record.get('result_note')}); "
                f"its repr: {record.get('result_repr')}"
            )
        return record.get("result")
