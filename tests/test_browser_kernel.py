"""Cards and boards through what a JupyterLab day does to their kernel, in a real JupyterLab
and a real Chromium, with JupyterLab's default settings (widget state not saved).

One JupyterLab serves the module; the tests run in file order, as a user's day
would: a reload mid-run, a closed and reopened tab, a kernel restart while a card
and a board show running runs, save + shut down + reopen, and two notebooks on
one store. One run is held by this test process (an ``App`` on the same store):
it stays running while the notebook's kernel comes and goes, and finishes while
the notebook is closed, as another kernel's run would. Every page's console is
watched: no page error, no console error, no "Cannot send" anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from .lab import (CHROMIUM, Lab, chromium, kernel_pid, open_notebook, restart_kernel, run_all, save,
                  screenshots_on_failure, wait_until, watch, write_notebook)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

CARD = ".cnb:not(.cnb-board) > .cnb-card"

SETUP = """%load_ext capsule_nb
import asyncio

import capsule_nb as cpsl


@cpsl.task
async def slow(label: str, session=None):
    await session.notify(f"{label} is waiting")
    await asyncio.sleep(3600)
"""


class Day:
    """The JupyterLab, the browser, the test's own App and run, and what every page said."""

    def __init__(self, lab: Lab, first_page: Any):
        import capsule_nb

        self.lab = lab
        self.browser = first_page.context.browser
        self.page = first_page
        self.pages = {"": first_page}
        self.problems: list[str] = []
        self.watch(first_page)
        self.app = capsule_nb.App(home=lab.home)
        self.gate = threading.Event()

        @self.app.task
        def outside(label: str) -> str:
            for line in range(80):  # more than its card shows at once
                print(f"{label}: line {line}")
            self.gate.wait(600)
            return f"{label} done"

        self.outside = outside.submit("the outside run")
        wait_until(lambda: self.outside.snapshot()["status"] == "running", 10, "the test's run running")
        self.app.store.flush()

    def watch(self, page: Any) -> None:
        watch(page, self.problems)

    def new_page(self, name: str = "") -> Any:
        """A new browser tab (kept by ``name`` in ``pages``)."""
        self.page = self.pages[name] = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.watch(self.page)
        return self.page

    def run_notebook(self, name: str, *cells: str) -> Any:
        """A notebook ``<name>.ipynb`` of ``cells``, opened in a tab and workspace of its own and run."""
        write_notebook(self.lab.root / f"{name}.ipynb", *cells)
        page = self.new_page(name)
        open_notebook(page, self.lab, f"{name}.ipynb", workspace=name)
        run_all(page)
        return page

    def card(self, title: str, page: Any = None) -> Any:
        page = page or self.page
        return page.locator(CARD, has=page.locator(".cnb-title", has_text=title))

    def wrapper(self, title: str, page: Any = None) -> Any:
        """A card with what is around it in its view (the "not live" line)."""
        page = page or self.page
        return page.locator(".cnb:not(.cnb-board)", has=page.locator(".cnb-card .cnb-title", has_text=title))

    def status(self, task_id: str) -> str:
        self.app.store.poll()
        return self.app.store.get_run(task_id)["status"]

    @contextlib.contextmanager
    def screenshots_on_failure(self, name: str) -> Iterator[None]:
        """Of the tab in front when it fails (``run_notebook`` inside the block opens one)."""
        try:
            yield
        except BaseException:
            with screenshots_on_failure(self.page, f"kernel-{name}"):
                raise


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day]:
    with Lab(tmp_path_factory.mktemp("lab"), notebooks=()) as lab, chromium() as page:
        today = Day(lab, page)
        write_notebook(lab.root / "life.ipynb", SETUP,
                       'held = slow.submit("held")\nsession.show_task(held, message="Held by this kernel")',
                       'spare = slow.submit("spare")\nsession.show_task(spare, message="Cancel me")',
                       f'cpsl.ui.TaskCard("{today.outside.task_id}", message="Held by the test")',
                       'cpsl.ui.TaskBoard(title="Everything", refresh_ms=500)')
        try:
            yield today
        finally:
            today.gate.set()
            today.app.close()


def elapsed_ticks(card: Any, seconds: float = 2.5) -> bool:
    """Whether the card's clock moves over ``seconds``."""
    before = card.locator(".cnb-elapsed").first.inner_text()
    time.sleep(seconds)
    return card.locator(".cnb-elapsed").first.inner_text() != before


