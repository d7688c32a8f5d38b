"""Image bytes never reach what Flower and logs show (a sent message's argsrepr/kwargsrepr, the worker log),
and nothing of a request stays in Redis once its job ended."""

from __future__ import annotations

import base64
import io
import json
import random
import uuid

import pytest
import redis
from PIL import Image

from producer import InvalidImage, InvalidRequest, LlavaClient, LlavaError
from producer.blobs import blob_reference
from tests.integration.conftest import IMAGES, wait_for


def test_sent_message_repr_holds_no_image_bytes(client: LlavaClient, client_settings) -> None:
    queue = f"unconsumed-{uuid.uuid4().hex[:8]}"  # nobody consumes it: the message stays in Redis to read
    data = (IMAGES / "stop_sign.jpg").read_bytes()
    job = client.caption(data, "What is this?", queue=queue)
    client.caption(f"https://user:secret@example.com/cat.png?token=abc{uuid.uuid4().hex}", queue=queue)
    broker = redis.Redis.from_url(client_settings.broker_url)
    raw = [item for key in broker.scan_iter(match=f"{queue}*") for item in broker.lrange(key, 0, -1)]
    messages = [json.loads(item) for item in raw]
    assert len(messages) == 2
    payload = base64.b64encode(data).decode()
    inline, remote = sorted(messages, key=lambda m: m["headers"]["id"] != job.id)
    shown = inline["headers"]["kwargsrepr"] + inline["headers"]["argsrepr"]
    assert payload[:32] not in shown and "sha256" in shown and f"{len(data)} bytes" in shown
    body = base64.b64decode(inline["body"]).decode()
    assert payload[:32] not in body and blob_reference(data) in body  # the image waits in the blob store
    remote_shown = remote["headers"]["kwargsrepr"]
    assert "example.com/cat.png" in remote_shown
    assert "secret" not in remote_shown and "token" not in remote_shown


def test_worker_log_holds_no_image_bytes(client: LlavaClient, shared_worker) -> None:
    worker, _, queue = shared_worker
    data = (IMAGES / "radar_chart.png").read_bytes()
    client.caption(data, queue=queue).get()
    with pytest.raises(InvalidImage):
        client.caption(data[:500], queue=queue).get()  # its error is logged
    log = worker.log_path.read_text(errors="replace")
    assert "invalid_image" in log
    assert "raised expected" not in log  # each coded failure is logged once, by worker.service
    assert base64.b64encode(data).decode()[100:140] not in log


def _values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    if kind == b"string":
        return [client.get(key) or b""]
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"hash":
        return [*client.hkeys(key), *client.hvals(key)]
    if kind == b"set":
        return list(client.smembers(key))
    if kind == b"zset":
        return client.zrange(key, 0, -1)
    return [repr(client.xrange(key)).encode()] if kind == b"stream" else []


def test_nothing_of_a_request_stays_in_redis_once_its_job_ended(stack) -> None:
    """An inline image, a URL with credentials and a signed query, a refused 5 MB prompt: once their jobs
    ended, no Redis key (broker and result backend) holds image bytes, credentials or a value over 64 KB."""
    queue = f"hygiene-{uuid.uuid4().hex[:8]}"
    stack.start(queue)
    client = stack.client
    noise = Image.frombytes("RGB", (720, 720), random.Random(3).randbytes(720 * 720 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    image = buffer.getvalue()
    assert len(image) > 1_400_000
    signature = f"X-Amz-Signature={uuid.uuid4().hex}"
    signed = f"http://user:hunter2pass@10.1.2.3/private/cat.png?{signature}&X-Amz-Credential=AKIAEXAMPLE"
    huge = client.app.send_task(
        "llava.caption", kwargs={"request": {"image": signed, "prompt": "y" * 5_000_000}}, queue=queue
    )
    jobs = [client.caption(image, queue=queue), client.caption(signed, queue=queue)]
    assert jobs[0].get(timeout=60).generated_tokens >= 1
    with pytest.raises(LlavaError):
        jobs[1].get(timeout=60)
    with pytest.raises(InvalidRequest):
        client.job(huge.id, "llava.caption").get(timeout=60)
    wait_for(lambda: _queue_empty(client, queue), 30, "the broker to drop acknowledged messages")
    secrets = [b"hunter2pass", signature.encode(), b"AKIAEXAMPLE", b"yyyyyyyyyyyyyyyy"]
    secrets += [base64.b64encode(image)[1000:1040], image[1000:1040]]
    for db in (0, 1):
        redis_db = redis.Redis.from_url(stack.redis.url(db))
        for key in redis_db.scan_iter(count=1000):
            for value in _values(redis_db, key):
                assert len(value) <= 64 * 1024, f"db {db} key {key!r} holds {len(value)} bytes"
                assert not any(secret in value for secret in secrets), f"db {db} key {key!r} leaks"


def _queue_empty(client: LlavaClient, queue: str) -> bool:
    broker = redis.Redis.from_url(client.settings.broker_url)
    return not broker.hlen("unacked") and not any(broker.llen(key) for key in broker.scan_iter(f"{queue}*"))
