"""The Django example (examples/django_app) with Django's test client, a real Redis and a real tiny worker:
enqueue (upload or URL) -> 202 with the job id -> poll the status view until SUCCESS or FAILURE."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.conftest import IMAGES, ROOT

SITE = ROOT / "examples" / "django_app"


@pytest.fixture(scope="module")
def django_site() -> Iterator[None]:
    """The example's settings, loaded in this process; DJANGO_SETTINGS_MODULE is not left in the environment
    (worker subprocesses inherit it, and Celery's Django fix-up would then look for the site)."""
    sys.path.insert(0, str(SITE))
    os.environ["DJANGO_SETTINGS_MODULE"] = "llava_site.settings"
    import django
    from django.test.utils import setup_test_environment, teardown_test_environment

    try:
        django.setup()
    finally:
        del os.environ["DJANGO_SETTINGS_MODULE"]
    setup_test_environment()
    yield
    teardown_test_environment()
    sys.path.remove(str(SITE))


@pytest.fixture(scope="module")
def queue(fetching_worker) -> str:
    return str(fetching_worker[2])


@pytest.fixture
def web(django_site, client_settings, queue) -> Iterator[Any]:
    from django.test import Client, override_settings

    llava = {
        "broker_url": client_settings.broker_url,
        "result_backend": client_settings.result_backend,
        "default_queue": queue,
    }
    with override_settings(LLAVA=llava):
        yield Client()


def finished(web: Any, status_url: str) -> dict[str, Any]:
    """Poll the status view (as a browser or another service would) until the job finished."""
    for _ in range(1200):
        body = web.get(status_url).json()
        if body["state"] != "PENDING":
            return body
        time.sleep(0.05)
    raise AssertionError(f"{status_url} still PENDING after 60 s")


def test_upload_caption_202_then_result(web) -> None:
    with open(IMAGES / "stop_sign.jpg", "rb") as image:
        response = web.post("/jobs/", {"kind": "caption", "image": image, "max_new_tokens": "3"})
    assert response.status_code == 202
    body = response.json()
    assert body["task"] == "llava.caption" and response["Location"] == f"/jobs/{body['job_id']}/"
    assert body["status_url"] == f"http://testserver/jobs/{body['job_id']}/"
    done = finished(web, body["status_url"])
    assert done["state"] == "SUCCESS" and done["job_id"] == body["job_id"]
    assert done["result"]["kind"] == "caption" and done["result"]["generated_tokens"] <= 3


def test_url_classify_and_vqa(web, image_server) -> None:
    url = image_server.url("/good.png")
    request = {"kind": "classify", "url": url, "labels": ["sign", "chart"]}
    classify = web.post("/jobs/", json.dumps(request), content_type="application/json")
    vqa = web.post("/jobs/", {"kind": "vqa", "url": url, "question": "What is it?", "max_new_tokens": "2"})
    assert classify.status_code == vqa.status_code == 202
    scored = finished(web, classify.json()["status_url"])
    assert set(scored["result"]["scores"]) == {"sign", "chart"}
    assert finished(web, vqa.json()["status_url"])["result"]["kind"] == "vqa"


def test_failed_job_reports_its_code(web) -> None:
    response = web.post("/jobs/", {"kind": "caption", "image": _upload(b"GIF89a truncated", "bad.gif")})
    assert response.status_code == 202
    done = finished(web, response.json()["status_url"])
    assert done["state"] == "FAILURE" and done["error"]["code"] == "invalid_image"
    assert web.get(f"/jobs/{uuid.uuid4()}/").json()["state"] == "PENDING"  # unknown ids look queued


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"kind": "vqa", "url": "http://127.0.0.1/x.png"}, 400, "invalid_request"),  # no question
        ({"kind": "sculpt", "url": "http://127.0.0.1/x.png"}, 400, "invalid_request"),
        ({"kind": "caption"}, 400, "invalid_request"),  # no image at all
        ({"kind": "caption", "url": "/etc/hostname"}, 400, "invalid_request"),  # never a server path
        ({"kind": "caption", "url": "file:///etc/hostname"}, 400, "invalid_request"),
        ({"kind": "classify", "url": "http://127.0.0.1/x.png", "labels": "a,a"}, 400, "invalid_request"),
        (
            {"kind": "caption", "url": "http://127.0.0.1/x.png", "max_new_tokens": "many"},
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_requests_get_coded_errors(web, form, status, code) -> None:
    response = web.post("/jobs/", form)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_upload_limits_and_methods(web, client_settings, queue) -> None:
    from django.test import override_settings

    both = web.post("/jobs/", {"kind": "caption", "url": "http://127.0.0.1/x.png", "image": _upload(b"x")})
    assert both.status_code == 400
    assert web.post("/jobs/", "[1]", content_type="application/json").status_code == 400
    assert web.get("/jobs/").status_code == 405
    small = {
        "broker_url": client_settings.broker_url,
        "result_backend": client_settings.result_backend,
        "default_queue": queue,
        "max_image_bytes": 1024,
    }
    with override_settings(LLAVA=small):
        big = web.post("/jobs/", {"kind": "caption", "image": _upload(b"\x89PNG" + b"\0" * 4096)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_large"


@pytest.mark.parametrize("down", ["dead port", "hung server"])
def test_redis_down_is_503_within_the_broker_timeout(web, queue, down) -> None:
    from django.test import override_settings

    from devtools.devstack import free_port
    from tests.integration.test_broker_down import BOUND, BROKER_TIMEOUT, failure_within, hung_redis

    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(hung_redis()) if down == "hung server" else f"redis://127.0.0.1:{free_port()}"
        )
        llava = {"broker_url": f"{url}/0", "result_backend": f"{url}/1", "default_queue": queue}
        stack.enter_context(override_settings(LLAVA={**llava, "broker_timeout": BROKER_TIMEOUT}))
        requests: dict[str, Callable[[], Any]] = {
            "url": lambda: web.post("/jobs/", {"kind": "caption", "url": "http://127.0.0.1/x.png"}),
            "upload": lambda: web.post(
                "/jobs/", {"kind": "caption", "image": _upload((IMAGES / "stop_sign.jpg").read_bytes())}
            ),
            "status": lambda: web.get(f"/jobs/{uuid.uuid4()}/"),
        }
        answers: dict[str, Any] = {}
        for name, request in requests.items():
            answer = functools.partial(lambda key, send: answers.update({key: send()}), name, request)
            assert failure_within(BOUND, answer) is None, name
    for name, response in answers.items():
        assert response.status_code == 503, name
        assert response.json()["error"]["code"] == "broker_unavailable"


def test_the_site_imports_no_torch() -> None:
    code = (
        "import os, sys, django; os.environ['DJANGO_SETTINGS_MODULE'] = 'llava_site.settings'; "
        "django.setup(); "
        "import jobs.views, llava_site.urls; "
        "print(sorted(m for m in ('torch', 'transformers', 'worker', 'PIL') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=SITE,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{ROOT}"},
    )
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "[]"


def _upload(data: bytes, name: str = "image.png") -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="application/octet-stream")
