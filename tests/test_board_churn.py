"""A board over 600 runs under churn, in a real JupyterLab and a real Chromium.

The store starts with 600 finished runs; the notebook holds 24 runs running
(each can be cancelled) and keeps submitting short runs, a few a second, so
new cards keep arriving at the top of Running and Completed while the reader
scrolls, focuses, presses and clicks. What must hold: a scrolled column keeps
its place, the card that has focus keeps it, a run's node stays while the run
stays in its column, a held click on Cancel (120 ms, a normal click) cancels
the run under the pointer and no other, and a click opens that run's details.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from .lab import (CHROMIUM, Lab, chromium, fill_store, open_notebook, run_all, screenshots_on_failure, wait_until,
                  watch, write_notebook)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (CI installs it)")

HELD = 24

NOTEBOOK = (
    """%load_ext capsule_nb
import asyncio

import capsule_nb as cpsl


@cpsl.task
async def hold(n: int):
    await asyncio.sleep(3600)


@cpsl.task
async def blip(n: int):
    await asyncio.sleep(0.3)
    return n


async def churn():
    n = 0
    while True:
        n += 1
        blip.submit(n)
        await asyncio.sleep(0.25)
""",
    f"held = [hold.submit(n) for n in range({HELD})]",
    "churning = asyncio.ensure_future(churn())",
    'cpsl.ui.TaskBoard(title="Churn", refresh_ms=500)',
)


class Churn:
    def __init__(self, lab: Lab, page: Any):
        self.lab, self.page = lab, page
        self.problems: list[str] = []
        watch(page, self.problems)
        self.board = page.locator(".cnb-board")

    def lane(self, label: str) -> Any:
        return self.board.locator(".cnb-lane", has=self.page.locator(".cnb-lane-head", has_text=label))

    def list_of(self, label: str) -> Any:
        return self.lane(label).locator(".cnb-lane-cards")

    def held_ids(self) -> list[str]:
        """The hold runs in Running, as shown (newest first)."""
        return self.lane("Running").locator(".cnb-mini", has=self.page.locator(".cnb-title", has_text="hold")) \
            .evaluate_all("nodes => nodes.map(n => n.dataset.taskId)")

    def updates_seen(self, count: int, timeout: float = 20) -> None:
        """Wait until the Completed column's count has changed ``count`` times."""
        counter = self.lane("Completed").locator(".cnb-count")
        seen = [counter.inner_text()]

        def changed() -> bool:
            text = counter.inner_text()
            if text != seen[-1]:
                seen.append(text)
            return len(seen) > count

        wait_until(changed, timeout, f"{count} updates of the board")

    def statuses(self) -> dict[str, str]:
        import capsule_nb

        app = capsule_nb.App(home=self.lab.home)
        try:
            app.store.poll()
            return {r["task_id"]: r["status"] for r in app.store.runs() if r["task_name"] == "hold"}
        finally:
            app.close()

    def screenshots_on_failure(self, name: str) -> Any:
        return screenshots_on_failure(self.page, f"churn-{name}", {"board": self.board})


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Churn]:
    with Lab(tmp_path_factory.mktemp("lab"), notebooks=()) as lab:
        fill_store(lab.home, 600, statuses=("completed",) * 8 + ("failed", "cancelled")).close()
        write_notebook(lab.root / "churn.ipynb", *NOTEBOOK)
        with chromium(1400, 1000) as page:
            scene = Churn(lab, page)
            with scene.screenshots_on_failure("startup"):
                open_notebook(page, lab, "churn.ipynb")
                run_all(page)
                scene.board.wait_for(timeout=60_000)
                wait_until(lambda: len(scene.held_ids()) == HELD, 30, "the held runs in Running")
                scene.board.scroll_into_view_if_needed()
                scene.updates_seen(3)
            yield scene


