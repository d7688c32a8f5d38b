"""For the whole suite: torch runs one thread per process (``OMP_NUM_THREADS=1``, inherited by the worker
processes the tests start), unless the environment says otherwise. The suite runs several pytest-xdist
processes and their workers on a few CPUs; a thread per CPU in each made them contend (measured on 2 CPUs:
``tests/integration/test_classify.py`` took 36 s of CPU with torch's default, 20 s with one thread)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list) -> None:
    """Test files marked ``long`` first (a stable sort keeps every file's own order): pytest-xdist, run with
    ``--dist loadfile --no-loadscope-reorder`` (``make test``), hands out files in this order, so the
    longest ones start at once rather than last, beside an idle process."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
