"""Soak: 100,000 short runs through one real kernel with retention at 10,000.

    python benchmarks/bench_soak.py [--runs 100000] [--keep 10000]

Runs batches of no-op async and thread tasks in a real ipykernel (started
with jupyter_client) and prints, after each batch, the kernel's resident
memory (VmRSS from /proc, read from outside the kernel) and the store's size
on disk. Aim: RSS growth under 50 MB after the warm-up batch, and a store
that stops growing once retention is reached. A second kernel running the
same batches as plain asyncio tasks and thread-pool calls, without
capsule_nb, is printed beside it: what the kernel's own memory does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from capsule_nb.demo import kernel_classes

BATCH = """
hs = [noop.submit() if i % 2 else snoop.submit() for i in range({n})]
for h in hs:
    await h.wait(120)
del hs
import asyncio, gc
await asyncio.sleep(1.0)  # let a maintenance pass (every 0.5 s) apply retention
gc.collect()
"""

# The reference: the same batches as plain asyncio tasks and thread-pool calls, no capsule_nb.
REFERENCE_SETUP = """
import asyncio, gc
async def noop(): pass
def snoop(): pass
"""
REFERENCE_BATCH = """
loop = asyncio.get_running_loop()
hs = [asyncio.ensure_future(noop()) if i % 2 else loop.run_in_executor(None, snoop) for i in range({n})]
for h in hs:
    await asyncio.wait_for(h, 120)
del hs
await asyncio.sleep(1.0)
gc.collect()
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def soak(setup: str, batch: str, args: argparse.Namespace, home: Path) -> list[tuple[int, float, float]]:
    """(runs done, runs/s of the batch, kernel RSS MB) after each batch, in a fresh kernel."""
    manager = kernel_classes()[0](kernel_name="python3")
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": str(home)})
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)

    def run(code: str) -> None:
        reply = client.execute_interactive(code, timeout=600, output_hook=lambda m: None)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"kernel error: {reply['content'].get('evalue')}")

    try:
        run(setup)
        rows, done = [], 0
        while done < args.runs:
            t = time.monotonic()
            run(batch.format(n=args.batch))
            done += args.batch
            rows.append((done, args.batch / (time.monotonic() - t), rss_mb(manager.provisioner.pid),
                         disk_mb(home) if home.exists() else 0.0))
            print(f"  {done:>8,} runs, RSS {rows[-1][2]:.1f} MB", file=sys.stderr)
        return rows
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--keep", type=int, default=10_000)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="capsule-soak-"))
    setup = (f"%load_ext capsule_nb\ncpsl.configure(keep_finished={args.keep})\n"
             "@cpsl.task\nasync def noop(): pass\n@cpsl.task\ndef snoop(): pass")
    capsule = soak(setup, BATCH, args, folder / "store")
    plain = soak(REFERENCE_SETUP, REFERENCE_BATCH, args, folder / "unused")
    print(f"capsule_nb soak (python {sys.version.split()[0]}, {os.cpu_count()} cpus): "
          f"{args.runs:,} runs in batches of {args.batch:,}, keep_finished={args.keep:,}; "
          "each kernel's resident memory after each batch")
    print(f"{'runs done':>10} {'runs/s':>8} {'capsule_nb RSS MB':>18} {'plain asyncio RSS MB':>21} {'store MB':>9}")
    for (done, rate, rss, store), (_, _, plain_rss, _) in zip(capsule, plain):
        print(f"{done:>10,} {rate:>8,.0f} {rss:>18.1f} {plain_rss:>21.1f} {store:>9.1f}")
    growth, plain_growth = capsule[-1][2] - capsule[0][2], plain[-1][2] - plain[0][2]
    print(f"RSS growth after the warm-up batch: capsule_nb {growth:+.1f} MB, plain asyncio {plain_growth:+.1f} MB "
          f"(aim: capsule_nb < 50 MB): {'ok' if growth < 50 else 'missed'}")


if __name__ == "__main__":
    main()
