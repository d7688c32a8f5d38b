"""The GPU launcher's pure parts: which GPUs, restart backoff, child arguments."""

from __future__ import annotations

import pytest

from worker.cli import _without
from worker.launcher import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    LaunchError,
    child_env,
    discover_gpus,
    next_backoff,
    select_gpus,
)


def test_gpus_from_cuda_visible_devices() -> None:
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert select_gpus("all", {"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]


def test_explicit_none_and_missing_gpus() -> None:
    assert select_gpus("0,2") == ["0", "2"]
    assert select_gpus("none") == []
    with pytest.raises(LaunchError, match="no GPU found"):
        select_gpus("all", {"CUDA_VISIBLE_DEVICES": ""})


def test_backoff_doubles_caps_and_resets_after_a_stable_run() -> None:
    assert next_backoff(0, 0) == BACKOFF_FIRST_S
    assert next_backoff(2.0, 1.0) == 4.0
    assert next_backoff(BACKOFF_MAX_S, 1.0) == BACKOFF_MAX_S
    assert next_backoff(32.0, 3600.0) == BACKOFF_FIRST_S


def test_children_get_the_parents_arguments_without_gpus_or_hostname() -> None:
    argv = ["--config", "c.yaml", "--gpus", "0,1", "--hostname=x@h", "--device", "cpu"]
    assert _without(argv, "--gpus", "--hostname") == ["--config", "c.yaml", "--device", "cpu"]


def test_each_child_gets_its_gpu_and_its_own_metrics_port() -> None:
    parent = {"LLAVA_GPUS": "all", "LLAVA_METRICS_PORT": "9100", "PATH": "/bin"}
    env = child_env("2", 9100, parent)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["LLAVA_METRICS_PORT"] == "9102"
    assert "LLAVA_GPUS" not in env and env["PATH"] == "/bin"
    assert "LLAVA_METRICS_PORT" not in child_env("0", None, {"PATH": "/bin"})
