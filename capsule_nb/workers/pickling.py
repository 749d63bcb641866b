"""Pickling calls for another process, once, with errors that name the bad value.

A call travels as two pickles: the arguments, pickled once at submit (the
same bytes are kept in the store when the run must be resumable, and sent
to the worker), and the function with the run's session. cloudpickle sends
a notebook function by value, with the globals it uses, so that pickle is
made again at every submit: a global may have changed. A function a worker
can import goes by reference, the same bytes each time, so a
``CallPickler`` keeps them. Arguments that are builtin data only go
through the standard pickler, which writes what cloudpickle would, faster.
"""

from __future__ import annotations

import functools
import inspect
import io
import pickle
import types
import weakref
from collections import ChainMap
from typing import Any, Callable, Iterator, NamedTuple

import cloudpickle

_SEARCH_DEPTH = 4  # how deep an unpicklable value is looked for inside containers
_SEARCH_WIDTH = 200  # items looked at per container
_PLAIN_ITEMS = 1000  # builtin data up to this many items skips cloudpickle's per-object hook
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


class Call(NamedTuple):
    """What a worker needs to run one call: ``function`` is cloudpickle of
    ``(fn, session, session_param)``, ``arguments`` of ``(args, kwargs)``. ``kept``: the
    function's bytes are the same at every call (``CallPickler``), so a worker may keep what
    it unpickled from them for the next job (a session costs ~15 µs to rebuild); a function
    sent by value is rebuilt for each job, with fresh globals, as ever."""

    function: bytes
    arguments: bytes
    kept: bool = False


