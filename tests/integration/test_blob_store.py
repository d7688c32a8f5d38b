"""The blob store on a real Redis: stored once per content hash, claimed per job, deleted with the last claim,
checked against its hash when read."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest
import redis

from devtools.devstack import RedisServer
from producer.blobs import RedisBlobStore, blob_reference
from producer.errors import ImageTooLarge, InvalidImage


@pytest.fixture
def store(redis_server: RedisServer) -> RedisBlobStore:
    return RedisBlobStore(redis.Redis.from_url(redis_server.url(1)), ttl=600)


def test_one_copy_per_content_however_many_jobs(store: RedisBlobStore) -> None:
    data = os.urandom(50_000)
    references = {store.put(data, f"job-{i}") for i in range(20)}
    assert references == {blob_reference(data)}
    blob, jobs = store.keys(hashlib.sha256(data).hexdigest())
    assert store.client.strlen(blob) == len(data)  # raw bytes, no base64
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
