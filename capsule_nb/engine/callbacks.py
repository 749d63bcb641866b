"""``callback_url``: a JSON POST after each finished attempt, a courtesy that is never fatal."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

from ..record import RunRecord
from .threads import WorkerPool

log = logging.getLogger("capsule_nb")

TIMEOUT_SECONDS = 5.0


class Callbacks:
    def __init__(self) -> None:
        self._sender = WorkerPool(1, name="capsule-callback")  # one sender keeps posts in order

    def send(self, url: str, record: RunRecord) -> None:
        started = record.get("started_at")
        body = {
            "task_id": record["task_id"],
            "status": record["status"],
            "duration": (time.time() - started) if started else None,
            "error": record.get("error"),
        }
        self._sender.submit(_post_json, url, body)


def _post_json(url: str, body: dict) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            response.read(0)
    except Exception as exc:  # a callback is a courtesy: log and carry on
        log.warning("capsule_nb callback to %s for run %s failed: %s", url, body["task_id"], exc)
