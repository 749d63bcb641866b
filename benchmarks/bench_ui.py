"""UI benchmarks: how many comm messages a widget sends under a burst, and how fast
a board over 10,000 runs draws in Chromium.

    python benchmarks/bench_ui.py                 # all three, about 30 s on 2 cores
    python benchmarks/bench_ui.py --runs 20000    # a bigger board
    python benchmarks/bench_ui.py --skip lab      # no JupyterLab (standalone page only)

1. **Burst.** 5,000 thread runs complete as fast as the pool goes, while a
   TaskBoard watches; and one run reports progress as fast as it can for two
   seconds, while its TaskCard watches. Each widget's comm is replaced by a counter, so a figure
   is what a browser would receive. Printed: store events, comm messages,
   messages per second, and events per message (the coalescing ratio).
   Aim: at most ``1 / LiveWidget.FLUSH_SECONDS`` (10) messages a second.
2. **Standalone render and update.** The board's state over N runs
   (``board.get_state()``) is drawn by js/task_board.js in headless Chromium,
   with a stand-in for anywidget's model: the front end's own cost, without
   JupyterLab. Then 50 updates arrive (a new run at the top of Completed, a
   running run's bar moves): the time each takes, and how many cards were
   made anew (in place, keyed by run id: one per update, the new run).
3. **In JupyterLab.** A real JupyterLab, a notebook whose cell is
   ``cpsl.ui.TaskBoard()`` over a store of N runs: from Shift+Enter to the
   board's cards on screen (kernel, comm, widget manager and drawing).
   Aim: under one second.

Chromium is the system one (/usr/bin/chromium); the harness is tests/lab.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import capsule_nb as cpsl  # noqa: E402
from capsule_nb import ui  # noqa: E402
from capsule_nb.ui.live import LiveWidget  # noqa: E402


class CountingComm:
    def __init__(self, comm_id: str):
        self.comm_id, self.kernel, self.sent = comm_id, object(), 0

    def send(self, data=None, metadata=None, buffers=None):
        self.sent += 1

    def on_msg(self, callback):
        pass

    def close(self, *args, **kwargs):
        pass


def counted(widget: LiveWidget) -> CountingComm:
    widget.comm = CountingComm(widget.comm.comm_id)
    return widget.comm


def report(what: str, events: int, messages: int, seconds: float) -> None:
    print(f"  {what:<34} {events:>7,} events  {messages:>4} messages in {seconds:5.2f}s  "
          f"= {messages / seconds:5.1f} msg/s  ratio {events / max(messages, 1):,.0f} events/message")


async def bench_burst(n: int, seconds: float) -> None:
    print(f"burst (rate cap {1 / LiveWidget.FLUSH_SECONDS:.0f} messages/s per widget)")
    with tempfile.TemporaryDirectory() as home:
        app = cpsl.App(home=home)

        @app.task
        def tick(i: int) -> int:
            return i

        @app.task
        def chatty(session=None) -> int:
            step, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                step += 1
                session.progress(step, None, "as fast as it can")
            return step

        board = ui.TaskBoard(app=app)
        board_comm = counted(board)
        events = []
        unsubscribe = app.store.events.subscribe(events.append)
        started = time.monotonic()
        await asyncio.to_thread(lambda: [tick.submit(i) for i in range(n)])
        while app.tasks.count(status="completed") < n:
            await asyncio.sleep(0.01)
        while next(x for x in board.lanes if x["label"] == "Completed")["count"] < n:
            await asyncio.sleep(0.01)
        report(f"board, {n:,} runs completing", len(events), board_comm.sent, time.monotonic() - started)
        unsubscribe()
        board.close()

        gate = asyncio.Event()

        @app.task
        async def hold():
            await gate.wait()

        held = hold.submit()  # a run for the card to start on, so its first message is not counted
        handle = chatty.submit()
        card = ui.TaskCard(handle)
        card_comm = counted(card)
        events.clear()
        unsubscribe = app.store.events.subscribe(events.append, task_id=handle.task_id)
        started = time.monotonic()
        await handle.wait(60)
        while card.run["status"] != "completed":
            await asyncio.sleep(0.01)
        report(f"card, progress for {seconds:g}s", len(events), card_comm.sent, time.monotonic() - started)
        unsubscribe()
        card.close()
        gate.set()
        await held.wait(5)
        app.close()


PAGE = """<!doctype html><html><body><div id="root"></div><script type="module">
const state = %s;
const handlers = {};
const model = {
  get: (name) => state[name],
  set: (name, value) => { state[name] = value; },
  save_changes() {},
  send() {},
  on(events, handler) { for (const e of events.split(" ")) (handlers[e] ??= []).push(handler); },
  off() {},
};
const started = performance.now();
const url = URL.createObjectURL(new Blob([state._esm], { type: "text/javascript" }));
const widget = (await import(url)).default;
widget.render({ model, el: document.getElementById("root") });
document.body.offsetHeight;  // force style and layout
requestAnimationFrame(() => { window.renderMs = performance.now() - started; });

