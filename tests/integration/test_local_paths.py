"""A local image path naming a FIFO under the worker's allowed root, sent as any Celery client could: the job
ends ``invalid_image`` at once (it once hung past its timeout, and held a warm shutdown), the worker goes on
serving, and its warm shutdown finishes."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from producer import InvalidImage, LlavaClient
from producer.contract import TASK_CAPTION
from tests.integration.conftest import IMAGES, StartWorker

pytestmark = pytest.mark.integration


def test_a_fifo_path_fails_its_job_at_once_and_the_worker_still_stops_warm(
    client: LlavaClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    shutil.copy(IMAGES / "stop_sign.jpg", tmp_path / "stop_sign.jpg")
    queue = f"it-{uuid.uuid4().hex[:8]}"
    worker, _ = start_worker(queue, LLAVA_LOCAL_IMAGE_ROOTS=str(tmp_path), LLAVA_JOB_TIMEOUT="5")

    sent = client.app.send_task(
        TASK_CAPTION, kwargs={"request": {"image": str(tmp_path / "pipe.png")}}, queue=queue
    )
    with pytest.raises(InvalidImage, match="not a regular file"):
        client.job(sent.id, TASK_CAPTION).get(timeout=60)
    good = client.app.send_task(
        TASK_CAPTION, kwargs={"request": {"image": str(tmp_path / "stop_sign.jpg")}}, queue=queue
    )
    assert client.job(good.id, TASK_CAPTION).get(timeout=60).generated_tokens >= 1
    assert worker.stop(signal.SIGTERM, timeout=30) == 0
