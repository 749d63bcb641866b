"""The chaos campaign's 60-second mode (``chaos.py --minutes 1``): six processes, SIGKILLs
every few seconds, and not one violated invariant. The long mode is run by hand:
``python tests/reliability/chaos.py --minutes 10`` (figures in docs/guarantees.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).with_name("chaos.py")


@pytest.mark.timeout(480)  # a minute of load, then draining and recovery (up to 60 s), on a busy machine
def test_one_minute_of_chaos_breaks_no_invariant(tmp_path):
    summary = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, str(CHAOS), "--minutes", "1", "--dir", str(tmp_path / "chaos"),
                           "--summary", str(summary)], capture_output=True, text=True, timeout=420)
    print(done.stdout)
    assert summary.exists(), done.stdout + done.stderr
    report = json.loads(summary.read_text())
    broken = {name: r for name, r in report["invariants"].items() if r["violations"]}
    assert not broken, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    # the campaign did what it says: every invariant was put to the test, under kills
    assert all(r["checked"] > 0 for r in report["invariants"].values()), report["invariants"]
    figures = report["figures"]
    assert figures["kills"] >= 8 and figures["descendants of killed processes"] > 0
    kinds = figures["by kind"]
    assert all(kinds.get(op, 0) > 0 for op in ("submit", "rejected", "inc", "cancel", "finished")), kinds
