"""Caption, VQA and classify through a real redis-server to a real worker on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from producer import CaptionResult, ClassifyResult, InvalidImage, LlavaClient, VQAResult
from producer.status import worker_health
from tests.integration.conftest import IMAGES, ROOT


def test_caption_vqa_classify_round_trip(client: LlavaClient, shared_worker) -> None:
    _, hostname, queue = shared_worker
    caption = client.caption(IMAGES / "radar_chart.png", queue=queue).get()
    vqa = client.vqa((IMAGES / "stop_sign.jpg").read_bytes(), "What does the sign say?", queue=queue).get()
    labels = ["logo", "chart", "street sign"]
    classify = client.classify(IMAGES / "transparent_logo.png", labels=labels, queue=queue).get()
    free = client.classify(IMAGES / "stop_sign.jpg", queue=queue, max_new_tokens=5).get()

    assert isinstance(caption, CaptionResult) and caption.text
    assert isinstance(vqa, VQAResult) and vqa.text
    for result in (caption, vqa, classify, free):
        assert result.worker == hostname
        assert result.model == "tiny-llava-next"
        assert 0 < result.image_tokens < result.prompt_tokens
        assert result.timings.total_ms >= result.timings.inference_ms > 0
    assert 1 <= caption.generated_tokens <= 24  # configs/tiny.yaml: max_new_tokens 24
    assert isinstance(classify, ClassifyResult)
    assert list(classify.scores or {}) == labels
    assert sum((classify.scores or {}).values()) == pytest.approx(1.0)
    assert classify.label == max(classify.scores or {}, key=(classify.scores or {}).__getitem__)
    assert classify.generated_tokens == 0
    assert free.scores is None and 1 <= free.generated_tokens <= 5


def test_same_request_twice_gives_same_text(client: LlavaClient, shared_worker) -> None:
    queue = shared_worker[2]
    first = client.vqa(IMAGES / "stop_sign.jpg", "What colour is the sign?", queue=queue)
    second = client.vqa(IMAGES / "stop_sign.jpg", "What colour is the sign?", queue=queue)
    assert first.id != second.id
    assert first.get().text == second.get().text


def test_model_loaded_once_after_ten_jobs(client: LlavaClient, shared_worker) -> None:
    _, hostname, queue = shared_worker
    jobs = [client.caption(IMAGES / "radar_chart.png", queue=queue, max_new_tokens=2) for _ in range(10)]
    assert all(job.get().worker == hostname for job in jobs)
    health = worker_health(client.app)[hostname]
    assert health["loads"] == 1
    assert health["model_loaded"] is True
    assert health["jobs_done"] >= 10


def test_undecodable_bytes_raise_invalid_image_and_worker_goes_on(client: LlavaClient, shared_worker) -> None:
    queue = shared_worker[2]
    bad = client.caption(b"<html>this is not an image</html>", queue=queue)
    with pytest.raises(InvalidImage) as error:
        bad.get()
    assert error.value.code == "invalid_image"
    assert "not a recognised image format" in error.value.message
    assert bad.state == "FAILURE"
    assert client.caption(IMAGES / "stop_sign.jpg", queue=queue).get().text


def test_job_enqueued_before_any_worker_is_answered(client: LlavaClient, start_worker) -> None:
    queue = f"late-{uuid.uuid4().hex[:8]}"
    job = client.caption(IMAGES / "stop_sign.jpg", queue=queue)
    assert job.state == "PENDING"
    _, hostname = start_worker(queue)
    assert job.get().worker == hostname


BARE_CLIENT = textwrap.dedent(
    """
    import base64, json, sys
    from celery import Celery

    broker, backend, queue, path = sys.argv[1:5]
    app = Celery(broker=broker, backend=backend)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    image = "data:image/jpeg;base64," + base64.b64encode(open(path, "rb").read()).decode()
    request = {"image": image, "prompt": "Describe the picture.", "generation": {"max_new_tokens": 4}}
    result = app.send_task("llava.caption", kwargs={"request": request}, queue=queue).get(timeout=60)
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("producer", "worker", "torch"))
    print(json.dumps({"result": result, "imported": ours}))
    """
)


def test_bare_celery_client_uses_the_json_wire_form(
    client: LlavaClient, client_settings, shared_worker
) -> None:
    _, hostname, queue = shared_worker
    args = [client_settings.broker_url, client_settings.result_backend, queue, str(IMAGES / "stop_sign.jpg")]
    output = subprocess.run(
        [sys.executable, "-c", BARE_CLIENT, *args], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert output.returncode == 0, output.stderr
    reply = json.loads(output.stdout.strip().splitlines()[-1])
    assert reply["imported"] == []
    result = CaptionResult.model_validate(reply["result"])
    assert result.worker == hostname and 1 <= result.generated_tokens <= 4  # model_validate: a caption


def test_producer_import_pulls_in_no_torch_transformers_or_worker() -> None:
    heavy = ("torch", "transformers", "worker", "PIL")
    code = f"import sys, producer; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "[]"
