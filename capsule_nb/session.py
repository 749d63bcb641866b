"""Sessions: who a run works for, and where its messages go.

In Capsule a session is the chat a task was started from. In a notebook
the notebook itself is the session: ``%load_ext capsule_nb`` puts it in
the namespace as ``session``. A run submitted with ``session=`` is
*bound*: its replies appear on its card and under the cell that submitted
it. Every method works awaited (Capsule code) and called plainly (a sync
task or a cell), because each does its work at once and returns an
already-finished awaitable.

A session crosses into a worker process by value (``__reduce__``): there it
keeps its ``id`` and ``user``, opens the same store by path for ``data``
and ``db``, and its messages go to the parent through the job's run; a
``show_task`` there asks the parent, where the run's session draws the card.
"""

from __future__ import annotations

import asyncio
import decimal
import getpass
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterable, Callable, Iterable

from . import portable
from .awaitables import DONE, ReadyNone, ReadyStr
from .checks import text_or_none
from .collections import Database
from .engine.context import current_run
from .notebook import kernel
from .notebook.messages import render_message
from .record import new_task_id
from .session_data import SessionData
from .store import Store, open_store

if TYPE_CHECKING:
    from .app import App
    from .handle import TaskHandle


@dataclass(frozen=True)
class User:
    id: str
    email: str | None = None
    org_id: str | None = None
    owner_id: str | None = None


def local_user() -> User:
    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        name = "owner"
    return User(id=name, email=None, org_id=None, owner_id=name)


class Session:
    """A Capsule session: ``id``, ``user``, ``data``, ``db`` and the messaging calls."""

    def __init__(self, app: "App | None", id: str, user: User | None = None, *, home: str | Path | None = None):
        self.id = id
        self.user = user or local_user()
        self._app = app  # None in a worker process, where only the store (by path) is at hand
        self._home = Path(home) if home is not None else app.home  # type: ignore[union-attr]
        self._data = SessionData(self._store, id)

    _run: Any = None  # the run this session was handed to (``bound_to``), if any

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, user={self.user.id!r})"

    def bound_to(self, run: Any) -> "Session":
        """This session as a run's function gets it: what it says goes to ``run`` from any
        thread the function starts (a ``ThreadPoolExecutor`` does not carry the run's context
        over, and nothing here may patch the standard library to make it)."""
        bound = object.__new__(type(self))  # (not ``copy.copy``: it would go through ``__reduce__``)
        bound.__dict__.update(self.__dict__, _run=run)
        return bound

    def _current_run(self) -> Any:
        """The run code here runs in (a run started from this one has its own), else the
        run this session was handed to."""
        return current_run.get() or self._run

    def __reduce__(self) -> tuple:
        """To a worker process: the same id and user, on the same store by path."""
        return _detached_session, (self.id, self.user, str(self._home))

    @property
    def data(self) -> SessionData:
        """The session's data (``session_data.py``), as the store holds it now: code that reads
        the dict itself (``json.dumps``) sees it too, not only its methods."""
        self._data.refresh()
        return self._data

    @data.setter
    def data(self, value: dict[str, Any]) -> None:
        """``session.data = {...}`` sets the whole dict; ``session.data |= {...}`` lands here too."""
        if value is not self._data:
            self._data.replace(value)

    def _store(self) -> Store:
        return self._app.store if self._app is not None else open_store(self._home)

    @property
    def db(self) -> Database:
        """The app's document collections: ``session.db.reports`` or ``session.db["reports"]``."""
        return Database(self._store())

    @property
    def cancelled(self) -> bool:
        """True inside a run that has been asked to stop: a long loop can check it and return."""
        run = self._current_run()
        return bool(run is not None and run.stop_reason)

    # -------------------------------------------------------------- messages

    def _post(self, kind: str, text: str, **extra: Any) -> None:
        """In a run: kept with the run. In a cell: shown in the cell (printed outside a kernel)."""
        run = self._current_run()
        if run is not None:
            run.message(kind, str(text), **extra)
        elif not self._show(kernel.cell_target(), kind, str(text), extra, new_task_id()):
            print(render_message(kind, str(text), extra)["text/plain"])

    def _show(self, target: Any, kind: str, text: str | Callable[[], str], extra: dict[str, Any], message_id: str,
              update: bool = False) -> bool:
        """A message from a cell, through the app's display (the one a run's messages take)."""
        if self._app is None:
            return False
        display = self._app.runtime.display
        if update:
            return display.update(target, kind, text, extra, message_id=message_id)
        return display.message(target, kind, text, extra, message_id=message_id, session_id=self.id)

    def reply(self, text: str) -> ReadyNone:
        """A message to the user: on the run's card and, when bound, under the submitting cell."""
        self._post("reply", text)
        return DONE

    def notify(self, text: str, *, detail: str = "") -> ReadyNone:
        self._post("notify", text, detail=detail)
        return DONE

    def log(self, text: str) -> ReadyNone:
        """A line for the card's log; not shown in the cell."""
        portable.note("progress_log")
        run = self._current_run()
        if run is not None:
            run.message("log", str(text))
        else:
            print(text)
        return DONE

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> ReadyNone:
        """Drive the card's progress bar (``total=None``: an open-ended count)."""
        done = _amount("done", done)
        total = None if total is None else _amount("total", total)
        portable.note("progress_log")
        run = self._current_run()
        if run is not None:
            run.progress(done, total, message)
        return DONE

    def stream(self, chunks: AsyncIterable[str] | Iterable[str]) -> Any:
        """Grow one message from ``chunks`` as they come.

        An async iterable gives a coroutine to await (from a sync task the
        call blocks until the stream ends, on the runtime's loop).
        """
        return self._stream(chunks, give_text=False)

    def stream_reply_from(self, stream: AsyncIterable[str] | Iterable[str]) -> Any:
        """``stream``, giving back the whole text once it ends (Capsule's, for a model's answer)."""
        return self._stream(stream, give_text=True)

    def _stream(self, chunks: AsyncIterable[str] | Iterable[str], give_text: bool) -> Any:
        if not hasattr(chunks, "__aiter__") and not hasattr(chunks, "__iter__"):
            raise TypeError(f"session.stream() takes an iterable or async iterable of text chunks, got {chunks!r}")
        if hasattr(chunks, "__aiter__"):
            coro = self._stream_async(chunks, give_text)  # type: ignore[arg-type]
            if _on_a_loop():
                return coro
            if self._app is None:  # a worker process: no runtime loop to borrow
                text = asyncio.run(coro)
            else:
                text = self._app.runtime.loops.run_coroutine(coro)
        else:
            parts = []
            with self.stream_reply() as out:
                for chunk in chunks:  # type: ignore[union-attr]
                    out.write(chunk)
                    parts.append(str(chunk))
            text = "".join(parts)
        return ReadyStr(text) if give_text else DONE

    async def _stream_async(self, chunks: AsyncIterable[str], give_text: bool) -> str | None:
        parts = []
        with self.stream_reply() as out:
            async for chunk in chunks:
                out.write(chunk)
                parts.append(str(chunk))
        return "".join(parts) if give_text else None

    def stream_reply(self) -> "StreamReply":
        """``with session.stream_reply() as out: out.write(...)`` (``async with`` works too)."""
        return StreamReply(self)

    def show_task(self, handle_or_id: "TaskHandle | str", *, message: str | None = None) -> ReadyNone:
        """Show a live card for a run: in the current cell, or under the submitting cell from a task.

        Gives nothing back (awaited or not), so a cell ending with it shows the card once.
        In a worker process the parent draws the card (a worker knows no widgets) and looks
        the run up: the worker's view of the store may not have the parent's newest runs yet.
        An empty id shows nothing, as in Capsule (whose refused submits give one).
        """
        text_or_none("show_task message", message)
        if handle_or_id == "" or getattr(handle_or_id, "task_id", None) == "":
            return DONE
        run = self._current_run()
        if self._app is None:
            if run is not None:  # to the parent, whose session for the run comes back here
                self._store().flush()  # (a run submitted here is on disk before the parent looks it up)
                run.show_task(handle_or_id if isinstance(handle_or_id, str) else handle_or_id.task_id, message)
            return DONE
        from . import ui

        handle = handle_or_id if hasattr(handle_or_id, "task_id") else self._app.get_task(handle_or_id)
        if handle is None:
            raise KeyError(f"show_task: no run {handle_or_id!r} in the store at {self._app.home}")
        card = ui.TaskCard(handle, message=message)
        if run is None:
            ui.display(card)
            return DONE
        bundle = card._repr_mimebundle_()[0] if hasattr(card, "_repr_mimebundle_") else {"text/plain": repr(card)}
        if not run.show(handle.task_id, bundle):
            card.close()  # no cell to show it in: the show_task message on the record remains
        return DONE


