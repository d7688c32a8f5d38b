"""Every Python snippet of the README and of docs/ runs as shown, from the repository root, against a real
Redis and a real tiny worker (the reader's `make demo` stack). Fragments of the reader's own code are fenced
```python {.norun}``` and only parsed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from producer.settings import ClientSettings
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [(info.strip(), code) for page in PAGES for info, code in FENCE.findall(page.read_text())]
RUNNABLE = [code for info, code in SNIPPETS if info != "{.norun}"]


def test_every_python_snippet_parses_and_most_run() -> None:
    assert {info for info, _ in SNIPPETS} <= {"", "{.norun}"}, "unknown fence info"
    for _, code in SNIPPETS:
        ast.parse(code)
    assert len(RUNNABLE) >= 2


@pytest.fixture(scope="module")
def queue(fetching_worker) -> str:
    return str(fetching_worker[2])


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_snippet_runs(index: int, queue: str, client_settings: ClientSettings) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "LLAVA_BROKER_URL": client_settings.broker_url,
        "LLAVA_RESULT_BACKEND": client_settings.result_backend,
        "LLAVA_DEFAULT_QUEUE": queue,  # the snippet's LlavaClient() sends where the test worker listens
    }
    run = subprocess.run(
        [sys.executable, "-c", RUNNABLE[index]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"snippet {index} failed:\n{RUNNABLE[index]}\n{run.stderr}"
    assert run.stdout.strip(), "every runnable snippet prints what it got"
