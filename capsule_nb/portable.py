"""Portable mode: say which lines of a prototype will not run on Capsule.

Users prototype in a notebook and deploy to the hosted platform. With
``cpsl.configure(portable=True)`` (or ``%capsule portable on``) every
capsule_nb-only extension a program uses warns once, with the way to write
it for Capsule. ``capsule-nb check notebook.ipynb`` (``portcheck.py``) finds
the same extensions without running anything, and names them by the same
codes.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any

from .checks import true_or_false

# code -> (what the extension is, how Capsule code says it)
EXTENSIONS: dict[str, tuple[str, str]] = {
    "positional": ("positional task arguments (t.submit(1, 2))",
                   "pass task arguments by keyword: t.submit(x=1, y=2)"),
    "wait_result": ("handle.wait() / handle.result()",
                    "Capsule keeps no result: poll `await handle.status()` and have the task write what it "
                    "made to a collection"),
    "bare_task": ("@task without parentheses",
                  "write @app.task(): Capsule's task takes its options first, so a bare @task takes the function "
                  "as `retries`"),
    "retry_policy": ("retry_delay= / backoff= on @task",
                     "drop them: Capsule retries at once, `retries=` and `retry_for=` only"),
    "on_lock": ("on_lock= on @task",
                "drop it: Capsule takes only `lock=`, and the platform decides what a submit with a held key does"),
    "task_options": ("name= / display_name= / memory_limit= on @task",
                     "Capsule's task takes retries, timeout, lock, retry_for, callback_url and process; its name is "
                     "the function's, and a run's display name goes to submit(display_name=...)"),
    "timeout_text": ("a timeout given as text (timeout=\"5m\")", "give seconds: timeout=300"),
    "schedule_at": ("schedule(at=datetime)",
                    "Capsule schedules by a relative delay: t.schedule(delay=\"30m\") or delay=timedelta(...)"),
    "delay_number": ("a delay Capsule's shorthand does not read (schedule(delay=30), \"1.5h\", \"every  5m\")",
                     "write a whole number and one unit, \"30s\" or \"90m\", after \"every \" with one space "
                     "to repeat, or a timedelta"),
    "cron_tz": ("@schedule(tz=...)", "Capsule's cron runs in UTC: write the hours in UTC and drop tz="),
    "cron_seconds": ("a 6-field cron (seconds last)", "Capsule's cron has 5 fields: a minute is the finest step"),
    "schedule_options": ("name= / catchup= on @schedule",
                         "Capsule's schedule takes only the cron; its name is the function's"),
    "process_cell": ("process=True on a function defined in a notebook cell or __main__",
                     "Capsule re-imports process tasks from the app's module: define it at the top level of "
                     "app.py"),
    "progress_log": ("session.progress() / session.log()",
                     "Capsule sessions have no progress() or log(): use `await session.notify(...)`"),
    "json_args": ("task arguments that are not JSON (a set, a DataFrame, an object)",
                  "pass JSON values (text, numbers, lists, dicts): Capsule sends a submit's keywords as JSON "
                  "and fails the submit on anything else; pass a path or an id to what is big"),
    "no_await": ("a Capsule call without `await` (h = t.submit(...), h.status(), coll.insert_one(...))",
                 "await it: on Capsule these are coroutines, so without `await` nothing is submitted, inserted or "
                 "read (hand many to `asyncio.gather(...)`)"),
    "doc_options": ("find(sort=\"field\") or a list of pairs, or update_one(upsert=...)",
                    "Capsule's find takes sort as a dict, sort={\"field\": 1}, and its update_one has no upsert: "
                    "find_one first, then insert_one or update_one"),
    "get_task": ("cpsl.get_task(id)",
                 "keep handle.task_id and look runs up with `await t.find(...)`; read `await handle.status()`"),
}


class PortabilityWarning(UserWarning):
    """A capsule_nb-only extension was used while portable mode is on."""


_lock = threading.Lock()
_enabled = False
_warned: set[str] = set()
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def check_portable(on: Any) -> None:
    true_or_false("portable", on)


def set_portable(on: bool) -> None:
    """Turn portable mode on or off; turning it on again warns afresh."""
    global _enabled
    check_portable(on)
    with _lock:
        _enabled = bool(on)
        _warned.clear()


def is_portable() -> bool:
    return _enabled


def advice(code: str) -> str:
    what, how = EXTENSIONS[code]
    return f"{what} is a capsule_nb extension, not Capsule's. The Capsule way: {how}"


def note(code: str) -> None:
    """Warn, once per extension, that ``code`` was used (when portable mode is on)."""
    if not _enabled:
        return
    with _lock:
        if code in _warned:
            return
        _warned.add(code)
    warnings.warn(advice(code), PortabilityWarning, stacklevel=user_level())


def user_level() -> int:
    """The stack level of the first caller outside capsule_nb: the user's line."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
