"""The FastAPI example (examples/fastapi_app) with FastAPI's test client, a real Redis and a real tiny worker:
202 + poll, await job.wait, and NDJSON streamed as jobs finish (as_completed_async)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient

from producer import ClientSettings
from tests.integration.conftest import IMAGES, ROOT
from tests.integration.image_server import ImageServer

pytestmark = pytest.mark.integration


def example() -> ModuleType:
    """examples/fastapi_app/app.py, imported as the module ``fastapi_example``."""
    spec = importlib.util.spec_from_file_location(
        "fastapi_example", ROOT / "examples" / "fastapi_app" / "app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def queue(fetching_worker) -> str:
    return str(fetching_worker[2])


@pytest.fixture(scope="module")
def web(client_settings: ClientSettings, queue: str) -> Iterator[TestClient]:
    settings = client_settings.model_copy(update={"default_queue": queue, "max_image_bytes": 200_000})
    with TestClient(example().create_app(settings)) as test_client:
        yield test_client


def finished(web: TestClient, status_url: str) -> dict[str, Any]:
    """Poll the status endpoint until the job finished."""
    for _ in range(1200):
        body = web.get(status_url).json()
        if body["state"] != "PENDING":
            return body
        time.sleep(0.05)
    raise AssertionError(f"{status_url} still PENDING after 60 s")


def test_upload_caption_202_then_result(web: TestClient) -> None:
    with open(IMAGES / "stop_sign.jpg", "rb") as image:
        response = web.post("/jobs", data={"kind": "caption", "max_new_tokens": "3"}, files={"image": image})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["task"] == "llava.caption" and response.headers["location"] == body["status_url"]
    done = finished(web, body["status_url"])
    assert done["state"] == "SUCCESS" and done["job_id"] == body["job_id"]
    assert done["result"]["kind"] == "caption" and done["result"]["generated_tokens"] <= 3


def test_json_url_classify_and_a_failed_fetch(web: TestClient, image_server: ImageServer) -> None:
    job = {"kind": "classify", "url": image_server.url("/good.png"), "labels": ["cat", "dog"]}
    response = web.post("/jobs", json=job)
    assert response.status_code == 202, response.text
    done = finished(web, response.json()["status_url"])
    assert done["state"] == "SUCCESS" and done["result"]["label"] in ("cat", "dog")
    response = web.post("/jobs", json={"kind": "caption", "url": image_server.url("/status-500")})
    failed = finished(web, response.json()["status_url"])
    assert failed["state"] == "FAILURE" and failed["error"]["code"] == "fetch_failed"


def test_caption_awaits_the_job_without_blocking(web: TestClient) -> None:
    with open(IMAGES / "radar_chart.png", "rb") as image:
        response = web.post("/caption?wait=60", files={"image": image}, data={"prompt": "What is this?"})
    assert response.status_code == 200, response.text
    assert response.json()["result"]["kind"] == "caption"


def test_captions_stream_one_line_per_job_as_each_finishes(
    web: TestClient, image_server: ImageServer
) -> None:
    urls = [image_server.url("/good.png"), image_server.url("/status-500"), image_server.url("/good.png?2")]
    with web.stream("POST", "/captions", json={"urls": urls, "timeout": 60}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert sorted(line["url"] for line in lines) == sorted(urls)
    states = {line["url"]: line["state"] for line in lines}
    assert states[urls[1]] == "FAILURE" and states[urls[0]] == states[urls[2]] == "SUCCESS"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"json": {"kind": "poem", "url": "https://example.com/a.png"}}, 400, "invalid_request"),
        ({"json": {"kind": "caption", "url": "/etc/passwd"}}, 400, "invalid_request"),
        (
            {"json": {"kind": "vqa", "url": "https://example.com/a.png"}},
            400,
            "invalid_request",
        ),  # no question
        ({"json": ["not", "an", "object"]}, 400, "invalid_request"),
        ({"data": {"kind": "caption"}, "files": {"image": b"x" * 200_001}}, 413, "image_too_large"),
    ],
)
def test_bad_input_is_a_coded_400_or_413(
    web: TestClient, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = web.post("/jobs", **request_kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_the_example_imports_no_torch() -> None:
    """A web process needs only the producer (checked in a fresh interpreter)."""
    code = "import sys; sys.path.insert(0, 'examples/fastapi_app'); import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
