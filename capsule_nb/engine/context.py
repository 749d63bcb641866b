"""The context variables that say which run and which session code belongs to.

Async runs get them through the asyncio task's context and thread runs
through ``contextvars.copy_context().run``, so a ``print`` or a
``session.reply`` always finds its own run, whatever thread it is on. In a
worker process ``current_run`` is the job's ``ChildRun``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

# The live run (``engine.run.Run``, or ``workers.child.ChildRun`` in a worker process).
current_run: ContextVar[Any] = ContextVar("capsule_nb_run", default=None)
# The session a run was bound to; the engine only carries it, the session layer defines it.
bound_session: ContextVar[Any] = ContextVar("capsule_nb_session", default=None)
