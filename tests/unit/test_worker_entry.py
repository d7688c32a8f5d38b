"""The worker's entry points: --version, python -m worker, py.typed, and a torch-free worker.celery_app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_python_m_worker_is_llava_worker_and_answers_version() -> None:
    from worker.cli import package_version

    run = run_python("-m", "worker", "--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"llava-worker {package_version()}"
    assert package_version() != "unknown", "installed: the version comes from the package metadata"


def test_worker_ships_py_typed() -> None:
    assert (ROOT / "worker" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]\n", 1)[1].split("\n\n", 1)[0]
    assert 'worker = ["py.typed"]' in package_data.splitlines()


def test_celery_app_module_imports_no_torch_and_knows_llava_health() -> None:
    code = (
        "import sys, worker.celery_app as m; from celery.worker.control import Panel; "
        "print('torch' in sys.modules, 'llava_health' in Panel.meta, m.app.conf.worker_pool)"
    )
    run = run_python("-c", code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True", "threads"]
