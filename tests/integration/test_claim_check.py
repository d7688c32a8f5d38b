"""Claim check through the real client, Redis and worker: inline images wait in the blob store, once per
content hash; the broker message carries a small reference; blobs leave with their last job."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import uuid

import pytest
import redis
from PIL import Image

from producer import InvalidImage, InvalidRequest, LlavaClient
from producer.blobs import CHUNK, RedisBlobStore, blob_reference
from producer.contract import TASK_CAPTION
from tests.integration.conftest import IMAGES, Stack, wait_for


def noise_png(side: int, seed: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def blob_keys(client: LlavaClient) -> list[bytes]:
    backend = redis.Redis.from_url(client.settings.result_backend)
    return sorted(backend.scan_iter("llava-blob-*"))


def queued_messages(client: LlavaClient, queue: str) -> list[bytes]:
    broker = redis.Redis.from_url(client.settings.broker_url)
    return [m for key in broker.scan_iter(f"{queue}*") for m in broker.lrange(key, 0, -1)]


def stored_bytes(url: str) -> int:
    """What the keys of both databases take (``MEMORY USAGE``: values, key and allocator rounding; ``SAMPLES
    0``: every field of a hash counted, not 5 of them extrapolated)."""
    total = 0
    for db in (0, 1):
        client = redis.Redis.from_url(url.rsplit("/", 1)[0] + f"/{db}")
        total += sum(int(client.memory_usage(key, samples=0) or 0) for key in client.scan_iter(count=1000))
    return total


@pytest.mark.parametrize("side", [300, 591])  # ~270 KB and ~1 MB PNGs
def test_a_queued_job_costs_redis_its_image_once_and_a_small_message(stack: Stack, side: int) -> None:
    client, queue = stack.client, f"unconsumed-{uuid.uuid4().hex[:8]}"
    images = [noise_png(side, seed) for seed in range(5)]  # distinct
    before = stored_bytes(stack.redis.url(0))
    for image in images:
        client.caption(image, queue=queue)
    per_job = (stored_bytes(stack.redis.url(0)) - before) / len(images)
    size = sum(map(len, images)) / len(images)
    # Stored in chunks that fill the allocator's 64 KiB size class (producer.blobs.CHUNK): only the last
    # chunk rounds up (under 8 KiB), plus tens of bytes per chunk; the message and the claim take ~2 KB. As
    # one string, Redis's allocator rounded the image up by up to a quarter (a 270 KB image took 320 KB);
    # inline as a data: URI in the message it took about 2 x its size.
    chunks = -(-size // CHUNK)
    assert size <= per_job <= size + 8192 + 64 * chunks + 4096, f"{per_job:.0f} B per job, image {size:.0f}"
    assert all(len(message) <= 2048 for message in queued_messages(client, queue))


def test_twenty_jobs_on_one_image_store_it_once(stack: Stack) -> None:
    client, queue = stack.client, f"unconsumed-{uuid.uuid4().hex[:8]}"
    image = (IMAGES / "radar_chart.png").read_bytes()
    jobs = [client.caption(image, queue=queue) for _ in range(10)]
    jobs += [client.vqa(image, "What is it?", queue=queue) for _ in range(10)]
    digest = hashlib.sha256(image).hexdigest()
    blob, claims = RedisBlobStore.keys(digest)
    backend = redis.Redis.from_url(client.settings.result_backend)
    assert backend.hget(blob, "n") == str(len(image)).encode()
    assert backend.scard(claims) == 20  # one claim per send
    bodies = [base64.b64decode(json.loads(m)["body"]) for m in queued_messages(client, queue)]
    assert len(bodies) == 20 and all(blob_reference(image).encode() in body for body in bodies)


def test_blobs_leave_with_their_last_job_success_or_failure(stack: Stack) -> None:
    queue = f"claim-{uuid.uuid4().hex[:8]}"
    stack.start(queue)
    client = stack.client
    image = (IMAGES / "stop_sign.jpg").read_bytes()
    ok = [client.caption(image, queue=queue, max_new_tokens=2) for _ in range(3)]
    refused = client.caption(noise_png(64, 1), queue=queue, max_new_tokens=4000)  # over the worker's cap
    assert all(job.get(timeout=60).generated_tokens >= 1 for job in ok)
    with pytest.raises(InvalidRequest, match="max_new_tokens_cap"):
        refused.get(timeout=60)
    wait_for(lambda: not blob_keys(client), 10, "the blob keys to be deleted")


def test_foreign_clients_send_data_uris_or_store_blobs_themselves(client: LlavaClient, shared_worker) -> None:
    """A bare Celery client: a data: URI as before, or the blob form (SET the bytes, SADD the job id)."""
    _, _, queue = shared_worker
    image = (IMAGES / "stop_sign.jpg").read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    by_uri = client.app.send_task(TASK_CAPTION, kwargs={"request": {"image": uri}}, queue=queue)
    job_id, digest = str(uuid.uuid4()), hashlib.sha256(image).hexdigest()
    backend = redis.Redis.from_url(client.settings.result_backend)
    backend.set(f"llava-blob-{digest}", image, ex=3600)
    backend.sadd(f"llava-blob-jobs-{digest}", job_id)
    backend.expire(f"llava-blob-jobs-{digest}", 3600)
    request = {"image": f"blob:sha256:{digest}"}
    by_blob = client.app.send_task(TASK_CAPTION, task_id=job_id, kwargs={"request": request}, queue=queue)
    assert client.job(by_uri.id).get(timeout=60).text == client.job(by_blob.id).get(timeout=60).text


def test_a_missing_or_tampered_blob_is_invalid_image(client: LlavaClient, shared_worker) -> None:
    _, _, queue = shared_worker
    missing = {"image": blob_reference(b"never stored " + uuid.uuid4().bytes)}
    data = noise_png(32, 7)
    digest = hashlib.sha256(data).hexdigest()
    redis.Redis.from_url(client.settings.result_backend).set(f"llava-blob-{digest}", b"x" + data[1:])
    tampered = {"image": f"blob:sha256:{digest}"}
    for request, message in ((missing, "not in the blob store"), (tampered, "does not match its sha256")):
        sent = client.app.send_task(TASK_CAPTION, kwargs={"request": request}, queue=queue)
        with pytest.raises(InvalidImage, match=message):
            client.job(sent.id).get(timeout=60)


def test_resends_claim_the_stored_image_or_store_it_again(client: LlavaClient, shared_worker) -> None:
    """The tagging flow (one image, several job kinds) claims the stored copy; once the last job ended and
    the image left, the next resend stores it again, and every job succeeds."""
    _, _, queue = shared_worker
    image = noise_png(96, 11)
    blob, claims = RedisBlobStore.keys(hashlib.sha256(image).hexdigest())
    backend = redis.Redis.from_url(client.settings.result_backend)
    jobs = [client.caption(image, queue=queue, max_new_tokens=2)]
    jobs.append(client.vqa(image, "What is it?", queue=queue, max_new_tokens=2))
    assert all(job.get(timeout=60).generated_tokens >= 1 for job in jobs)
    wait_for(lambda: not backend.exists(blob, claims), 10, "the image to leave with its last job")
    again = client.caption(image, queue=queue, max_new_tokens=2)  # the claim finds nothing: stored again
    assert again.get(timeout=60).generated_tokens >= 1
    wait_for(lambda: not backend.exists(blob, claims), 10, "the image to leave with its last job")


def test_a_resend_under_the_same_id_keeps_its_image(stack: Stack) -> None:
    """Job X sent, then sent again under its id while the first is still queued (a producer that gave up
    waiting, a bulk resume): the first run ends (here refused: over the worker's max_new_tokens cap) and
    releases its claim; the resend still finds the image and succeeds. Claims were the job id: the first
    release deleted the image and the resend ended invalid_image."""
    client, queue = stack.client, f"resend-{uuid.uuid4().hex[:8]}"
    image, job_id = noise_png(64, 23), f"resend-{uuid.uuid4().hex[:8]}"
    client.caption(image, queue=queue, job_id=job_id, max_new_tokens=4000)
    client.caption(image, queue=queue, job_id=job_id, max_new_tokens=2)
    backend = redis.Redis.from_url(client.settings.result_backend)
    blob, claims = RedisBlobStore.keys(hashlib.sha256(image).hexdigest())
    assert backend.scard(claims) == 2
    # Both queued before any worker; one job at a time (one thread, one prefetched message), so the resend
    # is taken only after the first run ended and released its claim, as when it waited in the queue.
    stack.start(queue, LLAVA_CONCURRENCY="1")
    wait_for(lambda: resend_outcome(backend, job_id) is not None, 60, "the resend's outcome")
    assert resend_outcome(backend, job_id) == "SUCCESS"
    wait_for(lambda: not backend.exists(blob, claims), 10, "the image to leave with its last job")


def resend_outcome(backend: redis.Redis, job_id: str) -> str | None:
    """The stored outcome of ``job_id`` once it is the resend's: ``SUCCESS`` or the failure's code; None
    while nothing, or the first run's refusal (``invalid_request``, overwritten by the resend), is stored.
    Read raw: a handle caches the first failure it saw."""
    stored = backend.get(f"celery-task-meta-{job_id}")
    if stored is None:
        return None
    meta = json.loads(stored)
    if meta["status"] == "SUCCESS":
        return "SUCCESS"
    code = meta["result"]["exc_message"][1]
    return None if code == "invalid_request" else code