def test_the_board_counts_600_runs_and_keeps_a_runs_node_while_it_stays(churn: Churn) -> None:
    with churn.screenshots_on_failure("nodes"):
        assert int(churn.board.locator(".cnb-total").inner_text().split()[0]) > 600
        churn.lane("Running").locator(".cnb-mini").evaluate_all("nodes => nodes.forEach(n => n.cnbMark = true)")
        churn.page.mouse.move(5, 5)  # away from the board: nothing holds it still
        churn.updates_seen(4)
        kept = churn.lane("Running").locator(".cnb-mini").evaluate_all(
            "nodes => nodes.filter(n => n.dataset.taskId && n.cnbMark).map(n => n.dataset.taskId)")
        assert set(churn.held_ids()) <= set(kept)  # every hold run: the very same node


def test_a_scrolled_column_keeps_its_scroll_and_focus_stays(churn: Churn) -> None:
    with churn.screenshots_on_failure("scroll"):
        cards = churn.list_of("Completed")
        cards.evaluate("list => { list.scrollTop = 300; }")
        anchor = cards.evaluate("""list => {
            const top = list.getBoundingClientRect().top;
            const node = [...list.children].find(n => n.getBoundingClientRect().top >= top);
            node.cnbAnchor = true;
            return { id: node.dataset.taskId, offset: node.getBoundingClientRect().top - top };
        }""")
        focused_id = churn.held_ids()[HELD // 2]  # by id: churning runs come and go above it
        churn.lane("Running").locator(f".cnb-mini[data-task-id='{focused_id}']").focus()
        churn.page.mouse.move(5, 5)
        churn.updates_seen(4)
        now = cards.evaluate("""list => {
            const top = list.getBoundingClientRect().top;
            const node = [...list.children].find(n => n.cnbAnchor);
            return { scrollTop: list.scrollTop, offset: node ? node.getBoundingClientRect().top - top : null };
        }""")
        assert now["scrollTop"] >= 300, now  # not back at the top
        assert now["offset"] is not None and abs(now["offset"] - anchor["offset"]) < 8, (anchor, now)
        active = churn.page.evaluate("document.activeElement.dataset.taskId")
        assert active == focused_id


def test_a_held_click_on_cancel_cancels_the_run_under_the_pointer(churn: Churn) -> None:
    with churn.screenshots_on_failure("cancel"):
        cancelled = []
        for position in (3, 9, 15):  # three normal clicks, each held 120 ms, while cards come and go above
            target = churn.held_ids()[position]
            button = churn.lane("Running").locator(f".cnb-mini[data-task-id='{target}'] button.cnb-cancel")
            button.click(delay=120)
            cancelled.append(target)
            wait_until(lambda: churn.statuses()[target] == "cancelled", 10, f"run {target} cancelled")
            churn.page.mouse.move(5, 5)
        statuses = churn.statuses()
        assert sorted(t for t, s in statuses.items() if s == "cancelled") == sorted(cancelled)
        assert sum(s == "running" for s in statuses.values()) == HELD - len(cancelled)


def test_a_click_opens_the_details_of_the_run_clicked(churn: Churn) -> None:
    with churn.screenshots_on_failure("details"):
        detail = churn.board.locator(".cnb-detail")
        for label, position in (("Running", 6), ("Completed", 2), ("Running", 1)):
            # a card that stays in its column: a blip in Running ends 0.3 s after it starts
            target = churn.held_ids()[position] if label == "Running" else \
                churn.lane(label).locator(".cnb-mini").nth(position).get_attribute("data-task-id")
            churn.lane(label).locator(f".cnb-mini[data-task-id='{target}'] .cnb-title").click(delay=60)
            detail.locator(".cnb-label", has_text=f"Run details · {target}").wait_for(timeout=10_000)
            assert target in detail.locator(".cnb-sub").inner_text()
            churn.page.mouse.move(5, 5)


def test_close_gives_the_focus_back_to_the_runs_card(churn: Churn) -> None:
    """w49: Close on the details pane dropped the focus to the page."""
    with churn.screenshots_on_failure("close"):
        detail = churn.board.locator(".cnb-detail")
        target = churn.held_ids()[4]
        churn.lane("Running").locator(f".cnb-mini[data-task-id='{target}'] .cnb-title").click()
        detail.locator(".cnb-label", has_text=f"Run details · {target}").wait_for(timeout=10_000)
        detail.locator("button", has_text="Close").click()
        wait_until(lambda: detail.locator(".cnb-card").count() == 0, 10, "the details closed")
        assert churn.page.evaluate("document.activeElement?.dataset.taskId") == target
        churn.page.mouse.move(5, 5)


def test_details_opened_from_the_keyboard_take_the_focus_and_escape_gives_it_back(churn: Churn) -> None:
    """w50: Enter opened the details and left the focus on the card, and the details' buttons
    came after every card in Tab order: a keyboard reader tabbed through the board to reach them."""
    page = churn.page
    with churn.screenshots_on_failure("keyboard-details"):
        detail = churn.board.locator(".cnb-detail")
        target = churn.held_ids()[2]
        churn.lane("Running").locator(f".cnb-mini[data-task-id='{target}']").focus()
        page.keyboard.press("Enter")
        detail.locator(".cnb-label", has_text=f"Run details · {target}").wait_for(timeout=10_000)
        wait_until(lambda: page.evaluate("document.activeElement?.classList.contains('cnb-detail')"), 5,
                   "the focus on the details")
        assert detail.get_attribute("aria-label") == f"Run details · {target}"
        page.keyboard.press("Tab")
        inside = page.evaluate("(() => { const a = document.activeElement;"
                               " return [a?.tagName, a?.closest('.cnb-detail') !== null, a?.outerHTML.slice(0, 300)]; })()")
        assert inside[:2] == ["BUTTON", True], f"Tab from the details went to {inside}"
        page.keyboard.press("Escape")
        wait_until(lambda: detail.locator(".cnb-card").count() == 0, 10, "the details closed by Escape")
        assert page.evaluate("document.activeElement?.dataset.taskId") == target
        assert churn.statuses()[target] == "running"  # (Escape pressed nothing on the way)


def test_in_a_narrow_window_the_details_opened_come_into_view(churn: Churn) -> None:
    """The columns stack in a narrow window, and the details pane, below them all, opened out
    of sight (w49): the reader clicked and saw nothing happen."""
    page = churn.page
    with churn.screenshots_on_failure("narrow-details"):
        page.set_viewport_size({"width": 700, "height": 700})
        try:
            churn.board.scroll_into_view_if_needed()
            churn.lane("Running").scroll_into_view_if_needed()
            target = churn.held_ids()[0]
            below = churn.board.locator(".cnb-lanes").evaluate("lanes => lanes.getBoundingClientRect().bottom")
            assert below >= 700, f"the columns end in view (y={below}), and the details with them: the test proves nothing"
            churn.lane("Running").locator(f".cnb-mini[data-task-id='{target}'] .cnb-title").click()
            label = churn.board.locator(".cnb-detail .cnb-label", has_text=f"Run details · {target}")
            label.wait_for(timeout=10_000)
            box = wait_until(lambda: (b := label.bounding_box()) is not None and 0 <= b["y"] < 700 and b, 5,
                             "the details in view")
            assert 0 <= box["y"] and box["y"] + box["height"] <= 700, box  # all of the label, in the window
            churn.board.locator(".cnb-detail button", has_text="Close").click()
        finally:
            page.mouse.move(5, 5)
            page.set_viewport_size({"width": 1400, "height": 1000})


def test_a_focused_filter_menu_keeps_the_focus_while_new_choices_arrive(churn: Churn) -> None:
    """w49: each new choice (a task first run in another kernel) made the menus anew, so the
    menu the reader had focused lost it, and a keyboard reader was sent back to the page."""
    import capsule_nb

    with churn.screenshots_on_failure("menu-focus"):
        menu = churn.board.locator("select[title='filter by task_name']")
        menu.focus()
        app = capsule_nb.App(home=churn.lab.home)
        try:
            @app.task
            async def newcomer() -> int:
                return 1

            newcomer.submit()
            app.store.flush()
            wait_until(lambda: "newcomer" in menu.locator("option").all_inner_texts(), 15, "the new choice")
        finally:
            app.close()
        assert menu.evaluate("select => document.activeElement === select")
        assert menu.evaluate("select => select.value") == ""


def test_nothing_threw_and_nothing_complained(churn: Churn) -> None:
    assert churn.problems == []
