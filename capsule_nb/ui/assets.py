"""The front end's source: ES modules and CSS read from ``js/``, with no build step.

anywidget loads a widget's ``_esm`` from a string (as a Blob URL), so a
module cannot reach a sibling file by path. ``esm()`` therefore links the
one form of import the modules use, ``import { ... } from "./other.js"``,
by inlining ``other.js`` as a ``data:`` URL. The browser still sees plain
ES modules, and a saved notebook carries everything it needs to draw.
"""

from __future__ import annotations

import base64
import functools
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent

# A relative import of a sibling module: `from "./task_card.js"`.
_SIBLING = re.compile(r"""(\bfrom\s*)(["'])\./([\w.-]+\.js)\2""")


def js_dir() -> Path:
    """``capsule_nb/js`` in a wheel (force-included), ``js/`` beside the package in a checkout."""
    for candidate in (_PACKAGE / "js", _PACKAGE.parent / "js"):
        if (candidate / "task_card.js").is_file():
            return candidate
    raise FileNotFoundError(f"capsule_nb's front end (js/task_card.js) is missing near {_PACKAGE}")


@functools.cache
def esm(name: str) -> str:
    """The module ``name`` with its sibling imports inlined as ``data:`` URLs."""
    source = (js_dir() / name).read_text(encoding="utf-8")

    def link(match: re.Match[str]) -> str:
        encoded = base64.b64encode(esm(match[3]).encode("utf-8")).decode("ascii")
        return f'{match[1]}"data:text/javascript;base64,{encoded}"'

    return _SIBLING.sub(link, source)


@functools.cache
def css(name: str = "shared.css") -> str:
    return (js_dir() / name).read_text(encoding="utf-8")
