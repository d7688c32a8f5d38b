"""The blob store on a real Redis: stored once per content hash, claimed per job, deleted with the last claim,
checked against its hash when read; a resend of a stored image sends only its claim."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from devtools.devstack import RedisServer
from producer.blobs import CHUNK, RedisBlobStore, blob_reference, bytes_packer
from producer.errors import ImageTooLarge, InvalidImage
from tests.integration.conftest import wait_for


@pytest.fixture
def store(redis_server: RedisServer) -> RedisBlobStore:
    return RedisBlobStore(redis.Redis.from_url(redis_server.url(1)), ttl=600)


def counting_store(server: RedisServer, ttl: int = 600) -> RedisBlobStore:
    """A store built as ``LlavaClient`` builds it (the bytes packer), on an emptied quiet Redis."""
    client = redis.Redis.from_url(server.url(0), command_packer=bytes_packer())
    client.flushall()
    return RedisBlobStore(client, ttl=ttl)


def commands(client: redis.Redis) -> dict[str, int]:
    """How many times each command ran on the server (``INFO commandstats``; ``INFO`` itself left out)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items() if name != "cmdstat_info"}


def sent_since(before: dict[str, int], client: redis.Redis) -> dict[str, int]:
    deltas = {name: calls - before.get(name, 0) for name, calls in commands(client).items()}
    return {name: delta for name, delta in deltas.items() if delta}


