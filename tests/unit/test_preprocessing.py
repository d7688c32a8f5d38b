"""The preprocessing pool's default size: the rule the README's settings table states."""

from __future__ import annotations

import pytest

from worker.runtime.preprocessing import default_workers


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 1), (4, 2), (6, 4), (16, 4), (128, 4)])
def test_no_pool_on_two_cores_or_fewer_else_up_to_four_leaving_two_cores(cores: int, workers: int) -> None:
    assert default_workers(cores) == workers
