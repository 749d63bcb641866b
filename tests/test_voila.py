"""notebooks/dashboard.ipynb as a Voilà app, in a real Chromium.

Voilà serves the dashboard with a store of its own; the page's kernel runs the
notebook. The test fills the form as an operator would, clicks Submit, and
follows the new run's card to the board's Completed column and its document
into the collection table, then checks the store from this process with
``capsule_nb.App(home=...)``. When it is over, Voilà and every kernel it
started are gone. On a failure, a screenshot and Voilà's log go to
tests/artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from .lab import CHROMIUM, Voila, chromium, running, wait_until

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def submit_from_the_form(page: Any, report_id: str, sections: int) -> str:
    """Type the report id, set the slider through its readout, click Submit; the new run's id."""
    page.locator(".widget-text", has_text="Report id").locator("input").fill(report_id)
    page.locator(".widget-slider", has_text="Sections").locator(".widget-readout").click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(sections))
    page.keyboard.press("Enter")
    handle = page.locator(".widget-slider", has_text="Sections").locator("[role=slider]")
    wait_until(lambda: handle.get_attribute("aria-valuetext") == str(sections), 10, "the slider set")
    page.locator("button", has_text="Submit").click()
    code = page.locator(".widget-html", has_text="Submitted run").locator("code")
    code.wait_for(timeout=10_000)
    return code.inner_text().strip()


def test_the_dashboard_submits_a_build_that_reaches_completed(tmp_path: Path) -> None:
    import capsule_nb

    with Voila(tmp_path) as voila:
        with chromium() as page:
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            ours = []  # console errors of requests to capsule_nb's routes
            page.on("console", lambda m: m.type == "error" and "capsule-nb" in m.location.get("url", "")
                    and ours.append(m.text))
            asked, ended = [], []  # requests to them, and those that have ended (a redirect not followed fails)
            page.on("request", lambda r: "capsule-nb/api" in r.url and asked.append(r.url))
            for event in ("requestfinished", "requestfailed"):
                page.on(event, lambda r: "capsule-nb/api" in r.url and ended.append(r.url))
            try:
                page.goto(voila.url)
                board = page.locator(".cnb-board")
                board.wait_for(timeout=60_000)
                page.locator("button", has_text="Submit").wait_for(timeout=10_000)
                kernels = voila.kernels()  # the page's kernel, to be gone in the end
                assert kernels
                schedules = page.locator(".widget-html", has_text="Schedules").inner_text()
                assert "nightly_reports" in schedules and "Europe/Paris" in schedules, schedules
                text = page.locator("body").inner_text()  # what the app's users read: no notes for developers
                assert "Report operations" in text and not re.search(r"Open this notebook|voila |Run All", text)

                task_id = submit_from_the_form(page, "weekly", 6)
                completed = board.locator(".cnb-lane", has=page.locator(".cnb-lane-head", has_text="Completed"))
                card = completed.locator(f".cnb-mini[title^='run {task_id}:']")
                card.wait_for(timeout=30_000)
                assert "'rows': 2100" in card.locator(".cnb-note").inner_text()
                assert card.locator("[role=progressbar]").is_visible()  # full, and not squashed to 0 px
                table = page.locator(".widget-html", has_text="reports (")
                table.locator("td", has_text="weekly").wait_for(timeout=10_000)  # refreshed by the run's end
                assert "(1 document)" in table.inner_text()
                assert page_errors == []

                app = capsule_nb.App(home=voila.home)
                try:
                    app.store.poll()
                    record = app.get_task(task_id).snapshot()
                    assert (record["status"], record["params"]["sections"]) == ("completed", 6)
                    assert [(d["report_id"], d["rows"]) for d in app.collection("reports").find()] \
                        == [("weekly", 2100)]
                finally:
                    app.close()

                # A narrow window (a phone, a side panel): the form goes above the schedules, whole,
                # instead of squashed beside them to "eport id" and a sliver of slider (w56).
                page.set_viewport_size({"width": 480, "height": 900})
                form = page.locator(".widget-vbox", has=page.locator("button", has_text="Submit")).last
                schedules = page.locator(".widget-html", has_text="Schedules")
                wait_until(lambda: schedules.bounding_box()["y"] >= form.bounding_box()["y"]
                           + form.bounding_box()["height"] - 1, 10, "the schedules below the form")
                labels = page.locator(".widget-text .widget-label, .widget-slider .widget-label")
                assert all(label.evaluate("e => e.scrollWidth <= e.clientWidth") for label in labels.all())
                page.set_viewport_size({"width": 1280, "height": 900})

                # The page's kernel dies. `voila` on its own loads no server extension, so no
                # capsule_nb route answers there: the board says it shows what it last received,
                # and asks once, without a console error (w56: a 403 every few seconds).
                for pid in kernels:
                    os.kill(pid, signal.SIGKILL)
                stale = board.locator(".cnb-stale")
                stale.wait_for(timeout=15_000)
                wait_until(lambda: asked and len(ended) == len(asked), 15, "the board asking the server")
                assert "Showing the last state it received" in stale.inner_text()
                assert ours == [] and page_errors == []
            except BaseException:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "voila-dashboard.png"), full_page=True)
                shutil.copy(voila.log_path, ARTIFACTS / "voila.log")
                raise
    assert running(kernels) == [] and voila.process is None
