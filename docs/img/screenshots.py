"""Make the README's screenshots: a card and a board, in JupyterLab's light and dark themes,
and the Voilà dashboard.

    python docs/img/screenshots.py              # all of them
    python docs/img/screenshots.py dashboard    # only dashboard.png

Runs notebooks/widgets.ipynb in a real JupyterLab (tests/lab.py) with the
system Chromium, once per theme, and saves card-<theme>.png (the crunching
run, caught halfway) and board-<theme>.png (every run, one opened in the
details pane) next to this file. dashboard.png is notebooks/dashboard.ipynb
served by Voilà, one build done and one halfway.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.lab import DARK, LIGHT, Lab, Voila, chromium, open_notebook, run_all, wait_until  # noqa: E402
from tests.test_voila import submit_from_the_form  # noqa: E402


def shoot(theme: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as base, Lab(Path(base), theme=theme) as lab, chromium(1200, 900) as page:
        open_notebook(page, lab)
        run_all(page)
        title = page.locator(".cnb-title", has_text="Crunching numbers")
        card = page.locator(".cnb:not(.cnb-board) > .cnb-card", has=title)
        bar = card.locator("[role=progressbar]")
        bar.wait_for(timeout=60_000)
        wait_until(lambda: int(bar.get_attribute("aria-valuenow") or 0) >= 50, 30, "the run halfway")
        card.scroll_into_view_if_needed()
        card.screenshot(path=str(HERE / f"card-{name}.png"), animations="disabled")

        board = page.locator(".cnb-board")
        board.wait_for(timeout=30_000)
        board.scroll_into_view_if_needed()
        failed = board.locator(".cnb-mini", has=page.locator(".cnb-badge", has_text="failed"))
        failed.wait_for(timeout=30_000)
        wait_until(lambda: board.locator(".cnb-mini", has_text="completed").count() == 1, 30, "the run done")
        failed.click()
        board.locator(".cnb-detail .cnb-card").wait_for(timeout=10_000)
        board.locator(".cnb-detail summary").click()  # the traceback, opened
        board.screenshot(path=str(HERE / f"board-{name}.png"), animations="disabled")
        print(f"saved card-{name}.png and board-{name}.png in {HERE}")


def dashboard() -> None:
    with tempfile.TemporaryDirectory() as base, Voila(Path(base)) as voila, chromium(1200, 620) as page:
        page.goto(voila.url)
        board = page.locator(".cnb-board")
        board.wait_for(timeout=60_000)
        done = submit_from_the_form(page, "daily", 4)
        board.locator(f".cnb-mini.cnb-is-completed[title^='run {done}:']").wait_for(timeout=30_000)
        page.locator(".widget-html", has_text="documents").locator("td", has_text="daily").wait_for(timeout=10_000)
        submit_from_the_form(page, "weekly", 12)
        bar = board.locator(".cnb-mini.cnb-is-running [role=progressbar]")
        bar.wait_for(state="attached", timeout=30_000)
        wait_until(lambda: int(bar.get_attribute("aria-valuenow") or 0) >= 40, 30, "the second build halfway")
        page.screenshot(path=str(HERE / "dashboard.png"), animations="disabled")
        print(f"saved dashboard.png in {HERE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["dashboard"]:
        shoot(LIGHT, "light")
        shoot(DARK, "dark")
    dashboard()
