"""The notebook layer: the kernel glue, the magics, and how messages show in cells.

``%load_ext capsule_nb`` binds the default app's runtime to the kernel's loop,
routes task output, adds the magics and puts ``cpsl`` and the notebook's
``session`` in the namespace.
"""

from __future__ import annotations

import asyncio
from typing import Any


def load_ipython_extension(ip: Any) -> None:
    import capsule_nb

    from ..app import default_app
    from ..engine import capture
    from . import magics, messages, unawaited

    app = default_app()
    try:
        app.runtime.loops.bind(asyncio.get_running_loop())
    except RuntimeError:
        pass  # terminal IPython: the runtime starts its own loop thread when needed
    capture.install()
    app.runtime.start_maintenance()  # again after an unload stopped it
    magics.register(ip)
    unawaited.register(ip)
    if messages.flush_held not in ip.events.callbacks["post_run_cell"]:
        ip.events.register("post_run_cell", messages.flush_held)
    ip.user_ns.setdefault("cpsl", capsule_nb)
    ip.user_ns.setdefault("session", app.session)


def unload_ipython_extension(ip: Any) -> None:
    from ..app import default_app
    from ..engine import capture
    from . import messages, unawaited

    unawaited.unregister(ip)
    if messages.flush_held in ip.events.callbacks["post_run_cell"]:
        ip.events.unregister("post_run_cell", messages.flush_held)
    default_app().runtime.shutdown()
    capture.uninstall()