def received_bytes(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def test_one_copy_per_content_however_many_jobs(store: RedisBlobStore) -> None:
    data = os.urandom(50_000)
    references = {store.put(data, f"job-{i}") for i in range(20)}
    assert references == {blob_reference(data)}
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    assert store.client.hget(blob, "n") == str(len(data)).encode()
    assert b"".join(store.client.hmget(blob, ["0"])) == data  # raw bytes, no base64; one chunk
    assert store.client.scard(jobs) == 20
    assert store.get(blob_reference(data), max_bytes=len(data)) == data


def test_the_last_release_deletes_the_bytes(store: RedisBlobStore) -> None:
    data = os.urandom(1000)
    reference = store.put(data, "a")
    store.put(data, "b")
    store.release(reference, "a")
    assert store.get(reference, max_bytes=10_000) == data
    store.release(reference, "b")
    assert not store.client.exists(*store.keys(hashlib.sha256(data).hexdigest()))
    with pytest.raises(InvalidImage, match="not in the blob store"):
        store.get(reference, max_bytes=10_000)


def test_a_resend_after_release_stores_it_again(store: RedisBlobStore) -> None:
    data = os.urandom(1000)
    reference = store.put(data, "a")
    store.release(reference, "a")
    assert store.put(data, "b") == reference
    assert store.get(reference, max_bytes=10_000) == data


def test_a_second_producer_claims_the_stored_copy(store: RedisBlobStore) -> None:
    data = os.urandom(5000)
    reference = store.put(data, "a")
    other = RedisBlobStore(store.client, ttl=600)
    assert other.put(data, "b") == reference
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    assert store.client.smembers(jobs) == {b"a", b"b"}
    store.release(reference, "a")
    assert other.get(reference, max_bytes=len(data)) == data
    other.release(reference, "b")
    assert not store.client.exists(blob, jobs)


def test_tampered_and_oversized_blobs_are_refused(store: RedisBlobStore) -> None:
    data = os.urandom(2000)
    reference = store.put(data, uuid.uuid4().hex)
    with pytest.raises(ImageTooLarge, match="max_image_bytes"):
        store.get(reference, max_bytes=1000)
    store.client.set(store.keys(hashlib.sha256(data).hexdigest())[0], b"x" + data[1:])
    with pytest.raises(InvalidImage, match="does not match its sha256"):
        store.get(reference, max_bytes=10_000)


def test_keys_expire_as_a_fallback(store: RedisBlobStore) -> None:
    data = os.urandom(100)
    store.put(data, "a")
    for key in store.keys(hashlib.sha256(data).hexdigest()):
        assert 0 < store.client.ttl(key) <= 600


def test_a_first_time_image_is_one_transaction(quiet_server: RedisServer) -> None:
    store = counting_store(quiet_server)
    before = commands(store.client)
    store.put(os.urandom(50_000), "a")
    # No existence check or script before the upload: the claim and the bytes in one MULTI/EXEC.
    assert sent_since(before, store.client) == {
        "multi": 1, "sadd": 1, "expire": 2, "del": 1, "hset": 1, "exec": 1
    }  # fmt: skip


def test_a_resend_of_a_stored_image_sends_only_its_claim(quiet_server: RedisServer) -> None:
    store, data = counting_store(quiet_server), os.urandom(1 << 20)
    reference = store.put(data, "a")
    before, received = commands(store.client), received_bytes(store.client)
    assert store.put(data, "b") == reference
    sent = sent_since(before, store.client)
    assert "hset" not in sent and "exec" not in sent, sent  # the bytes did not travel
    assert received_bytes(store.client) - received < 10_000  # of a 1 MB image
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    assert store.client.smembers(jobs) == {b"a", b"b"}
    assert all(0 < store.client.ttl(key) <= 600 for key in (blob, jobs))
    store.release(reference, "a")
    assert store.get(reference, max_bytes=len(data)) == data  # "b" still holds it
    store.release(reference, "b")
    assert not store.client.exists(blob, jobs)


def test_a_resend_after_the_bytes_left_stores_them_again(quiet_server: RedisServer) -> None:
    store, data = counting_store(quiet_server), os.urandom(100_000)
    reference = store.put(data, "a")
    store.put(data, "b")  # a claim-only resend
    store.release(reference, "a")
    store.release(reference, "b")  # the last claim: the bytes are deleted
    before = commands(store.client)
    assert store.put(data, "c") == reference
    # One round trip more than a first-time image: the claim that found nothing, then the upload.
    assert sent_since(before, store.client) == {
        "evalsha": 1, "exists": 1, "multi": 1, "sadd": 1, "expire": 2, "del": 1, "hset": 1, "exec": 1
    }  # fmt: skip
    assert store.get(reference, max_bytes=len(data)) == data
    assert store.client.smembers(store.keys(hashlib.sha256(data).hexdigest())[1]) == {b"c"}


def test_a_resend_after_the_ttl_is_one_transaction_again(quiet_server: RedisServer) -> None:
    store, data = counting_store(quiet_server, ttl=1), os.urandom(1000)
    reference = store.put(data, "a")
    blob, _ = store.keys(hashlib.sha256(data).hexdigest())
    wait_for(lambda: not store.client.exists(blob), 10, "the blob to expire")
    before = commands(store.client)
    store.put(data, "b")  # noted more than a TTL ago: surely gone, so no claim is tried first
    assert "evalsha" not in sent_since(before, store.client)
    assert store.get(reference, max_bytes=len(data)) == data


def at_once(start: threading.Barrier, call: Callable[..., object], *args: object) -> object:
    start.wait()
    return call(*args)


def test_a_release_racing_a_resend_never_leaves_a_claim_without_its_bytes(store: RedisBlobStore) -> None:
    data = os.urandom(20_000)
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    with ThreadPoolExecutor(2) as pool:
        for _ in range(100):
            reference = store.put(data, "first")  # noted: the resend below tries the claim alone first
            start = threading.Barrier(2, timeout=10)
            release = pool.submit(at_once, start, store.release, reference, "first")
            resend = pool.submit(at_once, start, store.put, data, "second")
            release.result(timeout=10), resend.result(timeout=10)
            assert store.client.smembers(jobs) == {b"second"}
            assert store.get(reference, max_bytes=len(data)) == data
            store.release(reference, "second")
            assert not store.client.exists(blob, jobs)


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 1_048_849])
def test_a_blob_is_stored_as_chunks_that_cost_redis_its_size(store: RedisBlobStore, size: int) -> None:
    data = os.urandom(size)
    reference = store.put(data, "a")
    blob, _ = store.keys(hashlib.sha256(data).hexdigest())
    chunks = -(-size // CHUNK)
    assert store.client.type(blob) == b"hash" and store.client.hlen(blob) == 1 + chunks
    assert store.client.hstrlen(blob, str(chunks - 1)) == size - (chunks - 1) * CHUNK
    # Full chunks fill jemalloc's 64 KiB class; only the last one rounds up (the classes between 32 and
    # 64 KiB are 8 KiB apart), plus each field's name and entry and the key's own few hundred bytes.
    assert size <= store.client.memory_usage(blob, samples=0) <= size + 8192 + 64 * chunks + 512
    assert store.get(reference, max_bytes=size) == data
    store.release(reference, "a")
    assert not store.client.exists(blob)


def test_a_plain_string_blob_of_a_foreign_client_is_read_and_released(store: RedisBlobStore) -> None:
    data = os.urandom(200_000)
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    store.client.set(blob, data, ex=600)
    store.client.sadd(jobs, "a")
    reference = blob_reference(data)
    assert store.get(reference, max_bytes=len(data)) == data
    store.release(reference, "a")
    assert not store.client.exists(blob, jobs)


def test_a_put_replaces_a_copy_of_another_form(store: RedisBlobStore) -> None:
    """A plain-string copy (no WRONGTYPE) or a hash with stray fields: the upload writes the hash anew."""
    data = os.urandom(CHUNK + 10)
    blob, _ = store.keys(hashlib.sha256(data).hexdigest())
    store.client.set(blob, data)
    reference = store.put(data, "a")
    assert store.client.type(blob) == b"hash" and store.get(reference, max_bytes=len(data)) == data
    store.client.hset(blob, "2", b"stray")
    RedisBlobStore(store.client, ttl=600).put(data, "b")  # another producer: no claim-only resend
    assert store.client.hlen(blob) == 3 and store.get(reference, max_bytes=len(data)) == data


def sent_bytes(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


@pytest.mark.parametrize("form", ["hash", "string", "hash whose n lies"])
def test_an_over_cap_blob_is_refused_after_at_most_the_cap_was_read(
    quiet_server: RedisServer, form: str
) -> None:
    store, data, cap = counting_store(quiet_server), os.urandom(1 << 20), 100_000
    blob, _ = store.keys(hashlib.sha256(data).hexdigest())
    if form == "string":
        store.client.set(blob, data)
    else:
        store.put(data, "a")
    if form == "hash whose n lies":
        store.client.hset(blob, "n", "10")
    sent = sent_bytes(store.client)
    refusal = (
        (InvalidImage, "does not match its sha256") if form == "hash whose n lies" else (ImageTooLarge, "")
    )
    with pytest.raises(
        refusal[0], match=refusal[1] or f"blob image is {len(data)} bytes, over the {cap}-byte"
    ):
        store.get(blob_reference(data), max_bytes=cap)
    # Of a 1 MB image: the cap, rounded up to a whole chunk for a hash, and INFO's own reply.
    assert sent_bytes(store.client) - sent < cap + CHUNK + 10_000


@pytest.mark.parametrize("damage", ["a chunk's byte", "a chunk cut short", "a missing chunk", "n"])
def test_a_damaged_chunked_blob_is_invalid_and_deleted(store: RedisBlobStore, damage: str) -> None:
    data = os.urandom(2 * CHUNK + 100)
    reference = store.put(data, "a")
    blob, _ = store.keys(hashlib.sha256(data).hexdigest())
    if damage == "a chunk's byte":
        store.client.hset(blob, "1", b"x" + data[CHUNK + 1 : 2 * CHUNK])
    elif damage == "a chunk cut short":
        store.client.hset(blob, "2", data[2 * CHUNK : -1])
    elif damage == "a missing chunk":
        store.client.hdel(blob, "1")
    else:
        store.client.hset(blob, "n", len(data) + 1)
    with pytest.raises(InvalidImage, match="does not match its sha256"):
        store.get(reference, max_bytes=2 * len(data))  # an n over the cap would be image_too_large
    assert not store.client.exists(blob)  # a resend of the real bytes stores them again
    assert RedisBlobStore(store.client, ttl=600).put(data, "b") == reference
    assert store.get(reference, max_bytes=len(data)) == data


def test_a_missing_or_empty_blob_is_invalid(store: RedisBlobStore) -> None:
    with pytest.raises(InvalidImage, match="not in the blob store"):
        store.get(blob_reference(b"never stored " + uuid.uuid4().bytes), max_bytes=1000)
    reference = store.put(b"", "a")  # the producer sends empty bytes on: the worker refuses them
    with pytest.raises(InvalidImage, match="is empty"):
        store.get(reference, max_bytes=1000)
