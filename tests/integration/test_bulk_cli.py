"""Bulk tagging with ``llava-queue``: folders and URL lists, a bounded window, JSON lines, resume after a
crash, the summary, and the exit codes (0 all tagged, 1 any failed, 2 bad usage)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.cli import main
from tests.integration.conftest import IMAGES, health, wait_for, worker_env


@pytest.fixture
def env(client_settings, cache_dir) -> dict[str, str]:
    return worker_env(client_settings, cache_dir)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder tree: three images (one with an upper-case extension), a broken one, and a text file."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(IMAGES / "stop_sign.jpg", root / "a.jpg")
    shutil.copy(IMAGES / "radar_chart.png", root / "sub" / "b.PNG")
    shutil.copy(IMAGES / "transparent_logo.png", root / "sub" / "deeper" / "c.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after")
    (root / "notes.txt").write_text("not an image")
    return root


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def records(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per image (lines that are not JSON are skipped, as a resume does)."""
    last: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        last[record["image"]] = record
    return last


def jobs_done(client, node: str) -> int:
    info = health(client, node, timeout=5)
    return int(info["jobs_done"]) + int(info["jobs_failed"])


def test_folder_tagging_resumes_without_redoing_images(
    client, env, fetching_worker, photos, tmp_path
) -> None:
    _, node, queue = fetching_worker
    out = tmp_path / "tags.jsonl"
    args = ["classify", "--labels", "safe,nsfw,violence", str(photos), "--out", str(out), "--queue", queue]
    before = jobs_done(client, node)
    first = run_cli([*args, "--in-flight", "2"], env)
    assert first.returncode == 1, first.stderr  # bad.png failed permanently
    tagged = records(out)
    assert set(tagged) == {str(photos / p) for p in ("a.jpg", "sub/b.PNG", "sub/deeper/c.png", "bad.png")}
    assert tagged[str(photos / "bad.png")]["error"]["code"] == "invalid_image"
    good = [r for image, r in tagged.items() if not image.endswith("bad.png")]
    assert all(set(r["result"]["scores"]) == {"safe", "nsfw", "violence"} and r["job_id"] for r in good)
    assert "succeeded" in first.stderr and "invalid_image" in first.stderr
    assert first.stdout == ""  # records went to --out
    assert jobs_done(client, node) - before == 4

    # A crash: b.PNG never written, c.png failed with a transient error, the last line cut in half.
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [r for r in lines if r["image"].endswith(("a.jpg", "bad.png"))]
    retry = {"image": str(photos / "sub/deeper/c.png"), "error": {"code": "fetch_failed", "message": "503"}}
    out.write_text("".join(json.dumps(r) + "\n" for r in [*kept, retry]) + '{"image": "/x", "resu')
    before = jobs_done(client, node)
    second = run_cli(args, env)
    # b.PNG and c.png ran in the first run: their jobs' ids are derived from the output file, image, kind and
    # parameters, so the rerun finds their stored results instead of computing them again.
    assert jobs_done(client, node) == before
    assert second.returncode == 1  # bad.png is still failed (from the earlier run)
    assert "skipped: done earlier" in second.stderr and "failed earlier (invalid_image)" in second.stderr
    final = records(out)
    assert all("result" in final[str(photos / p)] for p in ("a.jpg", "sub/b.PNG", "sub/deeper/c.png"))
    assert '{"image": "/x", "resu\n' in out.read_text()  # the cut line stays a line of its own

    before = jobs_done(client, node)
    assert run_cli(args, env).returncode == 1
    assert jobs_done(client, node) == before  # nothing left to do


def test_url_list_with_vqa_and_transient_failures(env, fetching_worker, image_server, tmp_path) -> None:
    queue = fetching_worker[2]
    good, broken = image_server.url("/good.png"), image_server.url("/status-500")
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# images to check\n\n{good}\n  {IMAGES / 'stop_sign.jpg'}  \n{broken}\n{good}\n")
    out = tmp_path / "answers.jsonl"
    args = ["vqa", "--question", "What is it?", "--from-file", str(listing), "--out", str(out)]
    run = run_cli([*args, "--queue", queue, "--max-new-tokens", "2"], env)
    assert run.returncode == 1
    answers = records(out)
    assert set(answers) == {good, str(IMAGES / "stop_sign.jpg"), broken}  # the repeated URL ran once
    assert answers[good]["result"]["kind"] == "vqa"
    assert answers[broken]["error"]["code"] == "fetch_failed"
    assert "retried next run" in run.stderr


