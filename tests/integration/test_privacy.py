"""Image bytes never reach what Flower and logs show: a sent message's argsrepr/kwargsrepr, the worker log."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from producer import InvalidImage, LlavaClient
from tests.integration.conftest import IMAGES


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
    assert payload[:32] in base64.b64decode(inline["body"]).decode()  # the body does carry the image
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
