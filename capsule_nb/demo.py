"""``capsule-nb demo``: the quickstart notebook, executed headless in a real kernel.

The notebook runs in an ipykernel of this very Python (nothing needs
``ipykernel install``, and another Python's ``python3`` kernelspec is never
picked up), with a fresh store, and the report says what every task run did.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .store import Store
from .ui.text import runs_text

NOTEBOOK = "quickstart.ipynb"


def kernel_classes() -> tuple[type, type]:
    """``(KernelManager, AsyncKernelManager)`` whose ``python3`` is ipykernel on ``sys.executable``.

    Nothing needs to be installed with ``ipykernel install``, and a ``python3``
    kernelspec of some other Python on the machine is never picked up.
    """
    from jupyter_client import AsyncKernelManager, KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from traitlets import default

    class ThisPythonKernelSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            if kernel_name in ("python3", "python"):
                from ipykernel.kernelspec import RESOURCES, get_kernel_dict

                return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    class ThisPythonKernelManager(KernelManager):
        @default("kernel_spec_manager")
        def _this_python_specs(self) -> KernelSpecManager:
            return ThisPythonKernelSpecs(data_dir=self.data_dir)

    class AsyncThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _this_python_specs(self) -> KernelSpecManager:
            return ThisPythonKernelSpecs(data_dir=self.data_dir)

    return ThisPythonKernelManager, AsyncThisPythonKernelManager


def kernel_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """This process's environment with the store at ``home``."""
    env = dict(os.environ)
    env["CAPSULE_NB_HOME"] = str(home)
    env.pop("JPY_SESSION_NAME", None)
    return env


def find_notebook(name: str = NOTEBOOK) -> Path:
    """The bundled notebook: inside the package (a wheel) or beside it (a checkout)."""
    packaged = resources.files("capsule_nb") / "notebooks" / name
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "notebooks" / name
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(f"{name} is neither in the capsule_nb package nor at {checkout}")


def run_notebook(path: str | os.PathLike[str], home: str | os.PathLike[str], *,
                 timeout: float = 120, cwd: str | os.PathLike[str] | None = None, stderr: Any = None) -> Any:
    """Execute the notebook at ``path`` in a new kernel whose store is ``home``.

    Returns the executed ``NotebookNode``; raises ``nbclient``'s
    ``CellExecutionError`` when a cell raises. ``stderr`` (a file) receives
    the kernel process's own stderr instead of this process's.
    """
    import nbformat
    from nbclient import NotebookClient

    _, async_manager = kernel_classes()
    nb = nbformat.read(os.fspath(path), as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=async_manager,
        resources={"metadata": {"path": os.fspath(cwd or home)}},
    )
    launch: dict[str, Any] = {"env": kernel_env(home)}
    if stderr is not None:
        launch["stderr"] = stderr
    client.execute(**launch)
    return nb


def _records(home: str | os.PathLike[str]) -> list[dict[str, Any]]:
    store = Store(home)
    try:
        return list(store.runs())
    finally:
        store.close()


def cmd_demo(args: argparse.Namespace) -> int:
    """``capsule-nb demo``: run a notebook headless, then report every task run it made."""
    try:
        path = Path(args.notebook) if args.notebook else find_notebook()
    except FileNotFoundError as exc:
        print(f"capsule-nb demo: {exc}", file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"capsule-nb demo: no notebook at {path}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="capsule-nb-demo-") as scratch:
        home = Path(args.home).resolve() if args.home else Path(scratch) / "store"
        print(f"running {path}")
        print(f"store   {home}" if args.home else "store   a temporary one, removed at the end (--home PATH keeps it)")
        started = time.monotonic()
        status, failure = 0, None
        kernel_log = Path(scratch) / "kernel.log"
        try:
            with open(kernel_log, "w") as log:
                nb = run_notebook(path, home, timeout=args.timeout, cwd=scratch, stderr=log)
        except Exception as exc:  # CellExecutionError, a dead kernel, a timeout
            status, failure, nb = 1, exc, None
        took = time.monotonic() - started
        if nb is not None and args.save:
            import nbformat

            nbformat.write(nb, args.save)
            print(f"saved   {args.save}")
        records = _records(home) if home.is_dir() else []
        counts: dict[str, int] = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        verdict = "ran" if failure is None else "FAILED"
        print(f"\nnotebook {verdict} in {took:.1f}s; {len(records)} task runs" + (f" ({summary})" if summary else ""))
        print()
        print(runs_text(records))
        if failure is not None:
            print(f"\nthe notebook raised:\n{failure}", file=sys.stderr)
            log_text = kernel_log.read_text(errors="replace").strip() if kernel_log.exists() else ""
            if log_text:
                print(f"\nkernel stderr:\n{log_text[-4000:]}", file=sys.stderr)
    return status
