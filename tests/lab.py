"""A real JupyterLab (or Notebook 7, or Voilà) and a real Chromium for the browser
tests, the UI benchmark and the screenshots in docs/img.

``Lab`` starts ``jupyter lab`` (``app="notebook"``: ``jupyter notebook``, the
Notebook 7 interface) on 127.0.0.1 at a free port, with its own config,
runtime, settings and workspace folders in a temporary directory, no token
or password, JupyterLab's default settings (widget state is not saved unless
``save_widget_state=True``), and ``CAPSULE_NB_HOME`` pointing at a store of
its own. ``chromium()`` is the system Chromium (``/usr/bin/chromium``) under
Playwright; nothing is downloaded.

The one thing to know about driving JupyterLab: a Run All sent before the
kernel is connected and idle is silently lost, so ``open_notebook`` waits for
both (the REST API's execution state and the toolbar's status indicator).

``Voila`` serves one notebook as an app the same way. Each page load starts a
kernel that runs the notebook; ``stop()`` has Voilà shut its kernels down and
kills, by pid, any of them still alive after that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from .conftest import until_sync

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Errors that are JupyterLab's or Notebook 7's own, not the widgets': the debugger's state request
# cut short when a kernel goes; and Notebook 7 (7.6.5) loading its settings on a notebook page,
# which it does in a bare `jupyter notebook` with a notebook of `print(1)`.
NOT_OURS = re.compile(r"Could not restore the debugger state|^Cannot read properties of undefined \(reading 'schema'\)$")
# jupyter_server's kernel list asked while a kernel starts: "The 'last_activity' trait ... expected a
# datetime, not the NoneType None", a 500 (as jupyter-server/enterprise_gateway#1395 shows).
SERVERS_OWN = re.compile(r"/api/kernels\?\d+$")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent
DARK = "JupyterLab Dark"
LIGHT = "JupyterLab Light"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


class Lab:
    """``with Lab(tmp) as lab:`` a JupyterLab serving ``lab.root`` (notebooks copied there)."""

    def __init__(self, base: Path, *, theme: str = LIGHT, notebooks: tuple[str, ...] = ("widgets.ipynb",),
                 app: str = "lab", save_widget_state: bool = False):
        if app not in ("lab", "notebook"):
            raise ValueError(f"app is 'lab' or 'notebook', not {app!r}")
        self.app = app
        self.save_widget_state = save_widget_state
        self.base = Path(base)
        self.root = self.base / "root"
        self.home = self.base / "store"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.theme = theme
        self.notebooks = notebooks
        self.process: subprocess.Popen | None = None
        self.log_path = self.base / "lab.log"

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _settings(self) -> Path:
        settings = self.base / "settings"
        if self.save_widget_state:  # "Save Widget State Automatically", off by default
            _write_json(settings / "@jupyter-widgets/jupyterlab-manager/plugin.jupyterlab-settings", {"saveState": True})
        _write_json(settings / "@jupyterlab/apputils-extension/themes.jupyterlab-settings", {"theme": self.theme})
        _write_json(settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                    {"fetchNews": "false", "checkForUpdates": False})
        return settings

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in self.notebooks:
            shutil.copy(REPO / "notebooks" / name, self.root / name)
        env = dict(os.environ, CAPSULE_NB_HOME=str(self.home), JUPYTER_CONFIG_DIR=str(self.base / "config"),
                   JUPYTER_RUNTIME_DIR=str(self.base / "runtime"), PYTHONUNBUFFERED="1")
        env.pop("JPY_SESSION_NAME", None)
        app = "LabApp" if self.app == "lab" else "JupyterNotebookApp"
        command = [
            sys.executable, "-m", "jupyterlab" if self.app == "lab" else "notebook",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
            "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",
            "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={self.root}",
        ]
        # Notebook 7 reads settings through JupyterLab's server extension, loaded beside it.
        for each in {app, "LabApp"}:
            command += [f"--{each}.user_settings_dir={self._settings()}", f"--{each}.workspaces_dir={self.base / 'workspaces'}"]
        if self.app == "lab":
            command += ["--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("status")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not start; its log:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.api("shutdown", method="POST")  # shuts the kernels down with the server
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(5)

    def api(self, path: str, method: str = "GET") -> Any:
        body = b"" if method == "POST" else None
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method, data=body)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernel_id(self, notebook: str) -> str | None:
        for session in self.api("sessions"):
            if session.get("path") == notebook and session.get("kernel"):
                return session["kernel"]["id"]
        return None

    def kernel_state(self, notebook: str) -> str | None:
        """The execution state of the kernel of ``notebook``'s session (None: no session yet)."""
        kernel = self.kernel_id(notebook)
        with contextlib.suppress(urllib.error.HTTPError):  # shut down between the two requests
            return self.api(f"kernels/{kernel}")["execution_state"] if kernel else None
        return None

    def shut_down_kernels(self) -> None:
        """What the Running panel's "Shut Down All" does: every kernel, through the REST API."""
        for kernel in self.api("kernels"):
            self.api(f"kernels/{kernel['id']}", method="DELETE")