def shown_seconds(text: str) -> float:
    """A card's elapsed time ("4.2s", "3m 5s", "2h 10m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", text))


def save_and_wait(day: Day, notebook: str) -> None:
    path = day.lab.root / notebook
    before = path.stat().st_mtime_ns
    save(day.page)
    wait_until(lambda: path.stat().st_mtime_ns != before and "_capsule_saved" in path.read_text(), 15,
               f"{notebook} saved")


def open_life(day: Day, page: Any) -> None:
    open_notebook(page, day.lab, "life.ipynb")
    day.card("Held by this kernel", page).locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)


def test_reload_mid_run_brings_the_cards_and_the_board_back_live(day: Day) -> None:
    with day.screenshots_on_failure("reload"):
        open_notebook(day.page, day.lab, "life.ipynb")
        run_all(day.page)
        for title in ("Held by this kernel", "Cancel me", "Held by the test"):
            day.card(title).locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        board = day.page.locator(".cnb-board")
        running = board.locator(".cnb-lane", has=day.page.locator(".cnb-lane-head", has_text="Running"))
        wait_until(lambda: running.locator(".cnb-mini").count() == 3, 15, "three runs in Running")
        save_and_wait(day, "life.ipynb")  # what autosave does: a reload draws the notebook on disk

        day.page.reload()
        card = day.card("Held by this kernel")
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        assert elapsed_ticks(card), "the clock of a live card counts on after a reload"
        # ... from the run's start, not from the reload (the run has said nothing since its start)
        held_id = card.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        running_for = time.time() - day.app.store.get_run(held_id)["started_at"]
        assert shown_seconds(card.locator(".cnb-elapsed").first.inner_text()) > running_for - 1.5  # (ticks 1 a second)
        assert day.page.locator(".cnb-stale").count() == 0
        wait_until(lambda: running.locator(".cnb-mini").count() == 3, 15, "the board back, live")
        assert day.page.get_by_text("model not found").count() == 0


def test_close_and_reopen_the_tab_and_the_cards_still_act(day: Day) -> None:
    with day.screenshots_on_failure("reopen-tab"):
        day.page.close()  # the browser tab; the kernel lives on
        page = day.new_page()
        time.sleep(3)  # longer than a widget's grace period once unseen: it must not have closed
        open_life(day, page)

        # The notebook's own tab in JupyterLab, closed and opened again.
        page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").first.click()
        notebook, asked = page.locator(".jp-Notebook"), page.locator(".jp-Dialog .jp-mod-accept")
        wait_until(lambda: notebook.count() == 0 or asked.count() > 0, 10, "the tab closed, or asked to save")
        if asked.count():  # outputs drawn since the last save: save them, as a person keeping them would
            asked.click()
        notebook.wait_for(state="detached", timeout=10_000)
        time.sleep(3)
        page.locator(".jp-DirListing-item", has_text="life.ipynb").dblclick()
        day.card("Cancel me").locator(".cnb-badge", has_text="running").wait_for(timeout=30_000)

        task_id = day.card("Cancel me").locator(".cnb-sub").inner_text().split("·")[-1].strip()
        day.card("Cancel me").locator("button", has_text="Cancel").click()
        day.card("Cancel me").locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
        wait_until(lambda: day.status(task_id) == "cancelled", 10, "the run cancelled in the store")
        assert page.locator(".cnb-stale").count() == 0


def test_a_kernel_restart_makes_cards_and_board_say_so_at_once(day: Day) -> None:
    page = day.page
    with day.screenshots_on_failure("restart"):
        held = day.card("Held by this kernel")
        held_id = held.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        assert elapsed_ticks(held, 1.5)
        restart_kernel(page)
        started = time.monotonic()
        for title in ("Held by this kernel", "Held by the test"):
            day.wrapper(title).locator(".cnb-stale", has_text="Not live: its kernel restarted").wait_for(timeout=5_000)
        board = page.locator(".cnb-board")
        board.locator(".cnb-stale", has_text="Not live").wait_for(timeout=5_000)
        said = time.monotonic() - started
        # The old kernel records how its runs end as it goes: the views ask the store again within
        # a second or two, not at their next round 5 s later, when the board said "running" under
        # a card that said "failed" (w62).
        held.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)
        board.locator(f".cnb-mini.cnb-is-failed[data-task-id='{held_id}']").wait_for(timeout=2_500)

        # Clocks stopped; the buttons that need the kernel disabled, on the cards and on the board.
        # The test's own run keeps its Cancel, drawn from the store: this process runs it, and the
        # server files the click (test_a_saved_card_cancels_a_run_another_process_runs).
        outside = day.card("Held by the test")
        assert not elapsed_ticks(outside, 2.2)
        minis = board.locator(".cnb-mini", has=page.locator(".cnb-badge", has_text="running"))
        assert minis.count() >= 1
        wait_until(lambda: outside.locator("button", has_text="Cancel").is_enabled(), 10, "the store's Cancel")
        usable = board.locator(".cnb-mini button:enabled")
        wait_until(lambda: usable.count() == 1, 10, "one usable button on the board")
        assert usable.inner_text() == "Cancel"
        assert board.locator(f".cnb-mini[data-task-id='{day.outside.task_id}'] button:enabled").count() == 1

        # What the store says: the restarted kernel recorded its run as interrupted on the way out.
        wait_until(lambda: day.status(held_id) == "failed", 15, "the held run failed in the store")
        held.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)
        assert "interrupted" in held.locator(".cnb-error").inner_text()
        assert "Showing the store as of" in day.wrapper("Held by the test").locator(".cnb-stale").inner_text()
        assert outside.locator(".cnb-badge").inner_text() == "running"  # still running, in this test's process
        assert said < 5, f"the views said they were not live after {said:.1f}s"


def test_save_shut_down_and_reopen_shows_the_last_state_and_what_finished(day: Day) -> None:
    with day.screenshots_on_failure("reopen"):
        page = day.page
        run_all(page)  # the restarted kernel draws everything again, live
        card = day.card("Held by this kernel")
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        day.card("Held by the test").locator(".cnb-badge", has_text="running").wait_for(timeout=30_000)
        wait_until(lambda: page.locator(".cnb-stale").count() == 0, 30, "every view live again")
        held_id = card.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        save_and_wait(day, "life.ipynb")

        for session in day.lab.api("sessions"):  # the Running panel's Shut Down
            day.lab.api(f"sessions/{session['id']}", method="DELETE")
        day.wrapper("Held by this kernel").locator(".cnb-stale", has_text="its kernel stopped").wait_for(timeout=10_000)
        page.close()
        day.gate.set()  # the test's run finishes while the notebook is closed
        wait_until(lambda: day.status(day.outside.task_id) == "completed", 15, "the test's run completed")

        page = day.new_page()
        open_notebook(page, day.lab, "life.ipynb")  # a new kernel, which has run nothing
        outside = day.card("Held by the test")
        outside.locator(".cnb-badge", has_text="completed").wait_for(timeout=30_000)
        assert outside.locator(".cnb-result").inner_text() == "result 'the outside run done'"
        # Its output shows its end, as a live card's does: drawn before the cell was laid out, it
        # stayed at "line 0" (w62).
        output = outside.locator(".cnb-output")
        output.scroll_into_view_if_needed()
        at_end = "el => el.scrollHeight > el.clientHeight && el.scrollTop + el.clientHeight >= el.scrollHeight - 4"
        wait_until(lambda: output.evaluate(at_end), 5, "the reopened card's output scrolled to its end")
        held = day.card("Held by this kernel")
        held.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)
        assert day.status(held_id) == "failed"
        for title in ("Held by this kernel", "Held by the test"):
            assert "Not live: drawn from the saved notebook" in day.wrapper(title).locator(".cnb-stale").inner_text()
        # The line says it, not ipywidgets' red broken-link icon above it as well (w53).
        icons = page.evaluate("""() => [...document.querySelectorAll('.cnb.jupyter-widgets-disconnected')]
            .map((view) => getComputedStyle(view, '::before').content)""")
        assert icons and set(icons) == {"none"}, icons
        board = page.locator(".cnb-board")
        board.locator(".cnb-stale", has_text="drawn from the saved notebook").wait_for(timeout=10_000)
        completed = board.locator(".cnb-lane", has=page.locator(".cnb-lane-head", has_text="Completed"))
        completed.locator(f".cnb-mini[data-task-id='{day.outside.task_id}']").wait_for(timeout=15_000)
        assert page.get_by_text("model not found").count() == 0
        assert page.get_by_text("Error displaying widget").count() == 0


def test_a_notebook_saved_after_each_restart_keeps_only_the_widgets_it_shows(day: Day) -> None:
    """Restart, run all, save, again and again: the file kept every board each kernel had made,
    one more per restart, while the notebook showed one (w53: 318 KB for one board after five)."""
    import json

    path = day.lab.root / "regrown.ipynb"
    with day.screenshots_on_failure("regrown"):
        page = day.run_notebook("regrown", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                                'cpsl.ui.TaskBoard(title="Regrown")')
        board = page.locator(".cnb-board")
        for restart in range(3):
            board.locator(".cnb-board-head").wait_for(timeout=60_000)
            restart_kernel(page)
            board.locator(".cnb-stale", has_text="its kernel restarted").wait_for(timeout=30_000)
            run_all(page)
            wait_until(lambda: board.count() == 1 and board.locator(".cnb-stale").count() == 0, 60,
                       f"the board live again after restart {restart + 1}")
        before = path.stat().st_mtime_ns
        save(page)
        wait_until(lambda: path.stat().st_mtime_ns != before and "_capsule_saved" in path.read_text(), 15,
                   "regrown.ipynb saved")
        state = json.loads(path.read_text())["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]
        ours = [m["state"] for m in state["state"].values()
                if m["state"].get("_anywidget_id", "").startswith("capsule_nb.")]
        assert [s["title"] for s in ours] == ["Regrown"], [s.get("title") for s in ours]
        shown = json.loads(path.read_text())["cells"][1]["outputs"][0]["data"]["application/vnd.jupyter.widget-view+json"]
        assert shown["model_id"] in state["state"]  # the one shown: reopened, it is drawn


def test_two_notebooks_on_one_store(day: Day) -> None:
    """One notebook makes a run; another's board shows it at once and follows it to its end.
    (Cancel from the other notebook's board is issue 16's: a cancel request to another kernel.)"""
    lab = day.lab
    write_notebook(lab.root / "maker.ipynb", SETUP,
                   'made = slow.submit("made next door", session=session)\n'
                   'session.show_task(made, message="Made next door")',
                   'doomed = slow.submit("doomed")\nsession.show_task(doomed, message="Dies with its kernel")')
    write_notebook(lab.root / "watcher.ipynb", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                   'cpsl.ui.TaskBoard(title="Watching", refresh_ms=500)')
    maker = day.new_page("maker")
    with day.screenshots_on_failure("two-notebooks"):
        open_notebook(maker, lab, "maker.ipynb", workspace="maker")
        run_all(maker)
        made = day.card("Made next door", maker)
        made.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        made_id = made.locator(".cnb-sub").inner_text().split("·")[-1].strip()

        watcher = day.new_page("watcher")
        open_notebook(watcher, lab, "watcher.ipynb", workspace="watcher")
        run_all(watcher)
        mini = watcher.locator(f".cnb-board .cnb-mini[data-task-id='{made_id}']")
        mini.locator(".cnb-badge", has_text="running").wait_for(timeout=30_000)
        assert "made next door is waiting" in mini.locator(".cnb-who").inner_text()
        options = watcher.locator("select[title='filter by session_id'] option").all_inner_texts()
        assert "maker.ipynb" in options and not any(re.search(r"^notebook:|/", o) for o in options), options

        made.locator("button", has_text="Cancel").click()  # in the notebook that made it
        made.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=15_000)
        started = time.monotonic()
        mini.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=15_000)
        assert time.monotonic() - started < 5  # refresh_ms is 0.5 s
        assert day.status(made_id) == "cancelled"


def test_a_saved_card_cancels_a_run_another_process_runs(day: Day) -> None:
    """A notebook reopened without running its cells draws its cards from the store. The Cancel
    of a run another process runs (a kernel next door, a script) was greyed out there, while a
    board in that kernel could cancel it (w53). It files the cancel through the server now,
    and the card follows the run to its end."""
    stop = threading.Event()

    @day.app.task
    def next_door() -> str:
        while not stop.wait(0.05):  # (a thread run stops between two Python steps)
            pass
        return "let go"

    run = next_door.submit()
    wait_until(lambda: run.snapshot()["status"] == "running", 10, "the run next door running")
    day.app.store.flush()
    try:
        with day.screenshots_on_failure("saved-cancel"):
            page = day.run_notebook("saved-cancel", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                                    f'cpsl.ui.TaskCard("{run.task_id}", message="Next door")',
                                    'cpsl.ui.Page([cpsl.ui.TaskBoard(title="Paged", filter={"task_name": "next_door"}, '
                                    'refresh_ms=500), "under the board"], title="A page")')
            day.card("Next door", page).locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
            paged = page.locator(".cnb-page .cnb-board")
            paged.locator(f".cnb-mini[data-task-id='{run.task_id}']").wait_for(timeout=30_000)
            save_and_wait(day, "saved-cancel.ipynb")
            for session in day.lab.api("sessions"):
                if session["path"] == "saved-cancel.ipynb":
                    day.lab.api(f"sessions/{session['id']}", method="DELETE")
            paged.locator(".cnb-stale", has_text="its kernel stopped").wait_for(timeout=10_000)
            page.close()

            page = day.new_page("saved-cancel-reopened")
            open_notebook(page, day.lab, "saved-cancel.ipynb", workspace="saved-cancel-reopened")
            wrapper = day.wrapper("Next door", page)
            wrapper.locator(".cnb-stale", has_text="drawn from the saved notebook").wait_for(timeout=30_000)
            card = day.card("Next door", page)
            card.locator(".cnb-badge", has_text="running").wait_for(timeout=15_000)  # as the store says
            # A board in a page is saved with the page, and drawn from the store too (w55: "model not found")
            paged = page.locator(".cnb-page .cnb-board")
            paged.locator(".cnb-stale", has_text="drawn from the saved notebook").wait_for(timeout=15_000)
            paged.locator(f".cnb-mini[data-task-id='{run.task_id}']").wait_for(timeout=15_000)
            assert page.locator(".cnb-page").inner_text().count("under the board") == 1
            assert page.get_by_text("model not found").count() == 0
            # Not a red broken-link icon over the page's boxes either, only the board's line (w55)
            marked = page.evaluate("""() => [...document.querySelectorAll('.jupyter-widgets-disconnected')]
                .filter((v) => v.closest('.cnb-page')).map((v) => getComputedStyle(v, '::before').content)""")
            assert len(marked) >= 3 and set(marked) == {"none"}, marked
            assert card.locator("button", has_text="Cancel").is_enabled()
            card.locator("button", has_text="Cancel").click()
            card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=15_000)
            assert day.status(run.task_id) == "cancelled"
            # The board drawn from the store on the same page asks again at once too (w62: it kept
            # "stopping…" till its next round, 5 s)
            paged.locator(f".cnb-mini.cnb-is-cancelled[data-task-id='{run.task_id}']").wait_for(timeout=2_500)
            done = wrapper.locator(".cnb-notice")  # it did what was asked: a notice, not a warning
            assert done.inner_text() == f"cancel of run {run.task_id}: asked of the process that runs it"
            assert "cnb-notice-done" in done.get_attribute("class")
    finally:
        stop.set()


def test_a_refused_retry_says_why_each_time_and_its_button_comes_back(day: Day) -> None:
    """The watcher's kernel does not define ``slow``: Retry there is refused, with the reason.
    Clicked again, it is refused again, and no button stays disabled with nothing said: on the
    board's card nor in the details pane."""
    watcher = day.pages["watcher"]
    with day.screenshots_on_failure("refused-retry"):
        board = watcher.locator(".cnb-board")
        board.scroll_into_view_if_needed()
        slow_runs = board.locator(".cnb-mini.cnb-is-cancelled", has=watcher.locator(".cnb-title", has_text="slow"))
        target = slow_runs.first.get_attribute("data-task-id")
        mini = board.locator(f".cnb-mini[data-task-id='{target}']")
        notice = board.locator(".cnb-notice")
        total = board.locator(".cnb-total").inner_text()
        for where, button in (("on the board", mini.locator("button.cnb-retry")),
                              ("on the board again", mini.locator("button.cnb-retry")),
                              ("in the details", board.locator(".cnb-detail button.cnb-retry")),
                              ("in the details again", board.locator(".cnb-detail button.cnb-retry"))):
            if where == "in the details":
                mini.locator(".cnb-title").click()
                board.locator(".cnb-detail .cnb-card").wait_for(timeout=10_000)
            button.click()
            watcher.mouse.move(5, 5)
            wait_until(lambda: button.is_enabled(), 10, f"the refused Retry {where} enabled again")
            assert "'slow' of app 'default' is not defined in this kernel" in notice.inner_text()
        assert day.status(target) == "cancelled"
        assert board.locator(".cnb-total").inner_text() == total  # no new run


