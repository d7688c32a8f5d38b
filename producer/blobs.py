"""Claim check: image bytes stored once per content hash beside the broker, the message carries a reference.

A queued inline image would otherwise cost Redis about twice its size per job (base64 in the request, then
kombu's base64 body encoding) and ride through every hop (publish, ``BRPOP``, events). Instead the producer
stores the raw bytes once under their sha256 and sends ``blob:sha256:<64 hex>`` as the request's ``image``.

Lifetime: each send of a job that references a blob records its claim beside it (a Redis set of claims: the
token the message carries in :data:`~producer.contract.CLAIM_HEADER`, or the job id for a message without
one). The worker releases the job's claim when it ends (success, coded failure, redelivery cap); the last
release deletes the blob. A claim belongs to a send, not to a job id: a job sent again under its id (a
resend while the first run is still on its way, a bulk resume) claims the image again for itself, so the
first run's release leaves it to the second. A worker that dies mid-job releases nothing, so the redelivered
job still finds its blob. A TTL on both keys is only the fallback for producers that die between storing and
sending, or messages that never run.

Resends: a store remembers the digests it stored or claimed within the TTL (a bounded, thread-safe LRU); for
those it first sends only the job's claim (a script that claims and refreshes the TTLs only if the bytes are
still there), and uploads them (one more round trip) only if they are gone. A first-time image is one round
trip, the claim and the bytes in one transaction.

Layout: the bytes wait as a Redis hash, ``n`` (the byte size) and fields ``0``, ``1``, ... (consecutive
chunks of :data:`CHUNK` bytes), not as one string: Redis's allocator (jemalloc) rounds one large allocation up
to its size class, up to a quarter more (a 1,048,849-byte string takes 1,310,720 bytes), while each full chunk
fills its class exactly; a plain string (``SET``, a foreign client) is still read.

The store is one small interface (:class:`BlobStore`); :class:`RedisBlobStore` is the default, in the
result-backend Redis. Another store (S3-compatible, say) implements the same three calls with the same key
naming; nothing else changes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Protocol

import redis
from redis.connection import Encoder, PythonRespSerializer

from producer.contract import BLOB_PREFIX, blob_digest
from producer.errors import ImageTooLarge, InvalidImage

# The bytes are stored as chunks of CHUNK bytes: a chunk's sds takes CHUNK + 5 (sdshdr16; 9 for sdshdr32) +
# 1 (NUL) <= 65,536 bytes, exactly jemalloc's 64 KiB size class, so a full chunk wastes at most a few bytes;
# only the last, shorter chunk is rounded up (under 8 KiB: the classes from 32 to 64 KiB are 8 KiB apart),
# plus tens of bytes per field (its name and hash entry). One string of the whole image would be rounded up
# by up to a quarter of its size instead. Check with ``MEMORY USAGE <key> SAMPLES 0`` (0: count every field).
CHUNK = 65_520

_RELEASE = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  return redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
"""

# The claim of a resend: atomic like the release, so a claim either finds the bytes and keeps them (a release
# that runs after it sees the claim) or claims nothing (returns 0: upload them).
_CLAIM_IF_STORED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def blob_reference(data: bytes) -> str:
    """The wire reference of ``data``: ``blob:sha256:<hex>``."""
    return f"{BLOB_PREFIX}{hashlib.sha256(data).hexdigest()}"


def bytes_packer() -> PythonRespSerializer:
    """redis-py's pure-Python command packer, for the client that stores blobs: it hands a large value to the
    socket as its own buffer, where hiredis's packer (redis-py's default once hiredis is installed) copies it
    into the command first (measured here: 5 µs vs 1.7 ms to pack a 1 MB SET). Replies are still parsed by
    hiredis. Pass it as ``command_packer`` to the client's connection pool."""
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)  # redis-py's own cutoff


class BlobStore(Protocol):
    """Where image bytes wait for their jobs."""

    def put(self, data: bytes, claim: str) -> str:
        """Record that the send holding ``claim`` needs ``data``, storing the bytes unless they are already
        there; the reference to send."""
        ...

    def get(self, reference: str, max_bytes: int) -> bytes:
        """The bytes of ``reference``, checked against its hash: ``InvalidImage`` if missing or tampered,
        ``ImageTooLarge`` over ``max_bytes``."""
        ...

    def release(self, reference: str, claim: str) -> None:
        """The job sent with ``claim`` ended: drop the claim; the last claim deletes the bytes."""
        ...


class RecentDigests:
    """The digests a store stored or claimed lately, and when (``time.monotonic()``): at most ``size``, the
    least recent dropped first; shared by the threads that send through one client."""

    def __init__(self, ttl: float, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, digest: str, at: float) -> None:
        with self._lock:
            self._seen[digest] = at
            self._seen.move_to_end(digest)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)

    def fresh(self, digest: str, now: float) -> bool:
        """Whether ``digest`` was noted less than ``ttl`` seconds before ``now`` (its keys may still be
        there; older ones have surely expired)."""
        with self._lock:
            at = self._seen.get(digest)
        return at is not None and now - at < self.ttl


