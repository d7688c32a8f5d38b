"""The layers, read from the source: the worker uses the producer only through its shared modules (the
contract, the errors, the Celery app and its settings, the Redis wire both sides run, the blob store, the
Redis memory policy), and the
producer imports neither the worker nor torch/transformers (``test_roundtrip`` also checks the latter on a
real import)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_MAY_IMPORT = {
    "producer.contract",
    "producer.errors",
    "producer.app",
    "producer.transport",
    "producer.sentinel",
    "producer.blobs",
    "producer.memory_policy",
}


def imported_modules(package: str) -> dict[str, set[str]]:
    """``{file: modules it imports}`` for every module of ``package``, imports inside functions included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module in ("producer", "worker"):  # from producer import contract: the submodules
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                else:
                    names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_worker_imports_only_the_producers_shared_modules() -> None:
    offenders = {
        path: sorted(
            name for name in names if name.split(".")[0] == "producer" and name not in WORKER_MAY_IMPORT
        )
        for path, names in imported_modules("worker").items()
    }
    assert not {path: names for path, names in offenders.items() if names}, offenders


def test_the_producer_imports_no_worker_torch_or_transformers() -> None:
    forbidden = {"worker", "torch", "transformers"}
    offenders = {
        path: sorted(name for name in names if name.split(".")[0] in forbidden)
        for path, names in imported_modules("producer").items()
    }
    assert not {path: names for path, names in offenders.items() if names}, offenders
