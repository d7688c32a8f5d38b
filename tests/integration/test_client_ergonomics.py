"""LlavaClient for web backends: handles rebuilt from an id, map / as_completed, asyncio, link callbacks, and
result subscriptions released after many jobs (a long-lived web process must not grow)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from kombu import Connection

from producer import (
    CaptionResult,
    ClassifyResult,
    InvalidImage,
    InvalidRequest,
    LlavaClient,
    LlavaError,
    ResultTimeout,
)
from tests.integration.conftest import IMAGES

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

STOP_SIGN = IMAGES / "stop_sign.jpg"
RADAR = IMAGES / "radar_chart.png"
BAD = b"GIF89a but truncated"


@pytest.fixture(scope="module")
def queue(shared_worker: tuple[Any, str, str]) -> str:
    return shared_worker[2]


@pytest.fixture
def fresh(client_settings) -> Any:
    """A client of its own, so its subscription book-keeping starts empty."""
    llava = LlavaClient(client_settings)
    yield llava
    llava.close()


def book(llava: LlavaClient, jobs: list[Any]) -> dict[str, int]:
    """What the process and Redis hold for result delivery: subscribed channels and waiting handles in
    this client, buffered result messages, and subscribers Redis counts on these jobs' channels."""
    backend = llava.app.backend
    concrete, weak = backend._pending_results
    keys = [backend.get_key_for_task(job.id).decode() for job in jobs]
    redis_side = sum(count for _, count in backend.client.pubsub_numsub(*keys)) if keys else 0
    return {
        "subscribed": len(backend.result_consumer.subscribed_to),
        "waiting": len(concrete) + len(weak),
        "buffered": backend._pending_messages.total,
        "redis_subscribers": redis_side,
    }


def test_handle_rebuilt_from_the_id_alone(client, fresh, queue) -> None:
    caption = client.caption(STOP_SIGN, queue=queue, max_new_tokens=2)
    classify = client.classify(RADAR, ["sign", "chart"], queue=queue)
    failed = client.caption(BAD, queue=queue)
    caption.get(60), classify.get(60)
    with pytest.raises(InvalidImage):
        failed.get(60)

    # another process (here: another client) knows only the ids
    assert isinstance(fresh.job(caption.id).get(5), CaptionResult)
    rebuilt = fresh.job(classify.id)
    assert rebuilt.task_name is None and rebuilt.state == "SUCCESS"
    assert set(rebuilt.get(5).scores or {}) == {"sign", "chart"}
    assert fresh.job(classify.id, "llava.classify").get(5).label in {"sign", "chart"}
    with pytest.raises(InvalidImage) as error:
        fresh.job(failed.id).get(5)
    assert error.value.code == "invalid_image"
    assert fresh.job(str(uuid.uuid4())).state == "PENDING"  # Celery cannot tell unknown from queued
    for bad_id, task in (("", None), ("x", "llava.nope")):
        with pytest.raises(InvalidRequest):
            fresh.job(bad_id, task)


def test_map_and_as_completed(client, queue) -> None:
    images = [STOP_SIGN, RADAR, BAD, STOP_SIGN.read_bytes()]
    jobs = client.map("classify", images, labels=["sign", "chart"], queue=queue)
    assert [job.task_name for job in jobs] == ["llava.classify"] * 4
    outcomes: dict[str, Any] = {}
    for job in client.as_completed(jobs, timeout=60):
        try:
            outcomes[job.id] = job.get(0)
        except LlavaError as exc:
            outcomes[job.id] = exc.code
    assert set(outcomes) == {job.id for job in jobs}
    assert outcomes[jobs[2].id] == "invalid_image"
    assert all(isinstance(outcomes[job.id], ClassifyResult) for job in jobs if job is not jobs[2])
    assert list(client.as_completed([])) == []


@pytest.mark.parametrize(
    ("kind", "params", "wrong"),
    [
        ("vqa", {}, "question"),
        ("nope", {}, "unknown job kind"),
        ("caption", {"job_id": "same-for-all"}, "job_id"),
        ("caption", {"colour": "red"}, "unknown argument"),
    ],
)
def test_map_refuses_bad_input_with_typed_errors(client, queue, kind, params, wrong) -> None:
    with pytest.raises(InvalidRequest, match=wrong):
        client.map(kind, [STOP_SIGN], queue=queue, **params)


def test_a_str_that_is_not_a_url_is_never_read_as_a_file(client, queue) -> None:
    with pytest.raises(InvalidRequest, match=r"pass a pathlib\.Path"):
        client.caption(str(STOP_SIGN), queue=queue)  # a path sent as a str (e.g. from a web form)
    assert client.caption(STOP_SIGN, queue=queue, max_new_tokens=2).get().kind == "caption"


def test_a_failed_job_id_sent_again_waits_for_its_new_run(client, queue) -> None:
    job_id = f"again-{uuid.uuid4().hex[:8]}"
    with pytest.raises(LlavaError, match="invalid_image"):
        client.caption(BAD, queue=queue, job_id=job_id).get()
    again = client.caption(STOP_SIGN, queue=queue, job_id=job_id, max_new_tokens=2)
    assert again.id == job_id and again.get().kind == "caption"  # not the stored failure of the first run