def _kind(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _code_globals(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_globals(const)


def _parts(value: Any) -> Iterator[tuple[str, Any]]:
    """The parts of ``value`` that pickling it would pickle, each with how to name it."""
    if isinstance(value, dict):
        for key, item in list(value.items())[:_SEARCH_WIDTH]:
            yield f"[{key!r}]", item
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value[:_SEARCH_WIDTH]):
            yield f"[{index}]", item
    elif isinstance(value, (set, frozenset)):
        for item in list(value)[:_SEARCH_WIDTH]:
            yield " (an item)", item
    elif isinstance(value, functools.partial):
        yield ".func", value.func
        yield from ((f" (partial argument {i})", a) for i, a in enumerate(value.args))
        yield from ((f" (partial argument {k!r})", a) for k, a in value.keywords.items())
    elif isinstance(value, types.MethodType):
        yield ".__self__", value.__self__
        yield ".__func__", value.__func__
    elif isinstance(value, types.FunctionType):
        code = value.__code__
        for name, cell in zip(code.co_freevars, value.__closure__ or ()):
            try:
                yield f" (closure variable {name!r})", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        seen = set()
        for name in _code_globals(code):
            if name in value.__globals__ and name not in seen:
                seen.add(name)
                yield f" (global {name!r})", value.__globals__[name]
    elif not isinstance(value, (type, types.ModuleType)) and isinstance(getattr(value, "__dict__", None), dict):
        for name, item in list(vars(value).items())[:_SEARCH_WIDTH]:
            yield f".{name}", item


def _culprit(value: Any, path: str = "", depth: int = 0) -> tuple[str, Any, Exception] | None:
    """``(path, part, error)`` for the innermost part of ``value`` that does not pickle; None if it pickles."""
    try:
        cloudpickle.dumps(value)
        return None
    except Exception as exc:
        error = exc
    if depth < _SEARCH_DEPTH:
        for suffix, part in _parts(value):
            found = _culprit(part, path + suffix, depth + 1)
            if found is not None:
                return found
    return path, value, error


def unpicklable(label: str, value: Any) -> str | None:
    """A sentence naming what in ``value`` cannot be pickled, or None if it pickles."""
    found = _culprit(value)
    if found is None:
        return None
    path, part, error = found
    return f"{label}{path} is a {_kind(part)}, which cannot be pickled ({type(error).__name__}: {error})"


def check_picklable(args: tuple = (), kwargs: dict | None = None, fn: Callable[..., Any] | None = None) -> None:
    """Raise ``TypeError`` naming the argument (or the part of ``fn``) that cannot go to a worker.

    Call it at submit. ``fn`` is optional; when given, its parameter names
    are used in the message and the function itself is checked too (a
    notebook function goes by value, with the globals it uses).
    """
    kwargs = kwargs or {}
    try:
        cloudpickle.dumps((fn, args, kwargs))
        return
    except Exception as exc:
        whole = exc
    names: list[str] = []
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            pass
    call = f"{_fn_name(fn)}()" if fn is not None else "the call"
    labelled: list[tuple[str, Any]] = []
    if fn is not None:
        labelled.append(("the function", fn))
    for index, value in enumerate(args):
        name = f" {names[index]!r}" if index < len(names) else ""
        labelled.append((f"argument{name} (position {index})", value))
    for key, value in kwargs.items():
        labelled.append((f"argument {key!r}", value))
    for label, value in labelled:
        problem = unpicklable(label, value)
        if problem is not None:
            raise TypeError(f"cannot send {call} to a worker process: {problem}")
    raise TypeError(f"cannot send {call} to a worker process: {type(whole).__name__}: {whole}")


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def pickle_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """``(args, kwargs)`` pickled; a ``TypeError`` names a value that cannot go."""
    value = (tuple(args), dict(kwargs))
    if (not kwargs and _SCALARS.issuperset(map(type, args))) or _plain(value):  # (the first: most calls, at C speed)
        return pickle.dumps(value, protocol=cloudpickle.DEFAULT_PROTOCOL)
    try:
        return cloudpickle.dumps(value)
    except Exception:
        check_picklable(args, kwargs, fn)
        raise


def pickle_value(value: Any) -> bytes:
    """A return value for the parent: builtin data at C speed (cloudpickle costs ~2.5 µs more
    for ``None``), anything else through cloudpickle (a class or a function made in the task)."""
    if type(value) in _SCALARS or _plain(value):
        return pickle.dumps(value, protocol=cloudpickle.DEFAULT_PROTOCOL)
    return cloudpickle.dumps(value)


def _plain(value: Any) -> bool:
    """Whether ``value`` is builtin scalars in lists, tuples and dicts, ``_PLAIN_ITEMS`` at most."""
    stack, budget = [value], _PLAIN_ITEMS
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        else:
            return False
        budget -= len(item)
        if budget < 0:
            return False
    return True


def _code_reduce(code: types.CodeType) -> tuple:
    """cloudpickle's reduction of a code object, keeping the file it was defined in."""
    rebuild, args = _cloudpickle_code_reduce(code)
    return rebuild, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table.get(types.CodeType)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that a function sent by value keeps its ``co_filename`` (cloudpickle
    writes ``<dynamic-code>``, for payloads that do not depend on where code was defined): a
    worker's traceback then names the notebook cell's file, and the kernel, which has that
    cell's lines, can show them (``engine.run.Failure.from_worker``). A cloudpickle that
    reduces code some other way is used as it is."""

    if _cloudpickle_code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def _dumps(value: Any) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(value)
        return file.getvalue()


def pickle_function(fn: Callable[..., Any], session: Any = None, session_param: str | None = None) -> bytes:
    """``(fn, session, session_param)`` as cloudpickle bytes; a ``TypeError`` names what cannot go."""
    try:
        return _dumps((fn, session, session_param))
    except Exception:
        check_picklable((), {}, fn)
        if session is not None and (problem := unpicklable("the session", session)):
            raise TypeError(f"cannot send {_fn_name(fn)}() to a worker process: {problem}") from None
        raise


def _by_reference(fn: Callable[..., Any]) -> bool:
    """Whether cloudpickle sends ``fn`` as its module and name (a function a worker can
    import): then it writes the very bytes the standard pickler does, the same at every call."""
    try:
        return cloudpickle.dumps(fn) == pickle.dumps(fn, protocol=cloudpickle.DEFAULT_PROTOCOL)
    except Exception:
        return False


def pickle_call(fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, session: Any = None,
                session_param: str | None = None, *, arguments: bytes | None = None,
                function: bytes | None = None) -> Call:
    """The ``Call`` for ``fn(*args, **kwargs)``, reusing ``arguments`` or ``function`` when
    already pickled.

    ``session`` is bound as the child's session, and handed to the
    ``session_param`` parameter when there is one. ``TypeError`` names what
    cannot be pickled.
    """
    if arguments is None:
        arguments = pickle_arguments(fn, args, kwargs or {})
    kept = function is not None
    if function is None:
        function = pickle_function(fn, session, session_param)
    return Call(function, arguments, kept)


class CallPickler:
    """Pickles a runtime's calls, keeping the function's pickle where it is the same bytes
    every time: an importable function (it goes by reference) with the runtime's own session.
    A function defined in a cell goes by value, with its globals, so it is pickled at every call."""

    def __init__(self, session: Any):
        self._session = session
        # Held weakly: a cell run again defines a new function, and the old one (its defaults,
        # its closure) must go with its task.
        self._functions: weakref.WeakKeyDictionary[Callable[..., Any], bytes | None] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref, bytes | None] | None = None  # the function pickled last, and what it keeps

    def pickle(self, fn: Callable[..., Any], args: tuple, kwargs: dict, session: Any,
               session_param: str | None) -> Call:
        if session is not self._session:
            return pickle_call(fn, args, kwargs, session, session_param)
        last = self._last
        if last is not None and last[0]() is fn:  # a burst submits one task: no dictionary look-up
            return pickle_call(fn, args, kwargs, session, session_param, function=last[1])
        try:
            known, function = fn in self._functions, self._functions.get(fn)
        except TypeError:  # no weak reference to it (a builtin): pickled at every call
            return pickle_call(fn, args, kwargs, session, session_param)
        call = pickle_call(fn, args, kwargs, session, session_param, function=function)
        if not known:
            function = self._functions[fn] = call.function if _by_reference(fn) else None
        self._last = (weakref.ref(fn), function)
        return call
