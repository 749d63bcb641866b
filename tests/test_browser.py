"""The widgets in a real JupyterLab, in a real Chromium: notebooks/widgets.ipynb run end to end.

One JupyterLab and one page serve the module (``scenario``): the notebook is
opened, its kernel awaited until connected and idle, and Run All clicked.
The tests then read what a user sees, click what a user clicks, and check
the store from this process with ``capsule_nb.App(home=...)``: they run in
file order, as the user's session would. JupyterLab keeps its default
settings (widget state is not saved automatically). On a failure,
screenshots of the cards and the board go to tests/artifacts/.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Iterator

import pytest

from .lab import (CHROMIUM, CONTRAST, Lab, chromium, open_notebook, run_all, save, screenshots_on_failure, wait_until,
                  watch)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

NOTEBOOK = "widgets.ipynb"
CARD = ".cnb:not(.cnb-board) > .cnb-card"


class Scenario:
    def __init__(self, lab: Lab, page: Any):
        self.lab = lab
        self.page = page
        self.progress_seen: list[int] = []
        self.statuses_seen: list[str] = []
        self.page_errors: list[str] = []
        watch(page, self.page_errors)

    def card(self, title: str) -> Any:
        return self.page.locator(CARD, has=self.page.locator(".cnb-title", has_text=title))

    def task_id(self, title: str) -> str:
        return self.card(title).locator(".cnb-sub").inner_text().split("·")[-1].strip()

    def screenshots_on_failure(self, name: str) -> Any:
        return screenshots_on_failure(self.page, name, {"card": self.page.locator(CARD),
                                                         "board": self.page.locator(".cnb-board")})


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with Lab(tmp_path_factory.mktemp("lab")) as lab, chromium() as page:
        scene = Scenario(lab, page)
        with scene.screenshots_on_failure("startup"):
            open_notebook(page, lab, NOTEBOOK)
            run_all(page)
            # Watch the first card while its run goes: the bar has to move, not just end full.
            card = scene.card("Crunching numbers")
            card.wait_for(timeout=60_000)
            deadline = time.monotonic() + 60
            while "completed" not in scene.statuses_seen and time.monotonic() < deadline:
                status = card.locator(".cnb-badge").inner_text()
                bar = card.locator("[role=progressbar]")
                if bar.count():
                    scene.progress_seen.append(int(bar.get_attribute("aria-valuenow")))
                if not scene.statuses_seen or scene.statuses_seen[-1] != status:
                    scene.statuses_seen.append(status)
                time.sleep(0.05)
        yield scene


def test_a_card_goes_from_running_to_completed_with_its_result(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("card"):
        assert scenario.statuses_seen[-2:] == ["running", "completed"], scenario.statuses_seen
        card = scenario.card("Crunching numbers")
        assert card.locator(".cnb-result").inner_text() == "result {'steps': 12, 'total': 650}"
        assert "attempt 1 of 1" in card.inner_text()
        # show_task's message is the headline; the run's own name stays under it
        assert card.locator(".cnb-sub").inner_text().startswith("Nightly crunch · crunch · ")
        assert "REPLY" in card.locator(".cnb-messages").inner_text().upper()
        assert "step 12: total 650" in card.locator(".cnb-output").inner_text()
        assert card.locator(".cnb-button").count() == 0  # completed: nothing to cancel or retry


def test_the_progress_bar_moves(scenario: Scenario) -> None:
    seen = sorted(set(scenario.progress_seen))
    assert seen[-1] == 100 and len([p for p in seen if 0 < p < 100]) >= 3, scenario.progress_seen
    assert scenario.progress_seen == sorted(scenario.progress_seen)  # never backwards


def test_a_failed_card_shows_the_error_and_its_traceback_on_demand(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("failed"):
        card = scenario.card("Parsing the feed")
        card.locator(".cnb-badge", has_text="failed").wait_for(timeout=30_000)
        assert "ValueError: https://example.com/feed returned malformed XML" in card.locator(".cnb-error").inner_text()
        assert "attempt 2 of 2" in card.inner_text()
        trace = card.locator(".cnb-traceback pre")
        assert not trace.is_visible()
        card.locator(".cnb-traceback summary").click()
        assert "Traceback (most recent call last)" in trace.inner_text()
        assert card.locator("button", has_text="Retry").is_visible()


def test_cancel_on_a_running_card_cancels_the_run_in_the_kernel(scenario: Scenario) -> None:
    import capsule_nb

    with scenario.screenshots_on_failure("cancel"):
        card = scenario.card("Waiting for data")
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=30_000)
        task_id = scenario.task_id("Waiting for data")
        card.locator("button", has_text="Cancel").focus()
        scenario.page.keyboard.press("Enter")  # from the keyboard: the focus stays on the card
        card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
        assert card.locator("button", has_text="Retry").is_visible()
        assert card.evaluate("node => node.contains(document.activeElement)"), "the focus left the card"

        app = capsule_nb.App(home=scenario.lab.home)
        try:
            def status() -> str:
                app.store.poll()
                return app.get_task(task_id).snapshot()["status"]

            wait_until(lambda: status() == "cancelled", 10, f"run {task_id} cancelled in the store")
        finally:
            app.close()


def test_the_board_shows_the_runs_in_their_columns(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("board"):
        board = scenario.page.locator(".cnb-board")
        board.scroll_into_view_if_needed()

        def lane(label: str) -> Any:
            return board.locator(".cnb-lane", has=scenario.page.locator(".cnb-lane-head", has_text=label))

        def titles(label: str) -> list[str]:
            return sorted(lane(label).locator(".cnb-mini .cnb-title").all_inner_texts())

        wait_until(lambda: titles("Failed") == ["parse_feed", "wait_for_data"], 10, "the failed column")
        assert titles("Completed") == ["Nightly crunch"] and titles("Running") == [] and titles("Pending") == ["crunch"]
        assert [lane(x).locator(".cnb-count").inner_text() for x in ("Pending", "Running", "Completed", "Failed")] \
            == ["1", "0", "1", "2"]
        assert board.locator(".cnb-board-title").inner_text() == "All runs"

        lane("Completed").locator(".cnb-mini").first.click()  # the details view
        detail = board.locator(".cnb-detail .cnb-card")
        detail.wait_for(timeout=10_000)
        assert "{'steps': 12, 'total': 650}" in detail.locator(".cnb-result").inner_text()

        board.locator("select[title='filter by task_name']").select_option("parse_feed")
        wait_until(lambda: titles("Failed") == ["parse_feed"] and titles("Completed") == [], 10, "the filter")
        assert board.locator(".cnb-total").inner_text() == "1 run"


def test_a_scheduled_card_says_when_it_starts_not_attempt_0(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("scheduled"):
        card = scenario.card("Crunching later")
        card.locator(".cnb-badge", has_text="scheduled").wait_for(timeout=10_000)
        text = card.inner_text()
        assert "starts " in text and "attempt" not in text, text
        assert card.locator("button", has_text="Cancel").is_enabled()
        # On the board too: the time shown is when it starts, not when it was queued (w56).
        starts = card.locator(".cnb-meta", has_text="starts ").inner_text()
        task_id = card.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        board = scenario.page.locator(".cnb-board")
        board.locator("select[title*='task_name']").select_option("")  # (the last test's filter)
        who = board.locator(f".cnb-mini[data-task-id='{task_id}'] .cnb-who")
        assert who.inner_text().startswith(starts + " · "), (who.inner_text(), starts)


def test_cancelled_runs_look_neutral_not_failed(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("neutral"):
        board = scenario.page.locator(".cnb-board")
        board.locator("select[title*='task_name']").select_option("")  # the filter back to all
        cancelled = board.locator(".cnb-mini.cnb-is-cancelled")
        cancelled.wait_for(timeout=10_000)
        failed = board.locator(".cnb-mini.cnb-is-failed")
        color = "el => getComputedStyle(el).color"
        assert cancelled.locator(".cnb-note.cnb-error").count() == 0
        assert cancelled.locator(".cnb-note").evaluate(color) != failed.locator(".cnb-note").evaluate(color)
        card = scenario.card("Waiting for data")
        assert card.locator(".cnb-error").evaluate(color) != scenario.card("Parsing the feed").locator(
            ".cnb-error").evaluate(color)


def test_a_filter_picked_from_the_keyboard_shows_at_once_with_the_pointer_on_a_card(scenario: Scenario) -> None:
    """The pointer resting on a card holds the columns still; a filter the reader picks from the
    keyboard meanwhile changed the total at once, but the columns only when the pointer
    moved: "1 run" above all the runs (w56)."""
    page = scenario.page
    with scenario.screenshots_on_failure("filter-held"):
        board = page.locator(".cnb-board")
        menu = board.locator("select[title*='task_name']")

        def counts() -> list[int]:
            return [int(n or 0) for n in board.locator(".cnb-lane .cnb-count").all_inner_texts()]

        def shown() -> list[str]:
            return sorted(board.locator(".cnb-lane .cnb-mini .cnb-title").all_inner_texts())

        wait_until(lambda: len(shown()) > 1, 10, "the board showing every run")
        board.locator(".cnb-lane .cnb-mini").first.hover()
        menu.focus()
        menu.select_option("parse_feed")  # as the keyboard picks it: the pointer stays where it is
        wait_until(lambda: shown() == ["parse_feed"] and sum(counts()) == 1, 3,
                   "the columns following the filter with the pointer still on a card")
        assert board.locator(".cnb-total").inner_text() == "1 run"
        menu.select_option("")
        wait_until(lambda: len(shown()) > 1, 3, "every run again")
        page.mouse.move(0, 0)


def test_text_wraps_and_says_all_of_itself_in_a_narrow_window(scenario: Scenario) -> None:
    """1000 px wide with the file browser open: no name cut to "cr…", the whole text on hover,
    and runs of one task told apart (what they said, when they started, their id)."""
    page = scenario.page
    with scenario.screenshots_on_failure("narrow"):
        page.set_viewport_size({"width": 1000, "height": 900})
        try:
            assert page.locator(".jp-FileBrowser").is_visible()
            board = page.locator(".cnb-board")
            board.scroll_into_view_if_needed()
            for title in board.locator(".cnb-mini .cnb-title").all():
                assert title.get_attribute("title") == title.inner_text() and "…" not in title.inner_text()
                assert title.evaluate("el => el.scrollWidth <= el.clientWidth + 1"), title.inner_text()
                one_line = "el => el.offsetHeight < 1.5 * parseFloat(getComputedStyle(el).lineHeight)"
                assert title.evaluate(one_line), f"{title.inner_text()} broken over lines with room to spare"
            note = board.locator(".cnb-mini.cnb-is-failed .cnb-note", has_text="malformed")
            assert note.get_attribute("title") == "ValueError: https://example.com/feed returned malformed XML"
            crunches = board.locator(".cnb-mini", has=page.locator(".cnb-title", has_text="crunch"))
            who = crunches.locator(".cnb-who").all_inner_texts()
            assert len(who) == 2 and len(set(who)) == 2, who  # two runs of one task, told apart
            ids = crunches.evaluate_all("nodes => nodes.map(n => n.dataset.taskId.slice(-6))")
            assert all(i in w for i, w in zip(ids, who)), (ids, who)
            options = board.locator("select[title='filter by session_id'] option")
            assert options.all_inner_texts() == ["all", "widgets.ipynb"]
            assert options.nth(1).get_attribute("title").startswith("notebook:")
            # A phone's width: the hidden "paused while the pointer is over the runs" took a
            # blank line of its own in the board's head (w62). It shares one now, and at every
            # width it keeps room to say "paused…" (w63: squeezed to "p" at 512 px).
            page.mouse.move(0, 0)
            shares_a_line = """head => { const p = head.querySelector('.cnb-paused').getBoundingClientRect();
                return [...head.children].some((c) => !c.classList.contains('cnb-paused')
                    && c.getBoundingClientRect().top < p.bottom && p.top < c.getBoundingClientRect().bottom); }"""
            readable = """head => { const p = head.querySelector('.cnb-paused');
                return p.getBoundingClientRect().width >= 4 * parseFloat(getComputedStyle(p).fontSize); }"""
            head = board.locator(".cnb-board-head")
            for width in (480, 500, 520, 540, 560, 600, 640):
                page.set_viewport_size({"width": width, "height": 900})
                wait_until(lambda: head.evaluate(readable), 5, f"room to read 'paused…' at {width} px")
            page.set_viewport_size({"width": 480, "height": 900})
            wait_until(lambda: head.evaluate(shares_a_line), 5, "the hidden paused label on a line with the rest")
        finally:
            page.set_viewport_size({"width": 1400, "height": 1000})


def test_text_contrast_is_at_least_4_5_to_1_in_light_and_dark(scenario: Scenario) -> None:
    page = scenario.page
    with scenario.screenshots_on_failure("contrast"):
        for theme, light in (("JupyterLab Light", "true"), ("JupyterLab Dark", "false")):
            page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
            page.locator(".lm-Menu-itemLabel", has_text=theme).first.click()
            wait_until(lambda: page.evaluate("document.body.dataset.jpThemeLight") == light, 15, f"the {theme} theme")
            page.wait_for_timeout(500)  # the theme's stylesheet applied
            measured = page.evaluate(CONTRAST, page.locator("body").element_handle())
            assert len(measured) > 50
            low = [m for m in measured if m["ratio"] < 4.5]
            assert low == [], f"{theme}: {low}"
        page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
        page.locator(".lm-Menu-itemLabel", has_text="JupyterLab Light").first.click()


def test_retry_on_the_board_leaves_the_retried_runs_button_usable(scenario: Scenario) -> None:
    """Retry on a failed run of the board starts a new run; the failed run stays as it was,
    and its Retry button comes back with the new state instead of staying disabled."""
    board = scenario.page.locator(".cnb-board")
    with scenario.screenshots_on_failure("board-retry"):
        board.scroll_into_view_if_needed()
        failed = board.locator(".cnb-mini.cnb-is-failed", has=scenario.page.locator(".cnb-title", has_text="parse_feed"))
        wait_until(lambda: failed.count() == 1, 10, "one failed parse_feed run")
        retried = failed.first.get_attribute("data-task-id")
        mini = board.locator(f".cnb-mini[data-task-id='{retried}']")
        mini.locator("button", has_text="Retry").click()
        wait_until(lambda: failed.count() == 2, 30, "the new parse_feed run failed too")
        mini.locator("button", has_text="Retry").wait_for(timeout=5_000)
        wait_until(lambda: mini.locator("button", has_text="Retry").is_enabled(), 5, "the Retry of the retried run back")
        assert "malformed XML" in mini.locator(".cnb-note").inner_text()


FOCUSED_RUN = "() => document.activeElement?.closest('.cnb-mini')?.dataset.taskId ?? document.activeElement?.tagName"


def test_the_boards_cards_work_from_the_keyboard(scenario: Scenario) -> None:
    """Tab moves on from a board's card, and Enter on its Retry or Cancel presses it. The card's
    key handler returned false for every other key, which cancelled them: Tab stayed put. After
    the press the focus stays on the run's card, in whichever column it moves to; it dropped to
    the page, and the next Tab started again from its top."""
    page = scenario.page
    board = page.locator(".cnb-board")
    with scenario.screenshots_on_failure("board-keys"):
        board.scroll_into_view_if_needed()
        failed = board.locator(".cnb-mini.cnb-is-failed", has=page.locator(".cnb-title", has_text="parse_feed"))
        before = failed.count()
        mini = failed.first
        retried = mini.get_attribute("data-task-id")
        cells = page.locator(".jp-Notebook .jp-Cell").count()
        mini.focus()
        page.keyboard.press("d")
        page.keyboard.press("d")  # (w49: the notebook's "delete cell", its cell and all)
        assert page.locator(".jp-Notebook .jp-Cell").count() == cells and mini.is_visible()
        page.keyboard.press("Tab")
        assert mini.evaluate("node => document.activeElement !== node"), "Tab left the focus on the card"
        mini.locator("button", has_text="Retry").focus()
        page.keyboard.press("Enter")
        wait_until(lambda: failed.count() == before + 1, 30, "a run retried from the keyboard")
        assert page.evaluate(FOCUSED_RUN) == retried

        later = board.locator(".cnb-mini.cnb-is-scheduled").first  # "Crunching later": Cancel moves it
        cancelled = later.get_attribute("data-task-id")
        later.locator("button", has_text="Cancel").focus()
        page.keyboard.press("Enter")
        moved = board.locator(f".cnb-mini.cnb-is-cancelled[data-task-id='{cancelled}']")
        moved.wait_for(timeout=10_000)
        wait_until(lambda: page.evaluate(FOCUSED_RUN) == cancelled, 5, "the focus on the cancelled run's card")


def test_the_saved_notebook_keeps_the_widget_state_with_default_settings(scenario: Scenario) -> None:
    """"Save Widget State Automatically" is off (JupyterLab's default): capsule_nb's widgets are kept anyway."""
    with scenario.screenshots_on_failure("save"):
        save(scenario.page)
        path = scenario.lab.root / NOTEBOOK

        def saved_state() -> dict | None:
            try:
                widgets = json.loads(path.read_text()).get("metadata", {}).get("widgets", {})
            except ValueError:  # read while JupyterLab writes it
                return None
            return widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state")

        state = wait_until(saved_state, 15, "the widget state in the saved notebook")
        ours = [m["state"] for m in state.values() if m["state"].get("_anywidget_id", "").startswith("capsule_nb.")]
        titles = {s.get("title") for s in ours}
        assert {"Crunching numbers", "Waiting for data", "Parsing the feed", "All runs"} <= titles
        card = next(s for s in ours if s.get("title") == "Crunching numbers")
        assert card["run"]["status"] == "completed" and re.search(r"export default", card["_esm"])
        assert all(s["_capsule_saved"] for s in ours)  # drawn from the notebook, they say they are not live


def test_nothing_threw_in_the_page_and_closing_the_tab_says_nothing(scenario: Scenario) -> None:
    page = scenario.page
    page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").first.click()  # the notebook's tab
    page.locator(".jp-Notebook").wait_for(state="detached", timeout=10_000)
    page.wait_for_timeout(1000)
    assert scenario.page_errors == []
