"""Every example notebook runs top to bottom in a real kernel, and does what it says."""

import subprocess
import sys
from pathlib import Path

import pytest

import capsule_nb as cpsl
from capsule_nb.demo import run_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_reports_notebook(tmp_path):
    nb = run_notebook(NOTEBOOKS / "reports.ipynb", tmp_path / "store", cwd=tmp_path, timeout=60)
    assert "joined the run in flight: True" in outputs(nb)
    app = cpsl.App(home=tmp_path / "store")
    assert app.collection("reports").count() == 2
    assert {h.snapshot()["status"] for h in app.tasks.find()} == {"completed"}


def test_schedules_notebook(tmp_path):
    nb = run_notebook(NOTEBOOKS / "schedules.ipynb", tmp_path / "store", cwd=tmp_path, timeout=60)
    text = outputs(nb)
    assert "ticks so far:" in text and "every_two_seconds" in text


def test_schedules_notebook_run_again_on_its_store_waits_for_ticks_of_its_own(tmp_path):
    """Its wait counted every completed run on the store, so a second run passed at once, with
    no new tick, and showed the first run's totals (w64)."""
    done = []
    for _ in range(2):
        run_notebook(NOTEBOOKS / "schedules.ipynb", tmp_path / "store", cwd=tmp_path, timeout=60)
        app = cpsl.App(home=tmp_path / "store")
        done.append(sum(h.task_name == "sync_crm" for h in app.tasks.find(status="completed", limit=0)))
        app.close()
    assert done[1] >= done[0] + 2, done


def test_the_capsule_code_notebook_is_plain_capsule_code():
    """It says "Capsule code, unchanged": ``capsule-nb check`` found a ``wait()`` and a sort
    Capsule's ``find`` does not take in it (w64)."""
    done = subprocess.run([sys.executable, "-m", "capsule_nb", "check", str(NOTEBOOKS / "capsule_compat.ipynb")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "plain Capsule code" in done.stdout, done.stdout + done.stderr


def test_capsule_compat_notebook(tmp_path):
    nb = run_notebook(NOTEBOOKS / "capsule_compat.ipynb", tmp_path / "store", cwd=tmp_path, timeout=60)
    assert "2 reports built" in outputs(nb)
    app = cpsl.App(home=tmp_path / "store")
    replies = [m["text"] for h in app.tasks.find() for m in h.snapshot()["messages"] if m["kind"] == "reply"]
    assert sorted(replies) == ["Report daily is ready", "Report weekly is ready"]


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_saved_without_outputs(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), name


def test_cpu_parallel_notebook(tmp_path):
    nb = run_notebook(NOTEBOOKS / "cpu_parallel.ipynb", tmp_path / "store", cwd=tmp_path, timeout=120)
    text = outputs(nb)
    assert "148933 primes below 2,000,000" in text
    app = cpsl.App(home=tmp_path / "store")
    risky = {h.snapshot()["params"]["n"]: h.snapshot() for h in app.tasks.find(limit=0) if h.task_name == "risky"}
    assert risky[2]["status"] == "failed" and "SIGSEGV" in risky[2]["error"]
    assert [risky[n]["result"] for n in (0, 1, 3, 4)] == [0, 1, 9, 16]


def test_cpu_parallel_notebook_without_dask_skips_only_its_dask_part(tmp_path):
    """README's ``pip install .`` brings no ``distributed``: "Run all" stopped at the Dask cell
    with a ModuleNotFoundError (w64). A module of that name in the kernel's folder stands in
    for its absence."""
    (tmp_path / "distributed.py").write_text("raise ImportError('distributed is not installed here')\n")
    text = outputs(run_notebook(NOTEBOOKS / "cpu_parallel.ipynb", tmp_path / "store", cwd=tmp_path, timeout=120))
    assert "skipped: pip install 'capsule_nb[dask]'" in text
    assert "148933 primes below 2,000,000" in text and "{'chunk': 0, 'pid'" in text  # (the last cell ran)


def test_dashboard_notebook(tmp_path):
    """Run the dashboard, then work its form from one more cell: the build completes and the
    collection table (refreshed by the board) shows its document."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / "dashboard.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        'report_id.value, sections.value = "weekly", 3\n'
        "submit.click()\n"
        'print(await build_report.find(report_id="weekly")[0].result())\n'
        'while "weekly" not in collection.value:\n'
        "    await asyncio.sleep(0.05)\n"
        "print(schedules.value)"))
    nbformat.write(nb, tmp_path / "dashboard.ipynb")
    text = outputs(run_notebook(tmp_path / "dashboard.ipynb", tmp_path / "store", cwd=tmp_path, timeout=60))
    assert "{'report_id': 'weekly', 'rows': 600}" in text
    assert "<td>nightly_reports</td><td><code>0 2 * * *</code> Europe/Paris</td>" in text
    app = cpsl.App(home=tmp_path / "store")
    assert [d["sections"] for d in app.collection("reports").find({"report_id": "weekly"})] == [3]
