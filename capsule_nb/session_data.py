"""``session.data``: a session's persistent JSON dict, as Capsule's ``SessionData``.

Capsule code uses it as a dict: ``session.data["theme"] = "dark"``, and also
``session.data.setdefault("history", []).append(item)`` or ``session.data["prefs"]["lang"] = "fr"``,
changes made *inside* a value; ``await session.data.set(key, value)`` says the write out loud.
So it is a ``dict`` (``isinstance`` and ``json.dumps`` work), whose lists and dicts report
their changes: each change writes its top-level key to the store at once.

Why at once, not after the run as Capsule does: here one session is written by task threads,
other ``Session`` objects with its id, worker processes and other kernels, all at the same
time. Each write changes the stored dict in one transaction and sets only the key it
changed, so writers of different keys never lose each other's. Reads through the dict's
methods see the store as it is now; C code reading the dict itself (``json.dumps``)
sees it as of the last read or write, or of ``session.data``, which reads it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .awaitables import DONE, ReadyNone
from .record import json_safe

if TYPE_CHECKING:
    from .store import Store

_MISSING = object()


class SessionData(dict):
    """The session's data; see the module's docstring."""

    def __init__(self, store: Callable[[], "Store"], session_id: str):
        super().__init__()
        self._store = store
        self._key = f"session/{session_id}/data"
        self._lock = threading.Lock()  # one session's data is read by many task threads at once

    # ------------------------------------------------------------------ reads

    def refresh(self) -> None:
        self._now()

    def _now(self) -> dict[str, Any]:
        """What the store holds now (tracked values, so changes inside them are kept), which
        this dict is set to as well; reads use what this gives, never the dict mid-change."""
        return self._show(self._store().get(self._key) or {})

    def _show(self, stored: dict[str, Any]) -> dict[str, Any]:
        now = {key: _tracked(value, self, key) for key, value in stored.items()}
        with self._lock:
            super().clear()
            super().update(now)
        return now

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._now().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._now()

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def keys(self) -> Any:
        return self._now().keys()

    def values(self) -> Any:
        return self._now().values()

    def items(self) -> Any:
        return self._now().items()

    def copy(self) -> dict[str, Any]:
        return _plain(self._now())

    def __eq__(self, other: object) -> bool:
        return self._now() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SessionData({self._now()!r})"

    # ----------------------------------------------------------------- writes

    def _write(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the stored dict in one transaction; gives what ``change`` gave."""
        given: list[Any] = []

        def changed(stored: Any) -> dict[str, Any]:
            data = dict(stored or {})
            given[:] = [change(data)]
            return data

        self._show(self._store().update_value(self._key, changed))
        return given[0]

    def _put(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session.data keys are strings (JSON's), not {key!r}")
        plain = _plain(value)
        if not json_safe(plain)[1]:
            raise TypeError(f"session.data[{key!r}] must be JSON (str, number, list, dict), not {value!r}")
        self._write(lambda data: data.__setitem__(key, plain))

    def __setitem__(self, key: str, value: Any) -> None:
        self._put(key, value)

    def set(self, key: str, value: Any) -> ReadyNone:
        """``session.data[key] = value``, awaitable as Capsule's ``await session.data.set(...)``."""
        self._put(key, value)
        return DONE

    def __delitem__(self, key: str) -> None:
        self._write(lambda data: data.__delitem__(key))

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        if default is _MISSING:
            return self._write(lambda data: data.pop(key))
        return self._write(lambda data: data.pop(key, default))

    def popitem(self) -> tuple[str, Any]:
        return self._write(lambda data: data.popitem())

    def clear(self) -> None:
        self._write(lambda data: data.clear())

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self._put(key, default)
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self._put(key, value)

    def __ior__(self, other: Any) -> "SessionData":
        self.update(other)
        return self

    def __reduce__(self) -> Any:  # a copy of the data; the session itself crosses to a worker by path
        return (dict, (self.copy(),))


class _Tracked:
    """A list or dict inside ``session.data``: a change to it, or to what it holds, writes
    its top-level value (``head``) again; new lists and dicts put in it are tracked too."""

    _root: SessionData
    _top: str
    _head: Any
    _plain_type: type  # what it is once it leaves (a copy, a pickle): a plain list or dict

    def _track(self, root: SessionData, key: str, head: Any) -> None:
        self._root, self._top, self._head = root, key, self if head is None else head

    def _changed(self) -> None:
        for place, item in self._places():
            if type(item) in (list, dict):
                self._set_plainly(place, _tracked(item, self._root, self._top, self._head))
        self._root._put(self._top, self._head)

    def __reduce__(self) -> Any:
        return (self._plain_type, (_plain(self),))


class _TrackedList(_Tracked, list):
    _plain_type = list

    def __init__(self, items: list, root: SessionData, key: str, head: Any = None):
        self._track(root, key, head)
        list.__init__(self, (_tracked(item, root, key, self._head) for item in items))

    def _places(self) -> Any:
        return enumerate(self)

    def _set_plainly(self, place: int, item: Any) -> None:
        list.__setitem__(self, place, item)


class _TrackedDict(_Tracked, dict):
    _plain_type = dict

    def __init__(self, items: dict, root: SessionData, key: str, head: Any = None):
        self._track(root, key, head)
        dict.__init__(self, ((k, _tracked(v, root, key, self._head)) for k, v in items.items()))

    def _places(self) -> Any:
        return list(dict.items(self))

    def _set_plainly(self, place: str, item: Any) -> None:
        dict.__setitem__(self, place, item)


def _write_back(name: str, container: type) -> Callable[..., Any]:
    base = getattr(container, name)

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = base(self, *args, **kwargs)
        self._changed()
        if name == "setdefault":  # the value now held (tracked), not the default given
            return dict.__getitem__(self, args[0])
        return result

    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse"):
    setattr(_TrackedList, _name, _write_back(_name, list))
for _name in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_TrackedDict, _name, _write_back(_name, dict))


def _tracked(value: Any, root: SessionData, key: str, head: Any = None) -> Any:
    if type(value) is list:
        return _TrackedList(value, root, key, head)
    if type(value) is dict:
        return _TrackedDict(value, root, key, head)
    return value


def _plain(value: Any) -> Any:
    """``value`` with tracked lists and dicts made plain (what the store keeps)."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
