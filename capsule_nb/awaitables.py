"""Values that are already computed but may also be awaited.

Capsule code always writes ``await task.submit(...)`` / ``await task.count()``;
a notebook user often forgets the ``await``. Both must work, so the calls
do their work at once and return a value that is usable as it is and
also awaitable (awaiting gives the plain value).
"""

from __future__ import annotations

import asyncio
from typing import Any, Generator


class ReadyInt(int):
    def __await__(self) -> Generator[Any, None, int]:
        return int(self)
        yield  # pragma: no cover - makes this a generator


class ReadyStr(str):
    def __await__(self) -> Generator[Any, None, str]:
        return str(self)
        yield  # pragma: no cover


class ReadyList(list):
    def __await__(self) -> Generator[Any, None, list]:
        return list(self)
        yield  # pragma: no cover


class ReadyBool:
    """``bool`` cannot be subclassed; this is truthy like the bool and awaits to it."""

    __slots__ = ("value",)

    def __init__(self, value: bool):
        self.value = bool(value)

    def __bool__(self) -> bool:
        return self.value

    def __eq__(self, other: object) -> bool:
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __await__(self) -> Generator[Any, None, bool]:
        return self.value
        yield  # pragma: no cover


class ReadyNone:
    """What a fire-and-forget call (``session.reply``) returns: ``await`` it or not."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return None
        yield  # pragma: no cover

    def __repr__(self) -> str:
        return "None"

    def _ipython_display_(self) -> None:
        """As the last line of a cell it shows nothing, like None."""


DONE = ReadyNone()


class ReadyValue:
    """Any other value (a document, a card, or None): ``await`` it for the value, or use it
    as it is in sync code, where it stands in for the value (``.value`` is the value itself)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # pragma: no cover

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value, name)

    def __getitem__(self, key: Any) -> Any:
        return self.value[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.value

    def __iter__(self) -> Any:
        return iter(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, ReadyValue) else other)

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def resolve(future: "asyncio.Future[None]", failure: BaseException | None = None) -> None:
    """Settle a future unless it is done (for ``call_soon_threadsafe``)."""
    if not future.done():
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
