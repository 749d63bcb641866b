"""The context variables that say which run and which session code belongs to.

Async runs get them through the asyncio task's context and thread runs
through ``contextvars.copy_context().run``, so a ``print`` or a
``session.reply`` always finds its own run, whatever thread it is on.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import Run
    from .session import Session

current_run: ContextVar["Run | None"] = ContextVar("capsule_nb_run", default=None)
bound_session: ContextVar["Session | None"] = ContextVar("capsule_nb_session", default=None)

