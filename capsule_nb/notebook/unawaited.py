"""A handle's ``wait()`` or ``result()`` left as a cell's value: the ``await`` forgotten.

Both give a coroutine (the kernel's loop cannot be blocked to wait), and a cell ending in
``h.result()`` showed ``<coroutine object TaskHandle._result at 0x7f…>``, which says
nothing of what to do (w51). IPython shows such a coroutine with what to write instead;
any other coroutine as it always did.
"""

from __future__ import annotations

import types
from typing import Any

from ..handle import TaskHandle

_OURS = {TaskHandle._wait.__code__: "wait", TaskHandle._result.__code__: "result"}


def _pretty(coroutine: types.CoroutineType, printer: Any, cycle: bool) -> None:
    what = _OURS.get(coroutine.cr_code)
    handle = coroutine.cr_frame.f_locals.get("self") if what and coroutine.cr_frame is not None else None
    if not isinstance(handle, TaskHandle):
        printer.text(repr(coroutine))
        return
    printer.text(f"<{what}() of run {handle.task_id}, not awaited: write `await h.{what}()` "
                 f"(in a script, `asyncio.run(h.{what}())`)>")


def register(ip: Any) -> None:
    ip.display_formatter.formatters["text/plain"].for_type(types.CoroutineType, _pretty)


def unregister(ip: Any) -> None:
    printers = ip.display_formatter.formatters["text/plain"].type_printers
    if printers.get(types.CoroutineType) is _pretty:
        del printers[types.CoroutineType]