def _blocks_until(release: Path) -> str:
    """A cell that blocks the kernel (up to a minute) until ``release`` exists."""
    return (f"_until = time.monotonic() + 60\nwhile not os.path.exists({str(release)!r}) and time.monotonic() < _until:"
            "\n    time.sleep(0.05)")


def test_a_card_follows_its_thread_run_while_a_cell_blocks_the_kernel(day: Day, tmp_path: Path) -> None:
    """A blocking cell (a sleep, a blocking ``result()``) stops the kernel's loop, not a ``def``
    task's thread: the card follows its run to its end meanwhile, rather than saying "running"
    with a clock counting on until the cell ends."""
    release = tmp_path / "release"
    cells = ("%load_ext capsule_nb\nimport os, time\nimport capsule_nb as cpsl",
             "@cpsl.task\ndef grind(steps: int, session=None):\n    for step in range(steps):\n"
             "        time.sleep(0.2)\n        session.progress(step + 1, steps)\n    return steps\n\n"
             'ground = grind.submit(10, session=session)\nsession.show_task(ground, message="Grinding")',
             _blocks_until(release))
    try:
        with day.screenshots_on_failure("blocked-loop"):
            page = day.run_notebook("busy", *cells)
            card = day.card("Grinding", page)
            card.wait_for(timeout=60_000)
            card.locator(".cnb-badge", has_text="completed").wait_for(timeout=20_000)
            assert card.locator(".cnb-result").inner_text() == "result 10"
            assert card.locator("[role=progressbar]").get_attribute("aria-valuenow") == "100"
            blocking = page.locator(".jp-Notebook .jp-CodeCell").last.locator(".jp-InputPrompt")
            assert "[*]" in blocking.inner_text(), "the cell ended first: the test proves nothing"
    finally:
        release.touch()


