"""Output at volume: a task that prints a lot, and a cell that streams a lot, side by side
with the same code doing the same writes without capsule_nb.

    python benchmarks/bench_output.py                # 100,000 lines, 60,000 chunks
    python benchmarks/bench_output.py --lines 300000

Cases, each in its own interpreter:

* ``print-plain``: a function prints N lines into a ``StringIO`` (Python's own cost);
* ``print-task``: the same function as a thread task, submitted and waited on: its
  output is captured and kept (the newest 200,000 characters) in its record; and
  again with 3N lines;
* ``stream-plain``: a real kernel runs a cell that prints M chunks (ipykernel's own stream);
* ``stream-cell``: the same kernel runs ``session.stream_reply()`` with M writes, one
  output redrawn in place as it grows; and again with 3M writes.

* ``notify-task``: the same thread task sends each line as ``session.notify`` instead
  (a status each replaces the last: past the cap of 1,000 messages, the replaced go),
  against the same lines printed into a ``StringIO``; and again with 3N notifications.

Aim: output costs the same per write however much there is: at 3x the volume, at most
1.5x the time per write. Keeping the text by adding each write to it made both grow
with the square of the output (a task printing 100,000 lines took 6 s, 110x its plain
peer; a 60,000-chunk stream 17 s, 36x). The ratio to the plain peer is printed beside.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

AIM = 1.5  # time per write at 3x the volume over time per write at 1x


def _print_lines(lines: int) -> int:
    for i in range(lines):
        print("line", i)
    return lines


def _notify_lines(session, lines: int) -> int:
    for i in range(lines):
        session.notify(f"checked {i} rows")
    return lines


def print_plain(lines: int) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        _print_lines(lines)
    return time.perf_counter() - started


def print_task(lines: int, notify: bool = False) -> float:
    """``notify``: the task sends each line as a notification (each replaces the last in place;
    past the cap of 1,000 messages, the replaced ones go) instead of printing it."""
    import asyncio

    import capsule_nb as cpsl

    async def main() -> float:
        app = cpsl.App(name="bench-output", home=tempfile.mkdtemp(prefix="bench-output-"))
        loud = app.task(_notify_lines if notify else _print_lines)
        started = time.perf_counter()
        handle = loud.submit(lines=lines)
        status = await handle.wait(timeout=600)
        seconds = time.perf_counter() - started
        assert status == "completed", status
        if notify:
            assert handle.snapshot()["messages"][-1]["text"] == f"checked {lines - 1} rows"
        else:
            assert handle.snapshot()["output"][-1]["text"].endswith(f"line {lines - 1}\n")
        app.close()
        return seconds

    return asyncio.run(main())


_CELLS = {
    "stream-plain": "for i in range({n}):\n    print(f'tok{{i % 10}} ', end='')",
    "stream-cell": "with session.stream_reply() as out:\n    for i in range({n}):\n        out.write(f'tok{{i % 10}} ')",
}


def stream(kind: str, chunks: int) -> float:
    from capsule_nb.demo import kernel_classes

    manager = kernel_classes()[0](kernel_name="python3")
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": tempfile.mkdtemp(prefix="bench-output-")})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)

        def run(code: str) -> float:
            started = time.perf_counter()
            reply = client.execute_interactive(code, timeout=600, output_hook=lambda m: None)
            if reply["content"]["status"] != "ok":
                raise SystemExit(f"kernel error: {reply['content'].get('evalue')}")
            return time.perf_counter() - started

        run("%load_ext capsule_nb\nsession = cpsl.current_session()")
        return run(_CELLS[kind].format(n=chunks))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


CASES: dict[str, Callable[[argparse.Namespace], float]] = {
    "print-plain": lambda a: print_plain(a.lines),
    "print-task": lambda a: print_task(a.lines),
    "print-task-3x": lambda a: print_task(3 * a.lines),
    "notify-task": lambda a: print_task(a.notes, notify=True),
    "notify-task-3x": lambda a: print_task(3 * a.notes, notify=True),
    "notify-plain": lambda a: print_plain(a.notes),
    "stream-plain": lambda a: stream("stream-plain", a.chunks),
    "stream-cell": lambda a: stream("stream-cell", a.chunks),
    "stream-cell-3x": lambda a: stream("stream-cell", 3 * a.chunks),
}


def _in_own_interpreter(name: str, args: argparse.Namespace) -> float:
    out = subprocess.run([sys.executable, __file__, "--case", name, "--lines", str(args.lines),
                          "--chunks", str(args.chunks), "--notes", str(args.notes)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="lines the task prints (default 100,000)")
    parser.add_argument("--chunks", type=int, default=60_000, help="writes to the cell's stream (default 60,000)")
    parser.add_argument("--notes", type=int, default=10_000, help="notifications the task sends (default 10,000)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps({"seconds": CASES[args.case](args)}))
        return
    seconds = {name: _in_own_interpreter(name, args) for name in CASES}
    print(f"output at volume (python {sys.version.split()[0]}, {os.cpu_count()} cpus), each case in its own interpreter")
    for label, n, mine, peer, what in (
            ("a task printing {:,} lines", args.lines, "print-task", "print-plain", "into a StringIO"),
            ("a task sending {:,} notifications", args.notes, "notify-task", "notify-plain", "lines printed into a StringIO"),
            ("a cell streaming {:,} chunks", args.chunks, "stream-cell", "stream-plain", "printed in the cell")):
        growth = seconds[f"{mine}-3x"] / (3 * seconds[mine])
        print(f"  {label.format(n)}: {seconds[mine]:.3f} s ({seconds[mine] / seconds[peer]:.1f}x the same "
              f"{what}: {seconds[peer]:.3f} s); {label.format(3 * n)}: {seconds[f'{mine}-3x']:.3f} s")
        print(f"    time per write at 3x the volume: {growth:.2f}x {'ok' if growth <= AIM else '--'} "
              f"(aim <= {AIM:g}x: linear)")

if __name__ == "__main__":
    main()
