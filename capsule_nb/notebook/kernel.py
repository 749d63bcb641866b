"""The little that capsule_nb needs from ipykernel, in one place.

A *cell target* is the parent header of the execute request that was
running when a run was submitted. Messages sent to iopub with that parent
are appended by JupyterLab to that cell's output, even after the cell has
finished, which is how a task's ``session.reply`` shows up under the cell
that submitted it rather than under whatever cell runs now.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

CellTarget = dict[str, Any]

log = logging.getLogger("capsule_nb")
_at_exit: list[Callable[[], None]] = []  # what runs when the kernel's shell is told to exit


def kernel() -> Any | None:
    """The running ipykernel, or None in a script or terminal IPython."""
    if "IPython" not in sys.modules:  # a plain script: nothing to look up (on the submit path)
        return None
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None) if shell is not None else None


def follow_default_session(old: Any, new: Any) -> None:
    """``configure(home=...)`` made a new default app: the notebook's ``session`` (put in the
    namespace by ``%load_ext``) becomes its session, unless the name was bound to another."""
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None and shell.user_ns.get("session") is old:
        shell.user_ns["session"] = new


def on_exit(callback: Callable[[], None]) -> None:
    """Call ``callback`` (once per process, however often given) when the kernel is shut down
    or restarted: ipykernel's ``do_shutdown`` sets the shell's ``exit_now``, before it ends the
    children of its process group and well before exit handlers would run. Nothing outside a kernel."""
    k = kernel()
    if k is None or callback in _at_exit:
        return
    if not _at_exit:
        k.shell.observe(_exiting, names="exit_now")
    _at_exit.append(callback)


def _exiting(change: dict[str, Any]) -> None:
    if not change["new"]:
        return
    for callback in list(_at_exit):
        try:
            callback()
        except Exception:  # the kernel goes away regardless
            log.exception("capsule_nb: a kernel shutdown step failed")


def cell_target() -> CellTarget | None:
    k = kernel() if "IPython" in sys.modules else None  # (each submit asks: a script's asks nothing more)
    if k is None:
        return None
    try:
        parent = k.get_parent("shell")
    except Exception:
        return None
    return parent if parent and parent.get("header") else None


def emit(target: CellTarget | None, data: dict[str, str], *, display_id: str | None = None,
         update: bool = False) -> bool:
    """Show a mime bundle under the cell ``target``; False when there is no kernel.

    With a ``display_id`` the output can be redrawn in place later:
    ``update=True`` sends ``update_display_data``, which the front end applies
    to the output with that id wherever it is, even while another cell runs.
    Safe from any thread: ipykernel's iopub socket queues sends to its own thread.
    """
    k = kernel()
    if k is None or target is None:
        return False
    kind = "update_display_data" if update else "display_data"
    k.session.send(
        k.iopub_socket,
        kind,
        {"data": data, "metadata": {}, "transient": {"display_id": display_id} if display_id else {}},
        parent=target,
        ident=k._topic(kind),
    )
    return True


def cell_id(target: CellTarget | None) -> str:
    """The execute request's id: what tells one cell's outputs from another's."""
    return str((target or {}).get("header", {}).get("msg_id", ""))


def notebook_cell(target: CellTarget | None) -> str | None:
    """The id of the notebook cell ``target`` runs, which stays with the cell across its runs
    and kernel restarts (JupyterLab and Notebook 7 send it with each execution), or None."""
    cell = ((target or {}).get("metadata") or {}).get("cellId")
    return cell if type(cell) is str and cell else None


def notebook_name() -> str | None:
    """The notebook's path when Jupyter tells the kernel (JupyterLab does)."""
    return os.environ.get("JPY_SESSION_NAME") or None
