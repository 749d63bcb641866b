"""The Jupyter server's side of the widgets: what a view asks when its kernel is gone.

A card or a board draws from its widget model, which only the kernel that
made it keeps current. When that kernel restarts, dies or is shut down, or
when a saved notebook is reopened (the view drawn from saved widget state),
the view still knows its store and its runs (the ``source`` and ``task_id``
traits), and asks this extension what the store says now:

    GET {base_url}capsule-nb/api/cards?home=<store>&ids=<id>,<id>
    GET {base_url}capsule-nb/api/board?home=<store>&view=<json: app, columns, filter, limits, page, selected>

That is Capsule's own model for a page without a live session: the
renderer fetches the data, statelessly. The answers have the shapes the
widgets' traits have (``views.py``), so a view draws them the same way.

A Cancel pressed while the kernel runs a cell cannot go through the widget's
comm: the kernel reads that message only once the cell ends, and a cell
waiting on the run (``await h.result()``) waits for the very run the reader
wants to stop. A view whose kernel has not said within a second that it heard
the click files the cancel here (``js/live.js`` ``unheard``):

    POST {base_url}capsule-nb/api/cancel?home=<store>&task_id=<id>

which asks the run's live owner through the store, as ``capsule-nb cancel``
does: the owner's maintenance pass (a thread of its own, not the kernel's
busy loop) stops the run, and the card hears of it as of any change.

``pip install capsule_nb`` enables it: the wheel puts
``etc/jupyter/jupyter_server_config.d/capsule_nb.json`` in the environment.
It reads stores that already exist, through the store layer, and writes what
any process on a store writes: cancel requests, and the runs of dead processes,
recorded as a kernel records them (``engine.upkeep.recover_dead``), so that a
view whose kernel died says what became of its runs. It imports no widget
(``ui/__init__`` loads the widgets lazily).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..engine.elsewhere import cancel_unheld
from ..engine.upkeep import recover_dead
from ..errors import StoreError
from ..record import CLAIMED, FINISHED, RUNNING
from ..store import open_store
from ..store.disk import has_store
from ..store.owners import owner_alive
from . import views

log = logging.getLogger("capsule_nb")

ROUTE = "capsule-nb/api/(cards|board|cancel)"
MAX_IDS = 500  # cards asked for in one request (a page of reopened cards)


def _store(home: str) -> Any:
    """This process's store at ``home``, current with other processes' writes."""
    path = Path(home).expanduser()
    if not home or not path.is_absolute() or not has_store(path):
        raise LookupError(f"no capsule_nb store at {home!r}")
    store = open_store(path, afresh=True)  # (a store reset or restored since: the new file)
    store.poll()
    try:  # a dead kernel's runs are recorded as any process on the store records them
        recover_dead(store, store.unfinished_runs())
    except StoreError as exc:  # a store this server may not write: views say ``orphaned``
        log.warning("capsule_nb: cannot record the runs of dead processes in %s: %s", path, exc)
    return store


def orphaned(record: dict[str, Any]) -> bool:
    """A run marked running whose process is gone, and which could not be recorded as
    interrupted (``_store``): it is not running, whatever its record says."""
    return record["status"] in (RUNNING, CLAIMED) and not owner_alive(record.get("owner", ""))


def cards(home: str, ids: list[str]) -> dict[str, Any]:
    """``{task_id: card}`` for the ids the store still has (views.card, ``orphaned`` said)."""
    store = _store(home)
    found = {}
    for task_id in ids:
        record = store.get_run(task_id)
        if record is not None:
            found[task_id] = {"task_id": task_id, **views.card(record, orphaned=orphaned(record))}
    return {"cards": found, "now": time.time()}


def board(home: str, view: dict[str, Any]) -> dict[str, Any]:
    """A board's traits (lanes, total, choices, detail) as its kernel would compute them."""
    store = _store(home)
    columns = [(label, list(statuses)) for label, statuses in view["columns"]]
    state = views.board(store, columns=columns, filter=view.get("filter") or {},
                        limits=view.get("limits") or {}, page=int(view.get("page") or 50),
                        selected=view.get("selected") or "", orphaned=orphaned)
    return {**state, "now": time.time()}


def cancel(home: str, task_id: str) -> dict[str, Any]:
    """Ask the live owner of an unfinished run to cancel it; ``asked`` says whether it was,
    and ``said`` why not, as the view shows it: the run has finished or is gone. A run of a
    dead process nobody holds (``_store`` has recorded its running ones) is cancelled here."""
    store = _store(home)
    record = store.get_run(task_id)
    if record is None:
        return {"asked": False, "status": None, "said": views.refusal(task_id, "missing")}
    if record["status"] in FINISHED:
        return {"asked": False, "status": record["status"], "said": views.refusal(task_id, "finished")}
    owner = record.get("owner", "")
    if not owner_alive(owner):
        done = cancel_unheld(store, task_id, owner)
        if done is not None:  # (nobody to ask: "asked of the process that runs it" was untrue, w62)
            return {"asked": True, "status": done["status"],
                    "said": f"run {task_id} cancelled: the process that held it is gone"}
    store.request_cancel(task_id)  # its owner answers it, or whoever adopts the run
    return {"asked": True, "status": record["status"]}


def _board_view(text: str) -> dict[str, Any]:
    """The ``view`` argument, checked: a bad one is a 400 that says what is wrong."""
    try:
        view = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"view is not JSON: {exc}") from None
    if not isinstance(view, dict):
        raise ValueError("view is a JSON object")
    columns = view.get("columns")
    if not isinstance(columns, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list) for c in columns):
        raise ValueError("view 'columns' is a list of [label, [statuses]]")
    for name in ("filter", "limits"):
        if not isinstance(view.get(name) or {}, dict):
            raise ValueError(f"view {name!r} is an object")
    return view


def _answer(what: str, arguments: dict[str, list[bytes]]) -> dict[str, Any]:
    def argument(name: str) -> str:
        return arguments.get(name, [b""])[0].decode("utf-8", "replace")

    if what == "cancel":
        return cancel(argument("home"), argument("task_id"))
    if what == "cards":
        ids = [i for i in argument("ids").split(",") if i][:MAX_IDS]
        return cards(argument("home"), ids)
    return board(argument("home"), _board_view(argument("view")))


def _handler() -> type:
    """The tornado handler (jupyter_server is imported only by a server that loads us)."""
    from jupyter_server.auth.decorator import authorized
    from jupyter_server.base.handlers import APIHandler
    from tornado import web

    class RunsHandler(APIHandler):
        auth_resource = "capsule_nb"

        @web.authenticated
        @authorized
        async def get(self, what: str) -> None:
            if what == "cancel":
                raise web.HTTPError(405, "cancel is a POST")
            await self._reply(what)

        @web.authenticated
        @authorized
        async def post(self, what: str) -> None:
            if what != "cancel":
                raise web.HTTPError(405, f"{what} is a GET")
            await self._reply(what)

        async def _reply(self, what: str) -> None:
            try:
                reply = await asyncio.to_thread(_answer, what, self.request.query_arguments)
            except LookupError as exc:  # a store that is gone: an answer, not an error page
                reply = {"missing": str(exc)}
            except ValueError as exc:
                raise web.HTTPError(400, str(exc)) from None
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps(reply))

    return RunsHandler


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": __name__}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], ROUTE)
    web_app.add_handlers(".*$", [(route, _handler())])
    serverapp.log.debug("capsule_nb: serving run records at %s", route)
