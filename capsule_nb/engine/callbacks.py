"""``callback_url``: a JSON POST after each finished attempt, a courtesy that is never fatal.

* **What goes where.** The URL is the task's own (``@task(callback_url=...)``,
  from code, never read from the store, so a changed store cannot send it
  elsewhere); the body is ``{task_id, status, duration, error}``, nothing
  else of the run. Any host is allowed, loopback and link-local included:
  it is the notebook's own code asking, and local services are a normal
  target. It is sent directly (no HTTP proxy) and redirects are not followed.
* **Bounded.** Each POST has ``TIMEOUT_SECONDS`` for the whole exchange:
  connecting, sending, and the answer's status line and headers. A socket
  timeout alone bounds each read, so a server sending one byte every 2 s
  would never trip it; a watchdog shuts the socket at the deadline instead.
* **Concurrent, capped.** Posts to one endpoint (scheme, host, port) go one
  after another, in order; up to ``MAX_SENDERS`` endpoints are served at
  once, so a slow endpoint delays only its own posts. At most
  ``MAX_QUEUED`` posts wait per endpoint; more are dropped with a warning.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections import deque

from ..record import FAILED, RETRY, RunRecord
from .threads import WorkerPool

log = logging.getLogger("capsule_nb")

TIMEOUT_SECONDS = 5.0
MAX_SENDERS = 8
MAX_QUEUED = 1000


class Callbacks:
    def __init__(self) -> None:
        self._senders = WorkerPool(MAX_SENDERS, name="capsule-callback")
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[str, dict]]] = {}  # endpoint -> posts waiting, while drained

    def send(self, url: str, record: RunRecord) -> None:
        started = record.get("started_at")
        body = {
            "task_id": record["task_id"],
            "status": FAILED if record["status"] == RETRY else record["status"],  # (the attempt's, as Capsule's)
            "duration": (time.time() - started) if started else None,
            "error": record.get("error") or "",  # (a string, as Capsule's runner sends)
        }
        parts = urllib.parse.urlsplit(url)
        endpoint = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            queue = self._queues.get(endpoint)
            start = queue is None
            if start:
                queue = self._queues[endpoint] = deque()
            elif len(queue) >= MAX_QUEUED:
                log.warning("capsule_nb callback to %s for run %s dropped: %d posts already wait for %s",
                            url, body["task_id"], len(queue), endpoint)
                return
            queue.append((url, body))
        if start:
            self._senders.submit(self._drain, endpoint)

    def _drain(self, endpoint: str) -> None:
        """Post what waits for ``endpoint``, in order, until nothing does."""
        while True:
            with self._lock:
                queue = self._queues[endpoint]
                if not queue:
                    del self._queues[endpoint]
                    return
                url, body = queue.popleft()
            _post_json(url, body)


def _post_json(url: str, body: dict) -> None:
    timeout = TIMEOUT_SECONDS
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if connection.sock is not None:  # wakes a read blocked in the sending thread
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():  # the deadline passed while connecting, before there was a socket to shut
            raise TimeoutError
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", target, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json", "User-Agent": "capsule_nb"})
        status = connection.getresponse().status
    except Exception as exc:  # a callback is a courtesy: log and carry on
        reason = f"no complete answer within {timeout:g} s" if expired.is_set() else exc
        log.warning("capsule_nb callback to %s for run %s failed: %s", url, body["task_id"], reason)
    else:
        if status >= 400:
            log.warning("capsule_nb callback to %s for run %s: HTTP %d", url, body["task_id"], status)
    finally:
        watchdog.cancel()
        connection.close()
