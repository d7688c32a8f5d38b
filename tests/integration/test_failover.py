"""Broker failover under load, and a worker that never dies quietly: a Redis primary, a replica and three
Sentinels on free loopback ports (devtools.sentinel), the primary SIGKILLed, then hung, while caption jobs
with inline images arrive (``make drill`` is the long version); a worker whose consumer cannot go on."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.devstack import RedisServer, WorkerProcess, make_tls_files
from devtools.drill import Drill
from tests.integration.conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)
OK_WITHIN_S = 10.0  # the bound: the worker serves from the new primary within this of the promotion


@pytest.fixture
def drill(tmp_path: Path, cache_dir: Path) -> Iterator[Drill]:
    drill = Drill(tmp_path, job_timeout=60.0, hang_s=8.0, fork=True)
    drill.start(LLAVA_CACHE_DIR=str(cache_dir))
    yield drill
    drill.stop()


@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_a_failover_under_load_loses_nothing(drill: Drill, kind: str) -> None:
    """Every job sent is answered with its caption (a send refused with a retryable error is sent again and
    counts once), the worker stays up, and it serves again within 10 s of the promotion."""
    report = drill.scenario(kind, jobs=24, rate=8.0, after=6)
    seen = f"{report}\n--- worker log\n{drill.worker.log_tail(80) if drill.worker else ''}"
    assert report.sent == 24 and report.lost == 0, seen
    assert report.codes == {"ok": 24}, seen
    assert report.worker_alive, seen
    assert report.promotion_to_answer_s is not None and report.promotion_to_answer_s <= OK_WITHIN_S, seen


def test_sentinel_over_tls_fails_over_without_loss(tmp_path: Path, cache_dir: Path) -> None:
    """Sentinels and servers that speak TLS only and ask for client certificates (LLAVA_SENTINEL_TLS*):
    jobs are served, and a kill of the primary loses none."""
    drill = Drill(tmp_path, job_timeout=60.0, fork=True, tls=make_tls_files(tmp_path / "tls"))
    try:
        drill.start(LLAVA_CACHE_DIR=str(cache_dir))
        report = drill.scenario("kill", jobs=12, rate=8.0, after=4)
    finally:
        drill.stop()
    assert report.sent == 12 and report.codes == {"ok": 12} and report.worker_alive, report


def test_a_worker_whose_consumer_cannot_go_on_exits_non_zero(tmp_path: Path, cache_dir: Path) -> None:
    """A broker the consumer cannot use (here an ACL user without BRPOP) ends Celery's worker with
    "Unrecoverable error": the process must exit non-zero, or no supervisor restarts it (it exited 0)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "nobrpop", "on", ">pw", "~*", "&*", "+@all", "-brpop")
        url = f"redis://nobrpop:pw@127.0.0.1:{server.port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLAVA_")}
        env |= {"LLAVA_BROKER_URL": f"{url}/0", "LLAVA_RESULT_BACKEND": f"{url}/1", "PYTHONPATH": str(ROOT)}
        env |= {"LLAVA_CACHE_DIR": str(cache_dir), "LLAVA_PEER_CHECK_TIMEOUT": "0.3"}
        args = ["--config", str(TINY_CONFIG), "--hostname", f"acl-{uuid.uuid4().hex[:6]}@test"]
        worker = WorkerProcess(args, env, tmp_path / "worker.log", fork=True).start()
        try:
            assert worker.process is not None
            status = worker.process.wait(timeout=60)
        finally:
            worker.stop(timeout=10)
        assert status != 0, worker.log_tail()
        assert "Unrecoverable error" in worker.log_tail(200)
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
