"""The console scripts, run as subprocesses against the real queue."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.conftest import IMAGES, WorkerCli, worker_env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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


def test_redis_down_is_one_line_and_exit_3(client_settings, cache_dir) -> None:
    from devtools.devstack import free_port

    dead = f"redis://127.0.0.1:{free_port()}"
    env = worker_env(client_settings, cache_dir, LLAVA_BROKER_TIMEOUT="2")
    env.update(LLAVA_BROKER_URL=f"{dead}/0", LLAVA_RESULT_BACKEND=f"{dead}/1")
    for args in (["caption", "https://images.example/cat.png"], ["status"]):
        result = run_cli(args, env, timeout=30)  # a generous bound on the wait (it took 19 s before)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("llava-queue: broker unavailable: ")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""


def test_one_refused_image_prints_its_line_only(client_settings, cache_dir, tmp_path) -> None:
    env = worker_env(client_settings, cache_dir)
    result = run_cli(["caption", str(tmp_path / "missing.png")], env)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{tmp_path / 'missing.png'}: ERROR invalid_request: cannot read image")
    assert "images/s" not in result.stderr and "outcome" not in result.stderr  # no summary table for one
    version = subprocess.run(
        [sys.executable, "-m", "producer", "--version"], env=env, capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("llava-queue ")


def test_llava_worker_refuses_flash_attention_on_cpu(worker_cli: WorkerCli, tiny_checkpoint) -> None:
    status, output = worker_cli(LLAVA_ATTN_IMPLEMENTATION="flash_attention_2")
    assert status == 1
    assert "flash_attention_2 needs a CUDA GPU" in output


def test_llava_worker_rejects_bad_settings(worker_cli: WorkerCli) -> None:
    status, output = worker_cli(LLAVA_CONCURRENCY="0")
    assert status == 2
    assert "llava-worker: invalid settings: LLAVA_CONCURRENCY: Input should be greater than" in output