def test_a_failed_job_sent_again_never_takes_a_late_message_of_its_first_run(fresh) -> None:
    """The first run's failure was published while the client was subscribed, and the client unsubscribed
    before reading that message (its get() found the failure stored): the message stays in the socket, ahead
    of the UNSUBSCRIBE reply. Sent again under the same id, the job waits for its new run (parked here: no
    worker consumes the queue) instead of resolving with that late message."""
    job_id = f"late-{uuid.uuid4().hex[:8]}"
    first = fresh.job(job_id, "llava.caption")
    backend = fresh.app.backend
    backend.add_pending_result(first.async_result)  # subscribed, as a waiting get() is
    backend.store_result(job_id, InvalidImage("cannot decode image"), "FAILURE")  # stored and published
    first.release()  # unsubscribed: the published message is still unread
    again = fresh.caption(STOP_SIGN, queue=f"parked-{job_id}", job_id=job_id, max_new_tokens=2)
    with pytest.raises(ResultTimeout):
        again.get(timeout=1)
    assert again.state == "PENDING"


def test_as_completed_timeout_releases_unfinished_jobs(fresh) -> None:
    parked = f"parked-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    jobs = fresh.map("caption", [STOP_SIGN, RADAR], queue=parked)
    with pytest.raises(ResultTimeout, match="2 job"):
        list(fresh.as_completed(jobs, timeout=0.3))
    with pytest.raises(ResultTimeout):
        jobs[0].get(timeout=0.1)
    assert book(fresh, jobs) == {"subscribed": 0, "waiting": 0, "buffered": 0, "redis_subscribers": 0}


def test_await_wait_keeps_the_event_loop_running(client, fresh, queue) -> None:
    job_id = f"async-{uuid.uuid4().hex}"

    async def scenario() -> tuple[CaptionResult, list[str]]:
        waiting = asyncio.create_task(fresh.job(job_id).wait(60))  # the job is not even sent yet
        channel = fresh.app.backend.get_key_for_task(job_id)
        deadline = time.monotonic() + 30
        while not sum(count for _, count in fresh.app.backend.client.pubsub_numsub(channel)):
            assert time.monotonic() < deadline, "wait() never subscribed to the job's result"
            await asyncio.sleep(0.05)  # the loop runs while wait() waits
        assert not waiting.done()
        client.caption(RADAR, queue=queue, job_id=job_id)
        result = await waiting
        many = client.map("caption", [STOP_SIGN, RADAR, STOP_SIGN], queue=queue, max_new_tokens=1)
        seen = [job.id async for job in client.as_completed_async(many, timeout=60)]
        assert sorted(seen) == sorted(job.id for job in many)
        with pytest.raises(ResultTimeout):
            await fresh.job(str(uuid.uuid4())).wait(0.2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fresh.job(str(uuid.uuid4())).wait(30), 0.2)
        return result, seen

    result, _ = asyncio.run(scenario())
    assert isinstance(result, CaptionResult)
    assert book(fresh, [])["waiting"] == 0


def test_link_callbacks_are_sent_by_name(client, queue) -> None:
    callbacks = f"callbacks-{uuid.uuid4().hex[:8]}"  # a queue the web app's own Celery worker would consume
    ok = client.caption(
        STOP_SIGN,
        queue=queue,
        on_success="myapp.tasks.store",
        on_error="myapp.tasks.alert",
        callback_queue=callbacks,
    )
    failed = client.caption(BAD, queue=queue, on_error="myapp.tasks.alert", callback_queue=callbacks)
    result = ok.get(60)
    with pytest.raises(InvalidImage):
        failed.get(60)
    messages = _drain(client, callbacks, expected=2)
    by_task = {m["task"]: m for m in messages}
    assert by_task["myapp.tasks.store"]["args"] == [json.loads(result.model_dump_json())]
    assert by_task["myapp.tasks.alert"]["args"] == [failed.id]
    with pytest.raises(InvalidRequest, match="callback"):
        client.caption(STOP_SIGN, queue=queue, on_success=42)


def _drain(client: LlavaClient, queue: str, expected: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    with Connection(
        client.settings.broker_url, transport_options=client.app.conf.broker_transport_options
    ) as conn:
        simple = conn.SimpleQueue(queue)
        while len(found) < expected:
            message = simple.get(timeout=30)
            args, _kwargs, _embed = message.decode()
            found.append({"task": message.headers["task"], "args": args})
            message.ack()
        simple.close()
    return found


def test_subscriptions_are_released_after_many_jobs(fresh, queue) -> None:
    """120 jobs, 40 (ten batches of the tiny config's 4) through each of as_completed, get() and state
    polling of rebuilt handles (the web pattern): the client holds a job's subscription only while it waits
    on it, and nothing for any of them at the end, here or in Redis."""
    sent = fresh.map("caption", [RADAR] * 120, queue=queue, max_new_tokens=1)
    nothing = {"subscribed": 0, "waiting": 0, "buffered": 0, "redis_subscribers": 0}
    assert book(fresh, sent) == nothing  # sending subscribes to nothing: a 202 handler never waits

    collecting = fresh.as_completed(sent[80:], timeout=120)  # the last ones: not finished yet
    collected = [next(collecting)]
    during = book(fresh, sent)
    assert during["subscribed"] == during["waiting"] == during["redis_subscribers"] > 0  # what is measured
    collected += list(collecting)
    assert len(collected) == 40
    for job in sent[40:80]:
        job.get(120)
    polled = [fresh.job(job.id) for job in sent[:40]]
    for handle in polled:
        _poll_until_done(handle)
    assert book(fresh, sent) == nothing


def _poll_until_done(job: Any) -> None:
    for _ in range(1200):
        if job.state != "PENDING":
            return
        time.sleep(0.05)
    raise AssertionError(f"{job.id} never finished")
