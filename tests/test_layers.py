"""The house rules of the package, checked on its source and in fresh interpreters.

* ``engine/``, ``workers/`` and ``store/`` never import ``app``, ``session``,
  ``notebook`` or ``ui`` (not even for type checking): data flows one way.
* ``import capsule_nb`` changes nothing in ``multiprocessing`` or ``copyreg``.
* No module of the package is much over 500 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "capsule_nb"
LOWER = ("engine", "workers", "store")
UPPER = ("app", "session", "notebook", "ui")


def _imports(path: Path) -> list[str]:
    """The capsule_nb modules ``path`` imports, as dotted names relative to the package."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    package = module[:-1] if module[-1] != "__init__" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [[*target, alias.name] for alias in node.names]
                found += [".".join(target)] + [".".join(n) for n in names]
            elif node.module and node.module.split(".")[0] == "capsule_nb":
                found.append(".".join(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found += [".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "capsule_nb"]
    return found


def test_the_lower_layers_never_import_the_upper_ones():
    broken = []
    for layer in LOWER:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for name in _imports(path):
                if name.split(".")[0] in UPPER:
                    broken.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not broken, "engine/, workers/ and store/ must not import app, session, notebook or ui:\n" + "\n".join(broken)


def test_the_rule_checker_sees_an_upward_import(tmp_path):
    """The check above would fail on a module that breaks the rule (relative, absolute, nested)."""
    bad = PACKAGE / "engine" / "_layer_probe.py"
    bad.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from ..session import Session\n"
                   "def f():\n    from capsule_nb.ui import text\n    from .. import app\n")
    try:
        assert {"session", "ui", "app"} <= {n.split(".")[0] for n in _imports(bad)}
        with pytest.raises(AssertionError, match="_layer_probe.py imports"):
            test_the_lower_layers_never_import_the_upper_ones()
    finally:
        bad.unlink()


def test_importing_the_package_patches_nothing():
    script = textwrap.dedent(
        """
        import copyreg, multiprocessing.spawn, multiprocessing.util
        before = (multiprocessing.spawn.get_preparation_data, dict(copyreg.dispatch_table),
                  len(multiprocessing.util._finalizer_registry))
        import capsule_nb, capsule_nb.workers.pool, capsule_nb.workers.child, capsule_nb.workers.dask
        after = (multiprocessing.spawn.get_preparation_data, dict(copyreg.dispatch_table),
                 len(multiprocessing.util._finalizer_registry))
        assert before == after, (before, after)
        print("unchanged")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "unchanged", out.stderr


def test_an_app_without_process_tasks_never_loads_the_worker_processes_layer():
    """Closing an app (at exit, at a kernel shutdown) stops worker processes only where some
    were started: closing once loaded the Dask back end and the forkserver just to say
    "no cluster", and a kernel's shutdown then stopped multiprocessing's helpers besides."""
    script = textwrap.dedent(
        """
        import sys, tempfile
        import capsule_nb as cpsl
        app = cpsl.App(home=tempfile.mkdtemp() + "/store", executor="immediate")
        app.task(lambda: 1, name="one").submit()
        app.close()
        print(sorted(m for m in ("capsule_nb.workers.pool", "capsule_nb.workers.forkserver",
                                 "capsule_nb.workers.dask") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_modules_stay_small():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > 520}, sizes