def test_a_thread_run_cancelled_while_blocked_in_a_call_says_stopping_until_the_call_returns(
        day: Day, tmp_path: Path) -> None:
    """A cancel lands in a thread run between two Python steps: one blocked in a call (here,
    opening a pipe nobody has opened to write) runs on until the call returns. Its card says it is
    stopping meanwhile, with no Cancel to click again, then cancelled."""
    feed = tmp_path / "feed"
    os.mkfifo(feed)
    cells = ("%load_ext capsule_nb\nimport capsule_nb as cpsl",
             f"@cpsl.task\ndef fetch():\n    with open({str(feed)!r}) as f:  # one blocking call\n"
             "        return f.read()\n\n"
             'fetching = fetch.submit(session=session)\nsession.show_task(fetching, message="Fetching")')
    with day.screenshots_on_failure("stopping"):
        page = day.run_notebook("stopping", *cells)
        card = day.card("Fetching", page)
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        card.locator("button", has_text="Cancel").click()
        try:
            card.locator(".cnb-stopping", has_text="stopping").wait_for(timeout=10_000)
            assert card.locator(".cnb-badge").inner_text() == "running"
            assert card.locator("button", has_text="Cancel").count() == 0
        finally:
            os.close(wait_until(lambda: _writer(feed), 10, "the run opening the pipe"))  # the call returns
        card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
        assert card.locator(".cnb-stopping").count() == 0


