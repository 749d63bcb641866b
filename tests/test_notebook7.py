"""The same cards and board in Notebook 7 (``jupyter notebook``), in a real Chromium.

Notebook 7 is JupyterLab's pieces in a one-notebook page: the widgets must
draw, update, cancel and say when their kernel restarted there too. One
server serves the module, in the dark theme; notebooks/widgets.ipynb is run
as a user would.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Iterator

import pytest

from .lab import (CHROMIUM, CONTRAST, DARK, Lab, chromium, kernel_pid, open_notebook, restart_kernel, run_all,
                  screenshots_on_failure, wait_until, watch)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

CARD = ".cnb:not(.cnb-board) > .cnb-card"


class Page:
    def __init__(self, lab: Lab, page: Any):
        self.lab, self.page = lab, page
        self.problems: list[str] = []
        watch(page, self.problems)

    def card(self, title: str) -> Any:
        return self.page.locator(CARD, has=self.page.locator(".cnb-title", has_text=title))

    def screenshots_on_failure(self, name: str) -> Any:
        return screenshots_on_failure(self.page, f"notebook7-{name}")


@pytest.fixture(scope="module")
def nb7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with Lab(tmp_path_factory.mktemp("nb7"), app="notebook", theme=DARK) as lab, chromium() as page:
        scene = Page(lab, page)
        with scene.screenshots_on_failure("startup"):
            open_notebook(page, lab, "widgets.ipynb")
            run_all(page)
            scene.card("Crunching numbers").locator(".cnb-badge", has_text="completed").wait_for(timeout=60_000)
        yield scene


def test_a_card_and_the_board_draw_and_update_in_notebook_7(nb7: Page) -> None:
    with nb7.screenshots_on_failure("card"):
        card = nb7.card("Crunching numbers")
        assert card.locator(".cnb-result").inner_text() == "result {'steps': 12, 'total': 650}"
        assert "attempt 1 of 1" in card.inner_text()
        nb7.card("Parsing the feed").locator(".cnb-badge", has_text="failed").wait_for(timeout=30_000)
        board = nb7.page.locator(".cnb-board")
        board.scroll_into_view_if_needed()
        completed = board.locator(".cnb-lane", has=nb7.page.locator(".cnb-lane-head", has_text="Completed"))
        completed.locator(".cnb-mini", has_text="crunch").wait_for(timeout=15_000)
        completed.locator(".cnb-mini").first.click()
        board.locator(".cnb-detail .cnb-result").wait_for(timeout=10_000)
        # In the dark theme (the helper set it for JupyterLab only, w56), every text reads at 4.5:1.
        assert nb7.page.evaluate("document.body.dataset.jpThemeName") == DARK
        measured = nb7.page.evaluate(CONTRAST, nb7.page.locator("body").element_handle())
        assert len(measured) > 50 and [m for m in measured if m["ratio"] < 4.5] == []


def test_cancel_works_in_notebook_7(nb7: Page) -> None:
    with nb7.screenshots_on_failure("cancel"):
        card = nb7.card("Waiting for data")
        card.locator(".cnb-badge", has_text="running").wait_for(timeout=30_000)
        card.locator("button", has_text="Cancel").click(delay=120)
        card.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=10_000)
        assert card.locator(".cnb-badge").inner_text().strip() == "cancelled"
        assert card.locator("button", has_text="Cancel").count() == 0 or card.locator(
            "button", has_text="Cancel").is_disabled()  # nothing left to cancel
        failed = nb7.page.locator(".cnb-board .cnb-lane", has=nb7.page.locator(".cnb-lane-head", has_text="Failed"))
        failed.locator(".cnb-mini.cnb-is-cancelled").first.wait_for(timeout=10_000)
        assert failed.locator(".cnb-mini.cnb-is-cancelled").count() >= 1  # on the board too, drawn neutral


def test_a_kernel_restart_in_notebook_7_makes_the_views_say_so(nb7: Page) -> None:
    with nb7.screenshots_on_failure("restart"):
        restart_kernel(nb7.page)
        for view in (nb7.page.locator(".cnb:not(.cnb-board)").first, nb7.page.locator(".cnb-board")):
            view.locator(".cnb-stale", has_text="Not live: its kernel restarted").wait_for(timeout=5_000)
        assert all(b.is_disabled() for b in nb7.page.locator(".cnb button.cnb-retry").all())
        wait_until(lambda: nb7.lab.kernel_state("widgets.ipynb") == "idle", 30, "the restarted kernel idle")


def test_a_kernel_killed_mid_run_leaves_the_board_counting_its_run_where_its_card_says(nb7: Page) -> None:
    """No process but the server has the store open once the kernel is killed: the board drawn
    from the store counted the dead kernel's run under Running while its card said
    "interrupted" (w55). The server records the run as a kernel would: both say failed. Its
    waiting run can be cancelled from its card."""
    page = nb7.page
    with nb7.screenshots_on_failure("killed"):
        run_all(page)
        card = nb7.card("Waiting for data")
        wait_until(lambda: "running" in card.locator(".cnb-badge").inner_text() and page.locator(".cnb-stale").count() == 0,
                   60, "the run running, every view live")
        board = page.locator(".cnb-board")

        def lane(label: str) -> Any:
            return board.locator(".cnb-lane", has=page.locator(".cnb-lane-head", has_text=label))

        task_id = card.locator(".cnb-sub").inner_text().split("·")[-1].strip()
        mini = f".cnb-mini[data-task-id='{task_id}']"
        lane("Running").locator(mini).wait_for(timeout=15_000)
        os.kill(kernel_pid(nb7.lab, "widgets.ipynb"), signal.SIGKILL)
        board.locator(".cnb-stale", has_text="Not live").wait_for(timeout=15_000)
        card.locator(".cnb-badge", has_text="failed").wait_for(timeout=15_000)
        assert "interrupted" in card.locator(".cnb-error").inner_text()
        wait_until(lambda: lane("Running").locator(".cnb-count").inner_text().strip() in ("", "0"), 15,
                   "nothing counted under Running")
        assert lane("Running").locator(".cnb-mini").count() == 0
        lane("Failed").locator(mini).wait_for(timeout=15_000)

        # The dead kernel's scheduled run: nobody holds it, so a Cancel filed through the server
        # cancels it there (w56: refused, "nobody to ask", though the button looked usable).
        page.locator(".jp-Dialog button", has_text="Ok").click()  # "The kernel ... appears to have died"
        later = nb7.card("Crunching later")
        later.locator("button", has_text="Cancel").click()
        later.locator(".cnb-badge", has_text="cancelled").wait_for(timeout=15_000)


def test_nothing_threw_and_nothing_complained(nb7: Page) -> None:
    assert nb7.problems == []