// Updates as the kernel sends them: a whole new `lanes` list, one run new, one bar moved.
let made = 0;
new MutationObserver((changes) => {
  for (const change of changes) {
    for (const node of change.addedNodes) {
      made += node.matches?.(".cnb-mini") ? 1 : node.querySelectorAll?.(".cnb-mini").length ?? 0;
    }
  }
}).observe(document.getElementById("root"), { childList: true, subtree: true });
window.update = (k) => {
  const lanes = structuredClone(state.lanes);
  const done = lanes.find((lane) => lane.label === "Completed");
  const fresh = { ...done.cards[0], task_id: `ffffffffffff${String(k).padStart(12, "0")}` };
  done.cards = [fresh, ...done.cards.slice(0, -1)];
  done.count += 1;
  const running = lanes.find((lane) => lane.label === "Running");
  if (running.cards.length) running.cards[0] = { ...running.cards[0], progress: (k %% 10) / 10 };
  state.lanes = lanes;
  const before = performance.now();
  for (const handler of handlers["change:lanes"] ?? []) handler();
  document.body.offsetHeight;
  return performance.now() - before;
};
window.made = () => made;
</script></body></html>"""


def bench_standalone(n: int) -> None:
    from tests.lab import chromium, fill_store

    with tempfile.TemporaryDirectory() as home:
        app = fill_store(Path(home), n)
        started = time.perf_counter()
        board = ui.TaskBoard(app=app)
        python_ms = (time.perf_counter() - started) * 1000
        state = board.get_state()
        board.close()
        app.close()
    page_path = Path(tempfile.mkdtemp()) / "board.html"
    page_path.write_text(PAGE % json.dumps(state))
    with chromium() as page:
        page.goto(page_path.as_uri())
        page.wait_for_function("window.renderMs !== undefined", timeout=30_000)
        render_ms = page.evaluate("window.renderMs")
        cards = page.locator(".cnb-mini").count()
        made = page.evaluate("window.made()")
        times = sorted(page.evaluate(f"window.update({k})") for k in range(50))
        made = page.evaluate("window.made()") - made
    print(f"standalone: board over {n:,} runs: state {python_ms:.0f} ms in Python "
          f"({len(json.dumps(state)) / 1024:.0f} KiB), {cards} cards drawn in {render_ms:.0f} ms in Chromium")
    print(f"  50 updates: median {times[25]:.1f} ms, slowest {times[-1]:.1f} ms each; "
          f"{made / 50:.1f} cards made anew per update (of {cards} shown)")


def bench_lab(n: int) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from tests.lab import Lab, chromium, fill_store, open_notebook, wait_until

    with tempfile.TemporaryDirectory() as base, Lab(Path(base), notebooks=()) as lab:
        fill_store(lab.home, n).close()
        notebook = new_notebook(cells=[new_code_cell("%load_ext capsule_nb\nimport capsule_nb as cpsl"),
                                       new_code_cell("cpsl.ui.TaskBoard(title='Ten thousand runs')")],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}})
        nbformat.write(notebook, lab.root / "bench.ipynb")
        with chromium() as page:
            open_notebook(page, lab, "bench.ipynb")
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            cells.nth(0).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")  # the setup cell (imports, the store opens)
            page.wait_for_selector(".jp-CodeCell .jp-InputArea-prompt:has-text('[1]')", timeout=60_000)
            wait_until(lambda: lab.kernel_state("bench.ipynb") == "idle", 30, "the setup cell")
            times = []
            for attempt in range(3):
                cells.nth(1).locator(".jp-InputArea-editor").click()
                started = time.perf_counter()
                page.keyboard.press("Control+Enter")  # run the board cell, stay on it
                page.wait_for_function(
                    "document.querySelectorAll('.cnb-board .cnb-mini').length >= 150 && "
                    "document.querySelectorAll('.jp-CodeCell')[1].querySelector('.jp-InputArea-prompt')"
                    f".textContent.includes('[{attempt + 2}]')",
                    timeout=30_000, polling=20)
                times.append((time.perf_counter() - started) * 1000)
            counts = page.locator(".cnb-board .cnb-count").all_inner_texts()
    print(f"JupyterLab: board over {n:,} runs, Ctrl+Enter to {sum(map(int, counts)):,} runs counted and "
          f"the first cards drawn: {', '.join(f'{t:.0f}' for t in times)} ms (first, then warm)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=5000, help="runs completing in the burst")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the card's run reports progress")
    parser.add_argument("--runs", type=int, default=10000, help="runs on the rendered board")
    parser.add_argument("--skip", action="append", default=[], choices=["burst", "standalone", "lab"])
    args = parser.parse_args()
    if "burst" not in args.skip:
        asyncio.run(bench_burst(args.burst, args.seconds))
    if "standalone" not in args.skip:
        bench_standalone(args.runs)
    if "lab" not in args.skip:
        bench_lab(args.runs)


if __name__ == "__main__":
    main()
