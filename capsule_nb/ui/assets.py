"""The front end's source: ES modules and CSS read from ``js/``, with no build step.

anywidget loads a widget's ``_esm`` from a string (as a Blob URL), so a
module cannot reach a sibling file by path. ``esm()`` therefore links the
one form of import the modules use, ``import { ... } from "./other.js"``,
by inlining ``other.js`` as a ``data:`` URL. The browser still sees plain
ES modules, and a saved notebook carries everything it needs to draw.

Every widget carries its module and its CSS (in its first message, and in
a saved notebook), so the text sent leaves out what a browser does not read:
whole-line comments, indentation and blank lines. That is safe because
the modules keep no string or template literal over several lines
(``tests/test_ui.py`` checks).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent

# A relative import of a sibling module: `from "./task_card.js"`.
_SIBLING = re.compile(r"""(\bfrom\s*)(["'])\./([\w.-]+\.js)\2""")
# What a data: URL in a "..." string must escape: the rest of a module goes as it is (percent
# escapes grow a nested module far less than base64 would).
_URL_UNSAFE = re.compile(r'[%"\\#\n\r\t]')


def js_dir() -> Path:
    """``capsule_nb/js`` in a wheel (force-included), ``js/`` beside the package in a checkout."""
    for candidate in (_PACKAGE / "js", _PACKAGE.parent / "js"):
        if (candidate / "task_card.js").is_file():
            return candidate
    raise FileNotFoundError(f"capsule_nb's front end (js/task_card.js) is missing near {_PACKAGE}")


def _compact(source: str) -> str:
    """``source`` without whole-line comments, indentation and blank lines."""
    kept, in_comment = [], False
    for line in source.splitlines():
        text = line.strip()
        if in_comment:
            in_comment = "*/" not in text
        elif text.startswith("/*") and ("*/" not in text or text.endswith("*/")):
            in_comment = "*/" not in text
        elif text and not text.startswith("//"):
            kept.append(text)
    return "\n".join(kept) + "\n"


@functools.cache
def esm(name: str) -> str:
    """The module ``name``, compacted, with its sibling imports inlined as ``data:`` URLs."""
    source = _compact((js_dir() / name).read_text(encoding="utf-8"))

    def link(match: re.Match[str]) -> str:
        encoded = _URL_UNSAFE.sub(lambda c: f"%{ord(c[0]):02X}", esm(match[3]))
        return f'{match[1]}"data:text/javascript,{encoded}"'

    return _SIBLING.sub(link, source)


@functools.cache
def css(name: str = "shared.css") -> str:
    return _compact((js_dir() / name).read_text(encoding="utf-8"))