def test_cancel_on_a_card_stops_the_run_a_cell_is_blocked_on(day: Day) -> None:
    """The cell waits on the run (a loop that blocks the kernel, or ``await h.result()``) and the reader presses the
    card's Cancel: the run stops and the cell ends. A click travels as a comm message, which
    the kernel reads only once the cell ends, so the Cancel waited on the very cell waiting on
    the run, for good (w49). The page now files it through the Jupyter server in the store,
    where the kernel answers from a thread of its own."""
    cells = (SETUP + "\nimport time\n\n\n@cpsl.task\ndef crunch():\n    for _ in range(36000):\n"
             "        time.sleep(0.1)\n\n\n"
             'crunching = crunch.submit()\nsession.show_task(crunching, message="Crunch, a cell blocked on it")\n'
             'waiting = slow.submit("waits")\nsession.show_task(waiting, message="Waits, a cell awaiting it")',
             'while crunching.snapshot()["status"] == "running":  # blocks the kernel\n    time.sleep(0.05)',
             "await waiting.result()")
    with day.screenshots_on_failure("cancel-blocked"):
        page = day.run_notebook("blocked-on-run", *cells)
        prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
        for title, cell in (("Crunch, a cell blocked on it", 1), ("Waits, a cell awaiting it", 2)):
            card = day.card(title, page)
            card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
            wait_until(lambda: "[*]" in prompts.nth(cell).inner_text()
                       and "[*]" not in prompts.nth(cell - 1).inner_text(), 30, f"cell {cell} waiting on the run")
            card.locator("button", has_text="Cancel").click()
            card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
            wait_until(lambda: "[*]" not in prompts.nth(cell).inner_text(), 10, f"cell {cell} ended")
        # The clicks reach the kernel once its cells are done, and find their runs cancelled:
        # nothing to say, where they used to say "had already finished".
        wait_until(lambda: day.lab.kernel_state("blocked-on-run.ipynb") == "idle", 10, "the kernel idle")
        for title in ("Crunch, a cell blocked on it", "Waits, a cell awaiting it"):
            assert day.wrapper(title, page).locator(".cnb-notice").inner_text() == ""


