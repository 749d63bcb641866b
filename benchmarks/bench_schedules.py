"""Schedule firing jitter: from a tick's due time to the start of its run.

    python benchmarks/bench_schedules.py [--ticks 120]

A seconds-field schedule (``* * * * * *``) runs for ``--ticks`` seconds with
a sync body (thread) and an async body (on the loop), next to a reference
that does nothing but wake up at the same due times: ``loop.call_at`` on the
same asyncio loop (the floor for "wake at a wall-clock time" in Python).
Prints p50/p99/max of each and the ratio to the reference. Aim: p99 under 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import capsule_nb as cpsl


def summary(name: str, lags: list[float], ref: list[float] | None = None) -> str:
    lags_ms = sorted(x * 1000 for x in lags)
    p50 = statistics.median(lags_ms)
    p99 = lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))]
    line = f"{name:<34} n={len(lags_ms):<4} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   max {lags_ms[-1]:7.2f} ms"
    if ref:
        ref_ms = sorted(x * 1000 for x in ref)
        line += f"   p50 x{p50 / max(statistics.median(ref_ms), 1e-3):.1f} of reference"
    return line


async def main_async(ticks: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        app = cpsl.App(home=home)
        sync_lags: list[float] = []
        async_lags: list[float] = []
        ref_lags: list[float] = []

        @app.schedule("* * * * * *", name="sync_tick")
        def sync_tick() -> None:
            sync_lags.append(time.time() - (int(time.time())))

        @app.schedule("* * * * * *", name="async_tick")
        async def async_tick() -> None:
            async_lags.append(time.time() - (int(time.time())))

        loop = asyncio.get_running_loop()

        def reference(due: float) -> None:
            ref_lags.append(time.time() - due)
            if len(ref_lags) < ticks:
                loop.call_at(loop.time() + (due + 1 - time.time()), reference, due + 1)

        first = int(time.time()) + 1
        loop.call_at(loop.time() + (first - time.time()), reference, first)
        deadline = time.monotonic() + ticks + 5
        while min(len(sync_lags), len(async_lags), len(ref_lags)) < ticks and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        app.close()
    print(summary("reference: loop.call_at", ref_lags))
    print(summary("capsule_nb schedule, sync body", sync_lags, ref_lags))
    print(summary("capsule_nb schedule, async body", async_lags, ref_lags))
    worst = max(sorted(sync_lags)[int(len(sync_lags) * 0.99) - 1], sorted(async_lags)[int(len(async_lags) * 0.99) - 1])
    print(f"aim p99 < 20 ms: {'ok' if worst * 1000 < 20 else 'missed'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=120, help="seconds to run (one tick per second)")
    args = parser.parse_args(argv)
    print(f"capsule_nb schedule jitter (python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.ticks} ticks)")
    asyncio.run(main_async(args.ticks))


if __name__ == "__main__":
    main()
