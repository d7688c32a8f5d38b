"""The console scripts, run as subprocesses against the real queue."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.conftest import IMAGES, ROOT, worker_env


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_llava_queue_jobs_jsonl_and_exit_codes(client_settings, cache_dir, shared_worker, tmp_path) -> None:
    _, hostname, queue = shared_worker
    env = worker_env(client_settings, cache_dir)
    out = tmp_path / "tags.jsonl"
    images = [str(IMAGES / "stop_sign.jpg"), str(IMAGES / "radar_chart.png")]
    ok = run_cli(["classify", *images, "--labels", "sign,chart", "--queue", queue, "--out", str(out)], env)
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == images
    assert all(set(r["result"]["scores"]) == {"sign", "chart"} for r in records)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a but truncated")
    failed = run_cli(["caption", str(bad), str(IMAGES / "stop_sign.jpg"), "--queue", queue, "--json"], env)
    assert failed.returncode == 1
    lines = [json.loads(line) for line in failed.stdout.splitlines()]
    assert lines[0]["error"]["code"] == "invalid_image"
    assert lines[1]["result"]["worker"] == hostname

    status = run_cli(["status", "--json"], env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["workers"][hostname]["model"] == "tiny-llava-next"
    assert queue in report["queues"]


def test_llava_worker_refuses_flash_attention_on_cpu(client_settings, cache_dir, tiny_checkpoint) -> None:
    env = worker_env(client_settings, cache_dir, LLAVA_ATTN_IMPLEMENTATION="flash_attention_2")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--config", str(ROOT / "configs" / "tiny.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "flash_attention_2 needs a CUDA GPU" in result.stderr


def test_llava_worker_rejects_bad_settings(client_settings, cache_dir) -> None:
    env = worker_env(client_settings, cache_dir, LLAVA_CONCURRENCY="0")
    result = subprocess.run([sys.executable, "-m", "worker.cli"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "concurrency" in result.stderr
