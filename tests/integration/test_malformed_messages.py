"""Malformed wire messages, sent as any Celery client (or a broken one) could: each ends in its coded error,
never a raw TypeError, an internal_error or a job that vanishes."""

from __future__ import annotations

import base64
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from producer import InvalidRequest, Job, LlavaClient
from producer.contract import TASK_CAPTION, TASK_CLASSIFY, TASK_VQA
from tests.integration.image_server import GOOD_PNG

PNG_URI = "data:image/png;base64," + base64.b64encode(GOOD_PNG).decode()
Send = Callable[[LlavaClient, str], Job[Any]]


def task(kwargs: dict[str, Any], args: tuple[Any, ...] = (), name: str = TASK_CAPTION) -> Send:
    def send(client: LlavaClient, queue: str) -> Job[Any]:
        return client.job(client.app.send_task(name, args=args, kwargs=kwargs, queue=queue).id)

    return send


def raw(body: bytes, content_type: str) -> Send:
    """A task message whose body cannot be decoded as JSON (headers as Celery writes them)."""

    def send(client: LlavaClient, queue: str) -> Job[Any]:
        job_id = str(uuid.uuid4())
        message = client.app.amqp.as_task_v2(job_id, TASK_CAPTION, kwargs={"request": {"image": PNG_URI}})
        with client.app.producer_or_acquire() as producer:
            producer.publish(
                body,
                routing_key=queue,
                exchange="",
                headers=message.headers,
                content_type=content_type,
                content_encoding="binary" if content_type != "application/json" else "utf-8",
                **message.properties,
            )
        return client.job(job_id, TASK_CAPTION)

    return send


CASES: dict[str, Send] = {
    "positional argument": task({}, args=({"image": PNG_URI},)),
    "extra keyword argument": task({"request": {"image": PNG_URI}, "debug": True}),
    "no request": task({}),
    "image placeholder in prompt": task({"request": {"image": PNG_URI, "prompt": "a <image> b"}}),
    "image placeholder in question": task(
        {"request": {"image": PNG_URI, "question": "<image>?"}}, name=TASK_VQA
    ),
    "image placeholder in a label": task(
        {"request": {"image": PNG_URI, "labels": ["cat", "<image>"]}}, name=TASK_CLASSIFY
    ),
    "max_new_tokens as a string": task(
        {"request": {"image": PNG_URI, "generation": {"max_new_tokens": "12"}}}
    ),
    "max_new_tokens as a boolean": task(
        {"request": {"image": PNG_URI, "generation": {"max_new_tokens": True}}}
    ),
    "temperature as a string": task({"request": {"image": PNG_URI, "generation": {"temperature": "0.5"}}}),
    "labels as a string": task({"request": {"image": PNG_URI, "labels": "cat,dog"}}, name=TASK_CLASSIFY),
    "unknown llava task": task({"request": {"image": PNG_URI}}, name="llava.captoin"),
    "pickle body": raw(
        pickle.dumps(((), {"request": {"image": PNG_URI}}, {})), "application/x-python-serialize"
    ),
    "body that is not JSON": raw(b"{this is not json", "application/json"),
}


@pytest.fixture(scope="module")
def outcomes(client: LlavaClient, shared_worker) -> dict[str, Exception | Any]:
    queue = shared_worker[2]
    jobs = {name: send(client, queue) for name, send in CASES.items()}
    results: dict[str, Exception | Any] = {}
    for name, job in jobs.items():
        try:
            results[name] = job.get(timeout=60)
        except Exception as error:  # the test checks which
            results[name] = error
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_message_ends_invalid_request(outcomes, name: str) -> None:
    outcome = outcomes[name]
    assert isinstance(outcome, InvalidRequest), f"{name}: {outcome!r}"


def test_the_worker_serves_good_jobs_after_them(client: LlavaClient, shared_worker, outcomes) -> None:
    _, hostname, queue = shared_worker
    assert client.caption(GOOD_PNG, queue=queue).get(timeout=30).worker == hostname


def test_the_client_refuses_placeholders_and_lax_types_before_sending(client: LlavaClient) -> None:
    with pytest.raises(InvalidRequest, match="image placeholder"):
        client.caption(GOOD_PNG, prompt="describe <image>")
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        client.caption(GOOD_PNG, max_new_tokens="12")
