"""The real-kernel tests again, under ipykernel 6.29 (output routing of threads differs from 7.x).

The suite's own environment has ipykernel 7; this builds a second virtual
environment with ipykernel 6.29.x and runs the kernel-facing tests there.
"""

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_kernel_tests_pass_under_ipykernel_6_29(tmp_path):
    if os.environ.get("CAPSULE_NB_IPYKERNEL6") == "skip":
        pytest.skip("CAPSULE_NB_IPYKERNEL6=skip")
    env_dir = tmp_path / "ipykernel6"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]", "ipykernel==6.29.5"],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run([python, "-c", "import ipykernel; print(ipykernel.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("6.29"), version
    tests = ["tests/test_kernel.py", "tests/test_kernel_crash.py", "tests/test_notebooks.py"]
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
