"""Values that are already computed but may also be awaited.

Capsule code always writes ``await task.submit(...)`` / ``await task.count()``;
a notebook user often forgets the ``await``. Both must work, so the calls
do their work at once and return a value that is usable as it is and
also awaitable (awaiting gives the plain value).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generator


class Steps:
    """``send``, ``throw`` and ``close`` over ``__await__``. With them an awaitable is a
    coroutine to asyncio (``collections.abc.Coroutine``): Capsule's methods are coroutine
    functions, so Capsule code may hand what they return to what takes only coroutines,
    ``asyncio.create_task(task.submit(...))``, ``asyncio.run(...)``, a ``TaskGroup``. As with a
    coroutine, one task steps it at a time; ``await`` it as often as you like."""

    __slots__ = ()

    def send(self, value: Any) -> Any:
        return self._step(lambda steps: steps.send(value))

    def throw(self, *error: Any) -> Any:
        return self._step(lambda steps: steps.throw(*error))

    def close(self) -> None:
        steps = getattr(self, "_steps", None)
        self._steps = None
        if steps is not None:
            steps.close()

    def _step(self, step: Callable[[Generator[Any, Any, Any]], Any]) -> Any:
        steps = getattr(self, "_steps", None)
        if steps is None:
            steps = self._steps = self.__await__()  # type: ignore[attr-defined]
        try:
            return step(steps)
        except BaseException:  # done (StopIteration carries the value) or failed: a next use starts anew
            self._steps = None
            raise


class ReadyInt(int, Steps):
    def __await__(self) -> Generator[Any, None, int]:
        return int(self)
        yield  # pragma: no cover - makes this a generator


class ReadyStr(str, Steps):
    def __await__(self) -> Generator[Any, None, str]:
        return str(self)
        yield  # pragma: no cover


class ReadyList(list, Steps):
    """A page of results. Hashed by identity, as a coroutine is: ``asyncio.gather`` and
    ``as_completed`` key what they are given by it (a list cannot be a key), and two
    equal pages from two calls stay two."""

    __hash__ = object.__hash__

    def __await__(self) -> Generator[Any, None, list]:
        return list(self)
        yield  # pragma: no cover


class ReadyDict(dict, Steps):
    """A document or a write's summary: a real dict (``json.dumps``, item assignment,
    ``isinstance(d, dict)``), which ``await`` gives as a plain one. Hashed by identity, as
    ``ReadyList`` is (two inserts of one document stay two writes to ``gather``)."""

    __hash__ = object.__hash__

    @property
    def value(self) -> dict:
        """The plain dict (what 0.1's stand-in called ``.value``)."""
        return dict(self)

    def __await__(self) -> Generator[Any, None, dict]:
        return dict(self)
        yield  # pragma: no cover


class ReadyBool(Steps):
    """``bool`` cannot be subclassed; this is truthy like the bool and awaits to it. It equals
    only a bool: were it equal to 1 as ``True`` is, ``gather(coll.count(), h.cancel())`` would
    take the two for one and give ``[1, 1]``."""

    __slots__ = ("value", "_steps")

    def __init__(self, value: bool):
        self.value = bool(value)
        self._steps = None

    def __bool__(self) -> bool:
        return self.value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ReadyBool):
            return self.value is other.value
        return self.value is other if type(other) is bool else NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __await__(self) -> Generator[Any, None, bool]:
        return self.value
        yield  # pragma: no cover


class ReadyNone(Steps):
    """What a fire-and-forget call (``session.reply``) returns, and a lookup that found
    nothing (``app.tasks.get``): ``await`` it or not. Falsy and equal to None, as far as
    a stand-in can be (``is None`` cannot be true of it)."""

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps = None

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, ReadyNone)

    def __hash__(self) -> int:
        return hash(None)

    def __await__(self) -> Generator[Any, None, None]:
        return None
        yield  # pragma: no cover

    def __repr__(self) -> str:
        return "None"

    @property
    def value(self) -> None:
        """None (what 0.1's stand-in called ``.value``)."""
        return None

    def _ipython_display_(self) -> None:
        """As the last line of a cell it shows nothing, like None."""


DONE = ReadyNone()


def unwrapped(value: Any) -> Any:
    """``value`` with the stand-ins for None and bools in it (nested too) made the plain ones,
    for what stores JSON: ``json`` knows only the plain ones. ``value`` itself when it has none."""
    if isinstance(value, ReadyNone):
        return None
    if isinstance(value, ReadyBool):
        return value.value
    if isinstance(value, dict):
        items = {key: unwrapped(item) for key, item in value.items()}
        return value if all(items[key] is item for key, item in value.items()) else items
    if isinstance(value, (list, tuple)):
        items = [unwrapped(item) for item in value]
        changed = any(a is not b for a, b in zip(items, value))
        return (tuple(items) if isinstance(value, tuple) else items) if changed else value
    return value


def resolve(future: "asyncio.Future[None]", failure: BaseException | None = None) -> None:
    """Settle a future unless it is done (for ``call_soon_threadsafe``)."""
    if not future.done():
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