class StreamReply:
    """A message that grows: text written here is appended to one reply.

    In a run the reply grows on the run's record and, for a bound run, in
    place under the submitting cell. In a cell it is one output that grows in
    place; outside a kernel it is printed whole when the stream closes.
    """

    def __init__(self, session: Session):
        self._session = session
        self._run = session._current_run()
        self._target = kernel.cell_target() if self._run is None else None
        self._id: str | None = None
        self._parts: list[str] = []
        self._shown = False  # the cell output exists (a kernel is there)

    def write(self, text: str) -> None:
        text = str(text)
        if self._run is not None:
            if self._id is None:
                self._id = self._run.message("stream", text)
            else:
                self._run.extend_message(self._id, text)
            return
        self._parts.append(text)
        if self._id is None:
            self._id = new_task_id()
            self._shown = self._session._show(self._target, "stream", text, {}, self._id)
        elif self._shown:  # the whole text is joined only for a redraw that goes out, not at every write
            self._session._show(self._target, "stream", self._text, {}, self._id, update=True)

    def _text(self) -> str:
        return "".join(self._parts)

    def close(self) -> None:
        """The stream has ended: its last text shows now (a redraw may be held back), or is printed
        outside a kernel."""
        if self._id is not None and self._run is not None:
            self._run.end_message(self._id)
        elif self._id is not None and self._shown:
            self._session._app.runtime.display.flush(self._id)  # type: ignore[union-attr]
        elif self._run is None and self._parts:
            print(render_message("stream", "".join(self._parts), {})["text/plain"])
            self._parts.clear()

    def __enter__(self) -> "StreamReply":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "StreamReply":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


def _amount(name: str, value: Any) -> int | float:
    """A progress count as JSON keeps it (a NumPy number, a Fraction or a Decimal becomes a plain one)."""
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
        try:
            amount = int(value) if isinstance(value, numbers.Integral) else float(value)
        except OverflowError:
            amount = math.inf
        if math.isfinite(amount) and amount >= 0:
            return amount
    raise ValueError(f"progress {name} must be a finite number, not negative; got {value!r}")


def _detached_session(id: str, user: User, home: str) -> Session:
    return Session(None, id, user, home=home)


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
