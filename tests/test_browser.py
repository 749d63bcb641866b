"""The widgets in a real JupyterLab, in a real Chromium: notebooks/widgets.ipynb run end to end.

One JupyterLab and one page serve the module (``scenario``): the notebook is
opened, its kernel awaited until connected and idle, and Run All clicked.
The tests then read what a user sees, click what a user clicks, and check
the store from this process with ``capsule_nb.App(home=...)``: they run in
file order, as the user's session would. On a failure, screenshots of the
cards and the board go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from .lab import CHROMIUM, Lab, chromium, open_notebook, run_all, save, wait_until

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOK = "widgets.ipynb"
CARD = ".cnb:not(.cnb-board) > .cnb-card"


class Scenario:
    def __init__(self, lab: Lab, page: Any):
        self.lab = lab
        self.page = page
        self.progress_seen: list[int] = []
        self.statuses_seen: list[str] = []
        self.page_errors: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def card(self, title: str) -> Any:
        return self.page.locator(CARD, has=self.page.locator(".cnb-title", has_text=title))

    def task_id(self, title: str) -> str:
        return self.card(title).locator(".cnb-sub").inner_text().split("·")[-1].strip()

    @contextlib.contextmanager
    def screenshots_on_failure(self, name: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            with contextlib.suppress(Exception):
                self.page.screenshot(path=str(ARTIFACTS / f"{name}-page.png"))
                for i, card in enumerate(self.page.locator(CARD).all()):
                    card.screenshot(path=str(ARTIFACTS / f"{name}-card{i}.png"))
                self.page.locator(".cnb-board").first.screenshot(path=str(ARTIFACTS / f"{name}-board.png"))
            raise


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
        card.locator("button", has_text="Cancel").click()
        card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
        assert card.locator("button", has_text="Retry").is_visible()

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
        assert titles("Completed") == ["crunch"] and titles("Running") == [] and titles("Pending") == []
        assert [lane(x).locator(".cnb-count").inner_text() for x in ("Pending", "Running", "Completed", "Failed")] \
            == ["0", "0", "1", "2"]
        assert board.locator(".cnb-board-title").inner_text() == "All runs"

        lane("Completed").locator(".cnb-mini").first.click()  # the details view
        detail = board.locator(".cnb-detail .cnb-card")
        detail.wait_for(timeout=10_000)
        assert "{'steps': 12, 'total': 650}" in detail.locator(".cnb-result").inner_text()

        board.locator("select[title='filter by task_name']").select_option("parse_feed")
        wait_until(lambda: titles("Failed") == ["parse_feed"] and titles("Completed") == [], 10, "the filter")
        assert board.locator(".cnb-total").inner_text() == "1 run"


def test_the_saved_notebook_keeps_the_widget_state(scenario: Scenario) -> None:
    with scenario.screenshots_on_failure("save"):
        save(scenario.page)
        path = scenario.lab.root / NOTEBOOK

        def saved_state() -> dict | None:
            widgets = json.loads(path.read_text()).get("metadata", {}).get("widgets", {})
            return widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state")

        state = wait_until(saved_state, 15, "the widget state in the saved notebook")
        ours = [m["state"] for m in state.values() if m["state"].get("_anywidget_id", "").startswith("capsule_nb.")]
        titles = {s.get("title") for s in ours}
        assert {"Crunching numbers", "Waiting for data", "Parsing the feed", "All runs"} <= titles
        card = next(s for s in ours if s.get("title") == "Crunching numbers")
        assert card["run"]["status"] == "completed" and re.search(r"export default", card["_esm"])


def test_nothing_threw_in_the_page(scenario: Scenario) -> None:
    assert scenario.page_errors == []
