"""Make the README's screenshots: a card and a board, in JupyterLab's light and dark themes.

    python docs/img/screenshots.py

Runs notebooks/widgets.ipynb in a real JupyterLab (tests/lab.py) with the
system Chromium, once per theme, and saves card-<theme>.png (the crunching
run, caught halfway) and board-<theme>.png (every run, one opened in the
details pane) next to this file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.lab import DARK, LIGHT, Lab, chromium, open_notebook, run_all, wait_until  # noqa: E402


def shoot(theme: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as base, Lab(Path(base), theme=theme) as lab, chromium(1200, 900) as page:
        open_notebook(page, lab)
        run_all(page)
        card = page.locator(".cnb:not(.cnb-board) > .cnb-card", has=page.locator(".cnb-title", has_text="Crunching"))
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


if __name__ == "__main__":
    shoot(LIGHT, "light")
    shoot(DARK, "dark")