class Voila:
    """``with Voila(tmp) as voila:`` ``voila notebooks/<notebook>`` at ``voila.url``, with a store of its own."""

    def __init__(self, base: Path, *, notebook: str = "dashboard.ipynb", theme: str = "light"):
        self.base = Path(base)
        self.home = self.base / "store"
        self.notebook = REPO / "notebooks" / notebook
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.theme = theme
        self.process: subprocess.Popen | None = None
        self.log_path = self.base / "voila.log"

    def __enter__(self) -> "Voila":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        env = dict(os.environ, CAPSULE_NB_HOME=str(self.home), JUPYTER_CONFIG_DIR=str(self.base / "config"),
                   JUPYTER_RUNTIME_DIR=str(self.base / "runtime"), PYTHONUNBUFFERED="1")
        command = [
            sys.executable, "-m", "voila", str(self.notebook), "--no-browser", f"--theme={self.theme}",
            f"--Voila.port={self.port}", "--Voila.port_retries=0", "--Voila.ip=127.0.0.1",
            f"--Voila.connection_dir_root={self.base}",
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:  # a static file: the page itself would start a kernel
                urllib.request.urlopen(f"{self.url}voila/static/favicon.ico", timeout=5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Voilà did not start; its log:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.2)

    def kernels(self) -> dict[int, bytes]:
        """Voilà's kernel processes (pid -> command line): each is in a session of its own."""
        found = {}
        if self.process is not None:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                        found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        return found

    def stop(self) -> None:
        """SIGTERM: Voilà shuts its kernels down and exits; then any kernel still alive is killed."""
        kernels = self.kernels()
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        for pid, cmdline in kernels.items():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                    os.kill(pid, signal.SIGKILL)


def running(pids: Any) -> list[int]:
    """Which of ``pids`` still run (a zombie does not)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A page in the system Chromium, headless."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    return until_sync(predicate, timeout, interval, what)


def open_notebook(page: Any, lab: Lab, notebook: str = "widgets.ipynb", timeout: float = 60,
                  workspace: str | None = None) -> None:
    """Open ``notebook`` and return once its kernel is connected and idle. A JupyterLab
    ``workspace`` of its own keeps the page from reopening what other pages had open."""
    if lab.app == "notebook":
        page.goto(f"{lab.url}/notebooks/{notebook}")
    else:
        page.goto(f"{lab.url}/lab/{f'workspaces/{workspace}/' if workspace else ''}tree/{notebook}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
    wait_until(lambda: lab.kernel_state(notebook) == "idle", timeout, f"the kernel of {notebook} to be idle")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']:visible", timeout=timeout * 1000)


def run_all(page: Any) -> None:
    """Run > Run All Cells, through the menu as a user would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def save(page: Any) -> None:
    page.locator(".jp-Notebook").first.click()
    page.keyboard.press("Control+s")


def write_notebook(path: Path, *cells: str) -> None:
    """A notebook of code cells (the Python 3 kernel), for a test to open."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(cells=[new_code_cell(source) for source in cells],
                            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                     "language": "python"}})
    nbformat.write(notebook, path)


def restart_kernel(page: Any) -> None:
    """Kernel > Restart Kernel…, and Restart in the dialog, as a user would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Restart Kernel…").first.click()
    page.locator(".jp-Dialog .jp-mod-accept").click()


def fill_store(home: Path, n: int, statuses: tuple[str, ...] = ("completed",) * 7 + ("failed", "cancelled", "running"),
               ) -> Any:
    """An ``App`` on ``home`` whose store holds ``n`` more runs, written straight in (statuses in turn)."""
    import capsule_nb
    from capsule_nb.record import new_task_id

    app = capsule_nb.App(home=home)
    now = time.time()
    for i in range(n):
        status = statuses[i % len(statuses)]
        app.store.put_run({
            "task_id": new_task_id(), "app": app.name, "task_name": f"job_{i % 12}", "display_name": None,
            "status": status, "attempt": 1, "max_attempts": 2, "created_at": now, "started_at": now - 3,
            "completed_at": None if status == "running" else now, "session_id": f"session-{i % 3}",
            "messages": [], "output": [], "progress": {"done": i % 7, "total": 7, "message": None},
            "error": "ValueError: bad row" if status == "failed" else None,
            "result_repr": repr({"rows": i}) if status == "completed" else None,
        })
    app.store.flush()
    return app


def watch(page: Any, problems: list[str]) -> None:
    """Note every page error and console error of ``page`` in ``problems`` (but ``NOT_OURS``)."""
    page.on("pageerror", lambda error: NOT_OURS.search(str(error)) or problems.append(f"page error: {error}"))
    page.on("console", lambda m: m.type == "error" and not NOT_OURS.search(m.text)
            and not ("status of 500" in m.text and SERVERS_OWN.search(m.location.get("url", "")))
            and problems.append(f"console error: {m.text}"))


@contextlib.contextmanager
def screenshots_on_failure(page: Any, name: str, parts: dict[str, Any] | None = None) -> Iterator[None]:
    """On a failure, ``page`` (and each element of ``parts``: name -> locator) as PNGs in tests/artifacts/."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"{name}-page.png"), full_page=True)
            for part, locator in (parts or {}).items():
                for i, element in enumerate(locator.all()):
                    element.screenshot(path=str(ARTIFACTS / f"{name}-{part}{i}.png"))
        raise


def kernel_pid(lab: Lab, notebook: str) -> int:
    """The process of ``notebook``'s kernel (its command line names its connection file)."""
    marker = f"kernel-{lab.kernel_id(notebook)}.json".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in cmdline.read_bytes() and b"ipykernel" in cmdline.read_bytes():
                return int(cmdline.parent.name)
    raise LookupError(f"no kernel process for {notebook}")


# Every element of the widgets with text of its own: its text color against what is behind it,
# composited through every translucent layer (WCAG 2 contrast ratio).
CONTRAST = """root => {
  const parse = (text) => {
    const m = text.match(/^(?:rgba?|color)\\((?:srgb )?([^)]*)\\)$/);
    if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    const scale = text.startsWith("color(") ? 1 : 255;
    return [p[0] / scale, p[1] / scale, p[2] / scale, p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]);
  const behind = (node) => {
    const layers = [];
    for (let n = node; n; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c && c[3] > 0) layers.push(c);
      if (c && c[3] >= 1) break;
    }
    return layers.reverse().reduce((under, layer) => over(layer, under), [1, 1, 1, 1]);
  };
  const lum = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const found = [];
  for (const node of root.querySelectorAll(".cnb *")) {
    const own = [...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim());
    if (!own || !node.getClientRects().length || node.closest(":disabled, option")) continue;
    const back = behind(node);
    const text = over(parse(getComputedStyle(node).color), back);
    const [a, b] = [lum(text), lum(back)].sort((x, y) => y - x);
    found.push({ what: `${node.className || node.tagName}: ${node.textContent.trim().slice(0, 30)}`,
                 ratio: (a + 0.05) / (b + 0.05) });
  }
  return found;
}"""
