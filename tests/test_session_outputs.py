"""What a session's messages leave in a cell's output, live and in a notebook saved after a run.

A real ipykernel driven over ZMQ (``test_kernel.Kernel``) and a notebook run
by nbclient, as nbconvert ``--execute`` and papermill run one: nbclient keeps
only what arrives under a cell before that cell goes idle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from capsule_nb.demo import run_notebook

from .test_kernel import Cell, Kernel, loaded_kernel

WHOLE = ",".join(str(i) for i in range(300)) + ","  # what each stream below writes, chunk by chunk

UNCLOSED = """
@cpsl.task
async def unclosed(session):
    out = session.stream_reply()  # never closed, never used as a context manager
    for i in range(300):
        out.write(f"{i},")
    return "ok"

@cpsl.task(process=True)
def unclosed_in_a_process(session):
    out = session.stream_reply()
    for i in range(300):
        out.write(f"{i},")
    return "ok"
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    with loaded_kernel(tmp_path_factory, "outputs",
                       "%load_ext capsule_nb\nimport capsule_nb as cpsl\nfrom IPython.display import display") as k:
        yield k


def _texts(cell: Cell, display_id: str) -> list[tuple[int, str]]:
    """(position in the kernel's iopub log, text/plain) of each draw of ``display_id`` under the cell."""
    return [(i, m["content"]["data"]["text/plain"]) for i, m in enumerate(cell.kernel.log)
            if m["parent_header"].get("msg_id") == cell.msg_id
            and m["msg_type"] in ("display_data", "update_display_data")
            and (m["content"].get("transient") or {}).get("display_id") == display_id]


@pytest.mark.parametrize("task", ["unclosed", "unclosed_in_a_process"])
def test_a_stream_a_task_never_closed_is_whole_in_the_cell_before_its_result_is(kernel: Kernel, task: str) -> None:
    """The run's end ends its streams: the last text is drawn before ``await h.result()`` returns,
    not by a held-back redraw after the code that awaited it went on."""
    kernel.run(UNCLOSED)
    cell = kernel.run(f"display(await {task}.submit(session=session).result(60))")
    kernel.wait_for(lambda: cell.done, 30, "the cell")
    stream_id = next(m["content"]["transient"]["display_id"] for m in cell.messages
                     if m["msg_type"] == "display_data" and m["content"]["data"]["text/plain"].startswith("0,"))
    after = cell.index(lambda m: m["msg_type"] == "execute_result" or (
        m["msg_type"] == "display_data" and m["content"]["data"]["text/plain"] == "'ok'"))
    whole = [i for i, text in _texts(cell, stream_id) if text == WHOLE]
    assert whole and whole[0] < after, _texts(cell, stream_id)[-1]


def _outputs(nb: Any) -> list[list[str]]:
    return [[o.get("text") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])]
            for cell in nb.cells]


def test_a_notebook_run_by_nbclient_saves_each_unclosed_stream_whole(tmp_path: Path) -> None:
    """From an async task, a ``process=True`` task and a cell, a stream left open is saved whole
    (before, the saved output kept the text of the first redraw: ``0,1,``)."""
    cells = ["%load_ext capsule_nb\nimport capsule_nb as cpsl", UNCLOSED,
             "print(await unclosed.submit(session=session).result(60))",
             "print(await unclosed_in_a_process.submit(session=session).result(60))",
             "out = session.stream_reply()\nfor i in range(300):\n    out.write(f'{i},')"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]),
                   tmp_path / "unclosed.ipynb")
    saved = _outputs(run_notebook(tmp_path / "unclosed.ipynb", tmp_path / "store", cwd=tmp_path, timeout=120))
    assert saved[2:] == [[WHOLE, "ok\n"], [WHOLE, "ok\n"], [WHOLE]]
