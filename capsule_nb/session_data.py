"""``session.data``: a session's persistent JSON dict, as Capsule's ``SessionData``.

Capsule code uses it as a dict: ``session.data["theme"] = "dark"``, and also
``session.data.setdefault("history", []).append(item)`` or ``session.data["prefs"]["lang"] = "fr"``,
changes made *inside* a value; ``await session.data.set(key, value)`` says the write out loud.
So it is a ``dict`` (``isinstance`` and ``json.dumps`` work), whose lists and dicts know
where they are in it: each change is made to the stored data at once.

Why at once, not after the run as Capsule does: here one session is written by task threads,
other ``Session`` objects with its id, worker processes and other kernels, all at the same
time. Each change is made to the stored value in one transaction (an ``append`` appends
to the list as stored, not to a copy written back), so runs changing one session at once
never lose each other's changes. Reads through the dict's
methods see the store as it is now; C code reading the dict itself (``json.dumps``)
sees it as of the last read or write, or of ``session.data``, which reads it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .awaitables import DONE, ReadyNone
from .record import json_safe
from .store.rows import SESSION_DATA

if TYPE_CHECKING:
    from .store import Store

_MISSING = object()


class SessionData(dict):
    """The session's data; see the module's docstring."""

    def __init__(self, store: Callable[[], "Store"], session_id: str):
        super().__init__()
        self._store = store
        self._key = f"{SESSION_DATA}{session_id}/data"
        self._lock = threading.Lock()  # one session's data is read by many task threads at once

    # ------------------------------------------------------------------ reads

    def refresh(self) -> None:
        self._now()

    def _now(self) -> dict[str, Any]:
        """What the store holds now (tracked values, so changes inside them are kept), which
        this dict is set to as well; reads use what this gives, never the dict mid-change."""
        return self._show(self._store().get(self._key) or {})

    def _show(self, stored: dict[str, Any]) -> dict[str, Any]:
        now = {key: _tracked(value, self, (key,)) for key, value in stored.items()}
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

    @staticmethod
    def _checked(key: str, value: Any) -> Any:
        """``value`` as the store keeps it; a ``TypeError`` names a key or value JSON cannot hold."""
        if not isinstance(key, str):
            raise TypeError(f"session.data keys are strings (JSON's), not {key!r}")
        copy, ok = json_safe(_plain(value))
        if not ok:
            raise TypeError(f"session.data[{key!r}] must be JSON (str, number, list, dict), not {value!r}")
        return copy

    def _put(self, key: str, value: Any) -> None:
        plain = self._checked(key, value)
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
        """In one transaction: runs doing ``setdefault("history", []).append(x)`` at once
        must not each find the key missing and set it to ``[]`` over the others' items."""
        plain = self._checked(key, default)
        return _tracked(self._write(lambda data: data.setdefault(key, plain)), self, (key,))

    def update(self, *args: Any, **kwargs: Any) -> None:
        """All or none, in one transaction: a value JSON cannot hold keeps the others out too."""
        plain = {key: self._checked(key, value) for key, value in dict(*args, **kwargs).items()}
        self._write(lambda data: data.update(plain))

    def replace(self, value: dict[str, Any]) -> None:
        """Set the whole dict to ``value``, in one transaction."""
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise TypeError(f"session.data is a dict with string keys (JSON's), not {value!r}")
        plain, ok = json_safe(_plain(value))
        if not ok:
            raise TypeError(f"session.data must be JSON (str, number, list, dict), not {value!r}")
        self._write(lambda data: (data.clear(), data.update(plain)))

    def __ior__(self, other: Any) -> "SessionData":
        self.update(other)
        return self

    def __reduce__(self) -> Any:  # a copy of the data; the session itself crosses to a worker by path
        return (dict, (self.copy(),))


class _Tracked:
    """A list or dict inside ``session.data``, at ``path`` (its top-level key first). A change
    to it is made to the stored value, inside the transaction that writes it: two runs
    appending to one list at once each keep their item (a copy written back would lose
    one). Then it shows the stored value, others' changes included."""

    _root: SessionData
    _path: tuple[Any, ...]
    _plain_type: type  # what it is once it leaves (a copy, a pickle): a plain list or dict

    def __init__(self, items: Any, root: SessionData, path: tuple[Any, ...]):
        self._root, self._path = root, path
        self._show(items)

    def _show(self, items: Any) -> None:
        raise NotImplementedError

    def _change(self, name: str, args: tuple, kwargs: dict) -> Any:
        plain_args = _plain(args)
        kind, top = self._plain_type, self._path[0]

        def change(data: dict[str, Any]) -> tuple[Any, Any]:
            target: Any = data
            try:
                for step in self._path:
                    target = target[step]
            except (KeyError, IndexError, TypeError):
                raise KeyError(f"session.data[{top!r}] no longer holds this {kind.__name__} (it was changed or "
                               "deleted meanwhile): read it again") from None
            if type(target) is not kind:
                raise KeyError(f"session.data[{top!r}] no longer holds this {kind.__name__}: read it again")
            result = getattr(kind, name)(target, *plain_args, **kwargs)
            if not json_safe(data[top])[1]:
                raise TypeError(f"session.data[{top!r}] must be JSON (str, number, list, dict); "
                                f"{name}{args!r} would make it not")
            return result, _plain(target)

        result, now = self._root._write(change)
        self._show(now)
        return result

    def __reduce__(self) -> Any:
        return (self._plain_type, (_plain(self),))


class _TrackedList(_Tracked, list):
    _plain_type = list

    def _show(self, items: list) -> None:
        list.__init__(self, (_tracked(item, self._root, (*self._path, i)) for i, item in enumerate(items)))


class _TrackedDict(_Tracked, dict):
    _plain_type = dict

    def _show(self, items: dict) -> None:
        dict.clear(self)
        dict.update(self, ((k, _tracked(v, self._root, (*self._path, k))) for k, v in items.items()))


def _made_in_store(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._change(name, args, kwargs)
        if name in ("__iadd__", "__imul__", "__ior__"):
            return self
        if name == "setdefault":  # the value held now (tracked), not a copy
            return dict.__getitem__(self, args[0])
        return result

    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse"):
    setattr(_TrackedList, _name, _made_in_store(_name))
for _name in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_TrackedDict, _name, _made_in_store(_name))


def _tracked(value: Any, root: SessionData, path: tuple[Any, ...]) -> Any:
    if type(value) is list:
        return _TrackedList(value, root, path)
    if type(value) is dict:
        return _TrackedDict(value, root, path)
    return value


def _plain(value: Any) -> Any:
    """``value`` with tracked lists and dicts made plain (what the store keeps)."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
