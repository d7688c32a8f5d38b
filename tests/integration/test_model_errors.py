"""A checkpoint that cannot be loaded stops the worker with one message naming it and saying what to do.

The offline hub id runs ``python -m worker`` as a subprocess (huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE when imported; it is the suite's check of the command's exit status); the others run the CLI
in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, TINY_CONFIG, WorkerCli

pytestmark = pytest.mark.integration

HUB_ID = "llava-hf/llava-v1.6-mistral-7b-hf"


def start_worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker`` on the tiny config with ``env``; it must exit before it reaches a broker."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LLAVA_", "HF_"))}
    environment.update(
        PYTHONPATH=str(ROOT),
        HF_HOME=str(tmp_path / "hf"),  # an empty cache
        LLAVA_BROKER_URL="redis://127.0.0.1:1/0",  # nothing listens: loading must fail first
        **env,
    )
    command = [sys.executable, "-m", "worker", "--config", str(TINY_CONFIG), "--hostname", "never@here"]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)


def test_offline_hub_id_missing_from_the_cache_names_it_and_the_fix(tmp_path: Path) -> None:
    run = start_worker(tmp_path, HF_HUB_OFFLINE="1", LLAVA_MODEL=HUB_ID, LLAVA_MODEL_REVISION="v1.2")
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert output.count("llava-worker: cannot start") == 1 and output.count(HUB_ID) == 2, (
        output
    )  # the model, the fix
    assert "revision v1.2" in output
    assert str(tmp_path / "hf" / "hub") in output, "the cache directory"
    assert "HF_HUB_OFFLINE=1" in output
    assert f"hf download {HUB_ID} --revision v1.2" in output
    assert "LLAVA_MODEL=/path/to/checkpoint" in output
    assert "Traceback" not in output


def test_missing_local_directory_is_named(worker_cli: WorkerCli, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "llava-next"
    status, output = worker_cli(LLAVA_MODEL=str(missing))
    assert status == 1, output
    assert output.count("llava-worker: cannot start") == 1 and output.count(str(missing)) == 1, output
    assert "does not exist" in output and "LLAVA_MODEL" in output
    assert "Repo id must be" not in output and "Traceback" not in output


def test_malformed_hub_id_is_refused_with_an_example(worker_cli: WorkerCli) -> None:
    status, output = worker_cli(LLAVA_MODEL="not a hub id!")
    assert status == 1, output
    assert output.count("llava-worker: cannot start") == 1 and "'not a hub id!'" in output
    assert "neither an existing directory nor a valid hub id" in output and HUB_ID in output


def test_tiny_checkpoint_still_loads_straight_to_its_device(tiny_checkpoint: Path) -> None:
    from worker.runtime import load_model
    from worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(tiny_checkpoint), model_revision="v9", device="cpu", dtype="float32")
    model, processor, source = load_model(settings)  # a revision is ignored for a local directory
    assert source == str(tiny_checkpoint)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert processor.tokenizer.padding_side == "left"