def test_all_succeeded_exits_zero_and_prints_to_stdout(env, fetching_worker, photos) -> None:
    queue = fetching_worker[2]
    (photos / "bad.png").unlink()
    run = run_cli(["caption", str(photos), "--queue", queue, "--json", "--max-new-tokens", "1"], env)
    assert run.returncode == 0, run.stderr
    printed = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(printed) == 3 and all(r["result"]["kind"] == "caption" for r in printed)


def test_each_kind_lists_only_its_own_options_and_the_version(capsys) -> None:
    for argv, says in (
        (["caption", "x.png", "--labels", "a,b"], "--labels"),
        (["--version"], "llava-queue "),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        output = capsys.readouterr()
        assert exited.value.code == (2 if "x.png" in argv else 0) and says in output.err + output.out
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    shown = capsys.readouterr().out
    assert "--prompt" in shown and "--question" not in shown and "--labels" not in shown


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["caption"], "give IMAGE arguments"),
        (["caption", "x.png", "--in-flight", "0"], "--in-flight"),
        (["caption", "--from-file", "/nonexistent/list.txt"], "cannot read the image list"),
        (["classify", "x.png", "--labels", "a,a"], "distinct"),
        (["caption", "x.png", "--priority", "12"], "priority"),
        (["caption", "x.png", "--max-new-tokens", "0"], "max_new_tokens"),
        (["caption", "x.png", "--timeout", "0"], "--timeout"),
        (["caption", "x.png", "--out", "/nonexistent/dir/tags.jsonl"], "cannot write the output file"),
    ],
)
def test_bad_usage_exits_two(argv, says, client_settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LLAVA_BROKER_URL", client_settings.broker_url)
    monkeypatch.setenv("LLAVA_RESULT_BACKEND", client_settings.result_backend)
    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_a_rerun_collects_jobs_that_finished_while_it_was_down(
    client, client_settings, env, photos, start_worker, tmp_path
) -> None:
    """Interrupted with its jobs queued (no worker yet), the CLI exits 130; a worker then runs them; the rerun
    with the same input and output collects their results without sending anything again."""
    (photos / "bad.png").unlink()
    queue = f"parked-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "tags.jsonl"
    args = [sys.executable, "-m", "producer.cli", "caption", str(photos), "--out", str(out), "--queue", queue]
    dumps = env | {"PYTHONFAULTHANDLER": "1"}  # SIGABRT prints every thread's stack (if it hangs below)
    first = subprocess.Popen([*args, "--max-new-tokens", "1"], env=dumps, stderr=subprocess.PIPE, text=True)
    broker = redis.Redis.from_url(client_settings.broker_url)
    try:
        queued = lambda: sum(broker.llen(key) for key in broker.scan_iter(match=f"{queue}*"))  # noqa: E731
        wait_for(lambda: queued() == 3, 60, "the three jobs queued")
    finally:
        broker.close()
    first.send_signal(signal.SIGINT)
    # communicate, not wait: its stderr is read meanwhile (a full pipe would block the CLI, not end it)
    try:
        stderr = first.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        first.send_signal(signal.SIGABRT)
        stacks = first.communicate(timeout=30)[1]
        raise AssertionError(f"interrupted, the CLI did not exit; its threads:\n{stacks[-6000:]}") from None
    code = first.returncode
    assert code == 130 and "rerun with the same --out" in stderr, (code, stderr[-2000:])
    assert not out.exists() or out.read_text() == ""  # nothing finished before the interruption

    _, node = start_worker(queue)
    wait_for(lambda: jobs_done(client, node) == 3, 120, "the worker to run the queued jobs")
    rerun = run_cli(
        ["caption", str(photos), "--out", str(out), "--queue", queue, "--max-new-tokens", "1"], env
    )
    assert rerun.returncode == 0, rerun.stderr
    assert jobs_done(client, node) == 3  # collected, not computed again
    tagged = records(out)
    assert len(tagged) == 3 and all(r["result"]["kind"] == "caption" for r in tagged.values())