def test_a_cancel_the_kernel_cannot_hear_of_a_run_ended_elsewhere_says_so_at_once(day: Day) -> None:
    """The kernel cannot hear the click (here it is stopped, as a busy one is for a comm), and
    the run, another process's, has ended meanwhile: the card still says running. The server
    said so to the page, which dropped it; the card said nothing until the kernel came back (w50)."""
    gate = threading.Event()

    @day.app.task
    def elsewhere_run() -> str:
        gate.wait(600)
        return "done"

    run = elsewhere_run.submit()
    wait_until(lambda: run.snapshot()["status"] == "running", 10, "the run running")
    day.app.store.flush()
    with day.screenshots_on_failure("unheard-ended"):
        page = day.run_notebook("unheard", SETUP, f'cpsl.ui.TaskCard("{run.task_id}", message="Ends elsewhere")')
        card = day.card("Ends elsewhere", page)
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        pid = kernel_pid(day.lab, "unheard.ipynb")
        os.kill(pid, signal.SIGSTOP)
        try:
            gate.set()
            wait_until(lambda: day.status(run.task_id) == "completed", 10, "the run ended")
            day.app.store.flush()
            assert card.locator(".cnb-badge").inner_text() == "running"  # what the stopped kernel last sent
            card.locator("button", has_text="Cancel").click()
            notice = day.wrapper("Ends elsewhere", page).locator(".cnb-notice")
            wait_until(lambda: notice.inner_text() == f"run {run.task_id} had already finished", 10, "the notice")
            assert "cnb-notice-done" not in notice.get_attribute("class")  # refused: a warning
            assert card.locator("button", has_text="Cancel").is_enabled()  # the refused button comes back
        finally:
            os.kill(pid, signal.SIGCONT)
        card.locator(".cnb-badge", has_text="completed").wait_for(timeout=15_000)


def test_a_retry_the_busy_kernel_cannot_hear_says_it_waits_and_runs_once_when_the_cell_ends(
        day: Day, tmp_path: Path) -> None:
    """Retry needs the kernel's own task function, so it waits while a cell runs. The button
    was pressed and nothing said why nothing happened; pressed again, it would retry twice."""
    release = tmp_path / "release"
    cells = ("%load_ext capsule_nb\nimport os, time\nimport capsule_nb as cpsl",
             '@cpsl.task\ndef brittle():\n    raise ValueError("brittle")\n\n'
             'broke = brittle.submit()\nsession.show_task(broke, message="Brittle")',
             _blocks_until(release))
    try:
        with day.screenshots_on_failure("retry-unheard"):
            page = day.run_notebook("retry-busy", *cells)
            card = day.card("Brittle", page)
            card.locator(".cnb-badge", has_text="failed").wait_for(timeout=60_000)
            failed_id = card.locator(".cnb-sub").inner_text().split()[-1]
            prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
            wait_until(lambda: "[*]" in prompts.nth(2).inner_text(), 30, "the blocking cell running")
            notice = day.wrapper("Brittle", page).locator(".cnb-notice")
            for press in ("first", "second"):
                retry = card.locator("button", has_text="Retry")
                wait_until(retry.is_enabled, 10, f"Retry enabled for the {press} press")
                retry.click()
                wait_until(lambda: "the kernel has not answered yet (a cell may be running)" in notice.inner_text(),
                           10, f"the notice after the {press} press")
                assert f"retry of run {failed_id}" in notice.inner_text()
            release.touch()
            wait_until(lambda: card.locator(".cnb-sub").inner_text().split()[-1] != failed_id, 20,
                       "the card on the retried run")
            wait_until(lambda: notice.inner_text() == "", 10, "the notice gone")
            day.app.store.poll()
            runs = [r for r in day.app.store.runs() if r["task_name"] == "brittle"]
            assert len(runs) == 2, [(r["task_id"], r["status"]) for r in runs]  # one retry, however many presses
    finally:
        release.touch()


def test_a_kernel_restarted_from_elsewhere_makes_the_views_say_so(day: Day) -> None:
    """Restarted from another tab or the REST API, the kernel tells this page that it is
    "starting", a word the page may not hear: the cards looked live, with a Retry that did
    nothing ("Comm not found") (w49). Whatever the new kernel says next, as the other tab
    goes on working in it, is signed with its new session."""
    from jupyter_client import BlockingKernelClient

    with day.screenshots_on_failure("restart-elsewhere"):
        page = day.run_notebook("elsewhere", SETUP, 'far = slow.submit("far")\nsession.show_task(far, message="Far")')
        card = day.card("Far", page)
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=60_000)
        kernel = day.lab.kernel_id("elsewhere.ipynb")
        day.lab.api(f"kernels/{kernel}/restart", method="POST")
        other_tab = BlockingKernelClient(connection_file=str(day.lab.base / "runtime" / f"kernel-{kernel}.json"))
        other_tab.load_connection_file()
        other_tab.start_channels()
        try:
            stale = day.wrapper("Far", page).locator(".cnb-stale", has_text="Not live: its kernel restarted")
            deadline = time.monotonic() + 30
            while not stale.is_visible():
                assert time.monotonic() < deadline, "the page still shows the card live, 30 s after the restart"
                other_tab.execute("1 + 1")
                other_tab.get_shell_msg(timeout=10)  # (the page hears its busy and idle)
        finally:
            other_tab.stop_channels()
        card.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)  # interrupted, the store says
        assert all(button.is_disabled() for button in card.locator("button").all())