class RedisBlobStore:
    """Blobs in Redis: ``llava-blob-<hex>`` (the raw bytes, a hash of chunks: see :data:`CHUNK`) and
    ``llava-blob-jobs-<hex>`` (the claims of the sends that need them), both expiring after ``ttl`` seconds
    unless released first. A resend of an image this store stored or claimed within ``ttl`` sends only its
    claim while the bytes are still there."""

    def __init__(self, client: redis.Redis, ttl: int, recent: int = 1024) -> None:
        self.client = client
        self.ttl = ttl
        self.recent = RecentDigests(ttl, size=recent)
        self._release = client.register_script(_RELEASE)
        self._claim_if_stored = client.register_script(_CLAIM_IF_STORED)

    @staticmethod
    def keys(digest: str) -> tuple[str, str]:
        return f"llava-blob-{digest}", f"llava-blob-jobs-{digest}"

    def put(self, data: bytes, claim: str) -> str:
        reference = blob_reference(data)
        digest = blob_digest(reference)
        keys = self.keys(digest)
        sent_at = time.monotonic()  # before the call: the keys' TTL starts no earlier than this
        # A first-time image: straight to the upload. One noted lately: the claim alone, the upload if the
        # bytes are gone (released by their last job, expired, or deleted as tampered).
        if not (self.recent.fresh(digest, sent_at) and self._claim(keys, claim)):
            self._store(keys, data, claim)
        self.recent.note(digest, sent_at)
        return reference

    def _claim(self, keys: tuple[str, str], claim: str) -> bool:
        """If the bytes are stored: add ``claim``, refresh both TTLs, True; else False."""
        return bool(self._claim_if_stored(keys=list(keys), args=[claim, self.ttl]))

    def _store(self, keys: tuple[str, str], data: bytes, claim: str) -> None:
        blob, jobs = keys
        # One transaction, one round trip: the claim and the bytes land together (no release can come
        # between them) and both TTLs start anew. A copy already there (another producer's) is replaced by
        # the same bytes (the key is their sha256), which also mends a tampered one: DEL first, so that a
        # plain-string copy (a foreign client's SET) or stray fields of another chunking do not stay.
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(jobs, claim)
        pipe.expire(jobs, self.ttl)
        pipe.delete(blob)
        pipe.hset(blob, items=chunked(data))
        pipe.expire(blob, self.ttl)
        pipe.execute()

    def get(self, reference: str, max_bytes: int) -> bytes:
        digest = blob_digest(reference)
        blob, _ = self.keys(digest)
        stored = self._read(blob, max_bytes)
        if stored is None:
            raise InvalidImage(
                f"blob {digest[:12]}… is not in the blob store (it expired, was never stored, or its jobs "
                "already ended): send the image again"
            )
        size, data = stored
        if size is not None and size > max_bytes:
            raise ImageTooLarge(
                f"blob image is {size} bytes, over the {max_bytes}-byte cap (max_image_bytes)"
            )
        if size == 0:
            raise InvalidImage(f"blob {digest[:12]}… is empty: an image has bytes")
        if size != len(data) or hashlib.sha256(data).hexdigest() != digest:
            self.client.delete(blob)  # a resend of the real bytes stores them again
            raise InvalidImage(f"blob {digest[:12]}… does not match its sha256 (tampered or corrupted)")
        return data

    def _read(self, blob: str, max_bytes: int) -> tuple[int | None, bytes] | None:
        """(the stored size: ``n`` of a hash, ``None`` if unreadable; the bytes read) or None if missing.

        One round trip that reads either form, at most ``max_bytes`` (a hash: rounded up to a whole chunk):
        ``HMGET n 0 1 …`` of as many chunks as the cap allows (one command, so the size and the chunks agree)
        and ``STRLEN`` + ``GETRANGE`` for a plain string; the one of the other form fails ``WRONGTYPE``. Not
        a script that checks the cap before any byte travels: a Lua reply of 1 MB costs Redis ~1.5 ms more
        (measured), and an over-cap image is refused after at most the cap was read, as before the chunks.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(blob, ["n", *range(-(-max_bytes // CHUNK))])
        pipe.strlen(blob)
        pipe.getrange(blob, 0, max_bytes - 1)
        as_hash, length, as_string = pipe.execute(raise_on_error=False)
        for reply in (as_hash, length, as_string):
            if isinstance(reply, redis.ResponseError) and not str(reply).startswith("WRONGTYPE"):
                raise reply
        if isinstance(as_hash, list) and any(field is not None for field in as_hash):
            return _declared_size(as_hash[0]), b"".join(chunk for chunk in as_hash[1:] if chunk)
        if isinstance(length, int) and length > 0:
            return length, as_string
        return None  # no key (or a key of another type)

    def release(self, reference: str, claim: str) -> None:
        blob, jobs = self.keys(blob_digest(reference))
        self._release(keys=[blob, jobs], args=[claim])


def message_claim(token: object, job_id: str) -> str:
    """The claim a job's message holds on its blob image: its :data:`~producer.contract.CLAIM_HEADER`
    ``token``, or the job id for a message without one (a foreign client or an older producer)."""
    return token if isinstance(token, str) and token else job_id


def chunked(data: bytes) -> list[str | int | memoryview]:
    """The fields of a stored blob, for ``HSET``: ``n``, the size, then ``0``, the first :data:`CHUNK`
    bytes, ``1``, the next, ... (views of ``data``, not copies: the bytes packer hands them to the socket as
    they are)."""
    view = memoryview(data)
    fields: list[str | int | memoryview] = ["n", len(data)]
    for index, start in enumerate(range(0, len(data), CHUNK)):
        fields += [index, view[start : start + CHUNK]]
    return fields


def _declared_size(n: object) -> int | None:
    """A stored blob's ``n`` as a number, or None if it is missing or not a decimal integer."""
    try:
        return int(n)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
