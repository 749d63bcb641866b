"""How a run's messages look in a cell, and the ``Display`` that puts them there.

The engine hands every message of a bound run to a ``Display``; in a kernel
it is ``KernelDisplay``, which sends the message to iopub with the parent
header of the cell that submitted the run, so it appears under that cell.
"""

from __future__ import annotations

from typing import Any

from . import kernel


def render_message(kind: str, text: str, extra: dict[str, Any]) -> dict[str, str]:
    """The mime bundle a message shows as in a cell."""
    detail = extra.get("detail") or ""
    if kind == "notify":
        plain = f"[notify] {text}" + (f" — {detail}" if detail else "")
        markdown = f"🔔 **{text}**" + (f"  \n{detail}" if detail else "")
    else:
        plain, markdown = text, text
    return {"text/plain": plain, "text/markdown": markdown}


class KernelDisplay:
    """``engine.run.Display`` for a Jupyter kernel (a script has no kernel: it shows nothing)."""

    def message(self, target: Any, kind: str, text: str, extra: dict[str, Any]) -> None:
        kernel.emit(target, render_message(kind, text, extra))

    def show(self, target: Any, bundle: dict[str, str]) -> bool:
        return kernel.emit(target, bundle)