def _writer(fifo: Path) -> int | None:
    """A descriptor writing to ``fifo`` once a reader has it open (None before)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def test_a_run_waiting_to_retry_has_no_clock_counting_on(day: Day) -> None:
    """Between attempts nothing runs: the card and the board say the run waits to retry, instead
    of a clock counting on from the failed attempt's start (which read as a run still going)."""
    with day.screenshots_on_failure("retry-clock"):
        page = day.run_notebook("retrying", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                                '@cpsl.task(retries=1, retry_delay="1h")\ndef flaky():\n    raise ValueError("flake")\n\n'
                                'waiting = flaky.submit()\nsession.show_task(waiting, message="Waits to retry")',
                                'cpsl.ui.TaskBoard(title="Retrying", filter={"task_name": "flaky"})')
        card = day.card("Waits to retry", page)
        card.locator(".cnb-badge", has_text="retry").wait_for(timeout=60_000)
        mini = page.locator(".cnb-board .cnb-mini.cnb-is-retry")
        mini.wait_for(timeout=15_000)
        for view in (card, mini):
            clock = view.locator(".cnb-elapsed")
            wait_until(lambda: clock.inner_text() == "waiting to retry", 5, "the clock to say the run waits")
            assert clock.get_attribute("data-since") is None  # nothing ticks it on
        assert "attempt 1 of 2" in card.inner_text() and "ValueError: flake" in card.locator(".cnb-error").inner_text()


def test_the_card_of_a_repeating_run_says_so_and_follows_the_series(day: Day) -> None:
    """``show_task(t.schedule("every 2s"))``: the card says the run repeats and moves on to each
    next run, instead of saying "completed" with no Cancel while the series goes on."""
    with day.screenshots_on_failure("repeating-card"):
        page = day.run_notebook("repeating", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                                '@cpsl.task\nasync def tick():\n    pass\n\n'
                                'series = tick.schedule("every 2s")\nsession.show_task(series, message="Ticks")')
        card = day.card("Ticks", page)
        card.locator(".cnb-every", has_text="repeats every 2s").wait_for(timeout=60_000)
        first = card.locator(".cnb-sub").inner_text()
        wait_until(lambda: card.locator(".cnb-sub").inner_text() != first, 15, "the card to follow the next run")
        assert card.locator(".cnb-badge").inner_text() in ("scheduled", "running")
        assert card.get_by_role("button", name="Cancel").is_enabled()


def test_run_all_again_after_a_restart_does_not_double_a_repeat(day: Day) -> None:
    """Run All, restart the kernel, Run All again: the cell that starts a repeat stops the one
    its earlier run started, so one series goes on, not two (JupyterLab sends each cell's id
    with its execution, and the id stays with the cell)."""
    def live() -> set[str]:
        day.app.store.poll()
        return {r["series"] for r in day.app.store.unfinished_runs() if r["task_name"] == "heartbeat"}

    with day.screenshots_on_failure("rerun-repeat"):
        page = day.run_notebook("rerun-repeat", "%load_ext capsule_nb\nimport capsule_nb as cpsl",
                                '@cpsl.task\nasync def heartbeat():\n    pass\n\n'
                                'beat = heartbeat.schedule("every 1h")')
        first = wait_until(lambda: live() or None, 60, "the first series")
        before = kernel_pid(day.lab, "rerun-repeat.ipynb")
        restart_kernel(page)
        wait_until(lambda: _restarted(day.lab, "rerun-repeat.ipynb", before), 60, "the kernel restarted")
        run_all(page)
        wait_until(lambda: len(live()) == 1 and live() != first, 60, "one series, started by the second Run All")
        assert [day.status(series) for series in first] == ["cancelled"]


def _restarted(lab: Lab, notebook: str, before: int) -> bool:
    with contextlib.suppress(LookupError):
        return kernel_pid(lab, notebook) != before and lab.kernel_state(notebook) == "idle"
    return False


def _run_under(page: Any, point: tuple[float, float]) -> str:
    """The id of the board card under ``point``, as the page draws it now."""
    return page.evaluate("([x, y]) => document.elementFromPoint(x, y).closest('.cnb-mini').dataset.taskId",
                         list(point))


def test_a_cancel_pressed_after_resting_on_the_button_while_runs_arrive_cancels_that_run(day: Day) -> None:
    """The pointer rests on a board card's Cancel for a while, new runs arriving at the top of
    its column meanwhile, then presses: the run cancelled is the one that was under it. After
    1.5 s of rest the board used to redraw under the pointer, so the press hit another run."""
    page = day.run_notebook(
        "churn", SETUP,
        "@cpsl.task\nasync def churn(i: int):\n    await asyncio.sleep(120)\n\n"
        "async def drive():\n    for i in range(120):\n        churn.submit(i)\n        await asyncio.sleep(0.3)\n\n"
        "driving = asyncio.ensure_future(drive())",
        'cpsl.ui.TaskBoard(title="Churn", filter={"task_name": "churn"}, refresh_ms=500)')
    with day.screenshots_on_failure("churn-rest"):
        running = page.locator(".cnb-board .cnb-lane", has=page.locator(".cnb-lane-head", has_text="Running"))
        wait_until(lambda: running.locator(".cnb-mini").count() >= 4, 60, "churn runs in Running")
        box = running.locator(".cnb-mini").nth(2).locator("button", has_text="Cancel").bounding_box()
        point = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.move(*point)
        before = running.locator(".cnb-mini").count()
        paused = page.locator(".cnb-board .cnb-paused")
        assert not paused.is_visible()
        time.sleep(2.5)  # the user's pause, over the button
        assert paused.is_visible()  # the board says it holds still (w47: it showed ended runs as running)
        aimed_id = _run_under(page, point)  # what the user sees there now (cards moved until the pointer came)
        page.mouse.down()
        page.mouse.up()
        wait_until(lambda: day.status(aimed_id) == "cancelled", 15, "the run under the pointer cancelled")
        churned = day.app.store.runs({"task_name": "churn"})
        assert [r["task_id"] for r in churned if r["status"] == "cancelled"] == [aimed_id]
        assert len(churned) > before  # runs did arrive while the pointer rested
        page.mouse.move(0, 0)
        wait_until(lambda: not paused.is_visible(), 5, "the board live again once the pointer left")
        assert running.locator(".cnb-mini").count() > before

        # The same resting on a card itself, not its button: a click opens that run's details
        # (w49: the hold let go after 1.5 s, and the click opened another run's).
        box = running.locator(".cnb-mini").nth(2).locator(".cnb-who").bounding_box()
        point = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.move(*point)
        arrived = len(day.app.store.runs({"task_name": "churn"}))
        time.sleep(2.5)  # the user's pause, over the card
        assert paused.is_visible() and len(day.app.store.runs({"task_name": "churn"})) > arrived
        aimed_id = _run_under(page, point)
        page.mouse.down()
        page.mouse.up()
        label = page.locator(".cnb-board .cnb-detail .cnb-detail-head .cnb-label")
        label.wait_for(timeout=10_000)
        assert label.inner_text() == f"Run details · {aimed_id}"
        page.mouse.move(0, 0)


def test_a_cancel_focused_from_the_keyboard_stays_focused_while_its_run_reports_progress(day: Day) -> None:
    """Tab to a card's Cancel, wait while the run reports progress, press Enter: it cancels.
    Each update moved the focused button out of the page and back, which dropped the focus
    to the page, so Enter did nothing (w47); and the same on a board's card."""
    page = day.run_notebook(
        "ticking", SETUP,
        "@cpsl.task\nasync def ticking(i: int, session):\n    for n in range(1000):\n"
        "        session.progress(n, 1000, f'tick {n}')\n        await asyncio.sleep(0.3)\n\n"
        "h_card, h_board = ticking.submit(1), ticking.submit(2)\nsession.show_task(h_card)",
        'cpsl.ui.TaskBoard(title="Ticking", filter={"task_name": "ticking"}, refresh_ms=300)')
    focused = "() => document.activeElement?.closest('.cnb-mini, .cnb-card')?.textContent ?? 'the page'"
    with day.screenshots_on_failure("ticking-keys"):
        card = page.locator(CARD, has=page.locator(".cnb-title", has_text="ticking"))
        running = page.locator(".cnb-board .cnb-lane", has=page.locator(".cnb-lane-head", has_text="Running"))
        wait_until(lambda: running.locator(".cnb-mini").count() == 2, 60, "both runs on the board")
        card_id = card.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        board_id = next(i for i in running.locator(".cnb-mini").evaluate_all("ns => ns.map(n => n.dataset.taskId)")
                        if i != card_id)
        for button, task_id in ((card.locator("button", has_text="Cancel"), card_id),
                                (running.locator(f".cnb-mini[data-task-id='{board_id}'] button", has_text="Cancel"),
                                 board_id)):
            button.focus()
            said = button.evaluate("b => b.closest('.cnb-mini, .cnb-card').textContent")
            wait_until(lambda: page.evaluate(focused) != said, 10, "the run's progress redrawn")
            assert button.evaluate("b => document.activeElement === b"), page.evaluate(focused)
            page.keyboard.press("Enter")
            wait_until(lambda: day.status(task_id) == "cancelled", 15, f"run {task_id} cancelled from the keyboard")


def test_a_kernel_that_dies_is_said_at_once_and_the_store_tells_what_became_of_its_run(day: Day) -> None:
    maker = day.page = day.pages["maker"]
    with day.screenshots_on_failure("death"):
        doomed = day.card("Dies with its kernel", maker)
        doomed.locator(".cnb-badge", has_text="running").wait_for(timeout=10_000)
        doomed_id = doomed.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        os.kill(kernel_pid(day.lab, "maker.ipynb"), signal.SIGKILL)
        day.wrapper("Dies with its kernel", maker).locator(".cnb-stale", has_text="Not live").wait_for(timeout=10_000)
        assert all(button.is_disabled() for button in doomed.locator("button").all())
        # Another process on the store (the watcher's kernel, this test's App) recovers the run
        # of the dead kernel; the card shows what the store says, with the clock stopped.
        wait_until(lambda: day.status(doomed_id) == "failed", 15, "the doomed run recovered")
        doomed.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)
        assert "interrupted" in doomed.locator(".cnb-error").inner_text()
        assert not elapsed_ticks(doomed, 2.2)


def test_nothing_threw_and_nothing_complained(day: Day) -> None:
    assert day.problems == []
