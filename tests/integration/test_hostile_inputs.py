"""Malformed and hostile inputs, generated here, each sent through the real worker: the right code, in
bounded time, and the worker keeps answering good jobs."""

from __future__ import annotations

import base64
import io
import random
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from producer import Job, LlavaClient, LlavaError
from producer.contract import TASK_CAPTION, TASK_CLASSIFY, CaptionResult
from tests.integration.conftest import IMAGES
from tests.integration.image_server import GOOD_PNG, ImageServer

WORKER_ENV = {
    "LLAVA_FETCH_ALLOW": "127.0.0.1/32",  # the test server; 127.0.0.2 and the rest stay blocked
    "LLAVA_FETCH_DEADLINE": "1.5",
    "LLAVA_FETCH_TIMEOUT": "1",
    "LLAVA_FETCH_RETRIES": "1",
    "LLAVA_FETCH_BACKOFF": "0.05",
    "LLAVA_MAX_IMAGE_BYTES": "2000000",
    "LLAVA_MAX_IMAGE_PIXELS": "4000000",
    "LLAVA_MAX_TEXT_CHARS": "500",
    "LLAVA_MAX_LABELS": "5",
    "LLAVA_LOCAL_IMAGE_ROOTS": str(IMAGES),
}


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` (CRC fixed): a bomb's header."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


GOOD_JPEG = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
Send = Callable[[LlavaClient, str, ImageServer], Job[Any]]


def inline(data: bytes) -> Send:
    return lambda client, queue, server: client.caption(data, queue=queue)


def url(path: str) -> Send:
    return lambda client, queue, server: client.caption(server.url(path), queue=queue)


def remote(address: str) -> Send:
    return lambda client, queue, server: client.caption(address, queue=queue)


def wire(request: Any, task: str = TASK_CAPTION) -> Send:
    """Bypass the client's checks: what any Celery client could put on the wire."""

    def send(client: LlavaClient, queue: str, server: ImageServer) -> Job[Any]:
        result = client.app.send_task(task, kwargs={"request": request}, queue=queue)
        return client.job(result.id, task)

    return send


PNG_URI = "data:image/png;base64," + base64.b64encode(GOOD_PNG).decode()
CASES: dict[str, tuple[Send, str]] = {
    "empty bytes": (inline(b""), "invalid_image"),
    "plain text": (inline(b"hello, I am not an image\n" * 10), "invalid_image"),
    "html": (inline(b"<!doctype html><html><body><img src=x></body></html>"), "invalid_image"),
    "svg": (inline(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'), "invalid_image"),
    "truncated png": (inline(GOOD_PNG[: len(GOOD_PNG) * 2 // 3]), "invalid_image"),
    "truncated jpeg": (inline(GOOD_JPEG[: len(GOOD_JPEG) // 2]), "invalid_image"),
    "png signature only": (inline(b"\x89PNG\r\n\x1a\n"), "invalid_image"),
    "gif header only": (inline(b"GIF89a"), "invalid_image"),
    "random bytes": (inline(random.Random(7).randbytes(5000)), "invalid_image"),
    "png bomb header 30000x30000": (inline(png_with_size(30000, 30000)), "image_too_large"),
    "bmp bomb header": (inline(bmp_with_size(50000, 40000)), "image_too_large"),
    "extreme aspect 1x500": (inline(encode(Image.new("RGB", (1, 500)), "PNG")), "invalid_image"),
    "ico format not allowed": (inline(encode(Image.new("RGB", (16, 16)), "ICO")), "invalid_image"),
    "bad base64": (wire({"image": "data:image/png;base64,@@@not base64@@@"}), "invalid_image"),
    "data uri without base64": (wire({"image": "data:image/png,rawbytes"}), "invalid_image"),
    "inline over worker cap": (inline(b"\0" * 2_100_000), "image_too_large"),
    "metadata address": (remote("http://169.254.169.254/latest/meta-data/"), "fetch_forbidden"),
    "ipv6 loopback": (remote("http://[::1]:80/x.png"), "fetch_forbidden"),
    "decimal 127.0.0.2": (remote("http://2130706434/x.png"), "fetch_forbidden"),
    "short 127.2": (remote("http://127.2/x.png"), "fetch_forbidden"),
    "hex 127.0.0.2": (remote("http://0x7f000002/x.png"), "fetch_forbidden"),
    "private 10/8": (remote("http://10.0.0.1/x.png"), "fetch_forbidden"),
    "html served as png": (url("/html.png"), "invalid_image"),
    "endless body": (url("/endless"), "image_too_large"),
    "slow drip": (url("/drip"), "fetch_failed"),
    "404": (url("/missing.png"), "fetch_failed"),
    "redirect loop": (url("/loop"), "fetch_failed"),
    "redirect to metadata": (url("/to-metadata"), "fetch_forbidden"),
    "path outside roots": (wire({"image": "/etc/passwd"}), "fetch_forbidden"),
    "file scheme": (wire({"image": "file:///etc/passwd"}), "invalid_request"),
    "ftp scheme": (wire({"image": "ftp://example.com/a.png"}), "invalid_request"),
    "request not an object": (wire("caption this"), "invalid_request"),
    "unknown field": (wire({"image": PNG_URI, "exec": "rm -rf /"}), "invalid_request"),
    "prompt over worker cap": (wire({"image": PNG_URI, "prompt": "x" * 600}), "invalid_request"),
    "labels over worker cap": (
        wire({"image": PNG_URI, "labels": list("abcdef")}, TASK_CLASSIFY),
        "invalid_request",
    ),
    "max_new_tokens over cap": (
        wire({"image": PNG_URI, "generation": {"max_new_tokens": 300}}),
        "invalid_request",
    ),
}
SERVED: dict[str, Send] = {
    "16-bit grey png": inline(encode(Image.new("I;16", (40, 30), 40000), "PNG")),
    "animated gif first frame": inline(animated_gif()),
    "cmyk jpeg": inline(encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG")),
    "1x1 png": inline(encode(Image.new("RGB", (1, 1)), "PNG")),
    "redirect to good": url("/to-good"),
    "path under root": wire({"image": str(IMAGES / "stop_sign.jpg")}),
}


@pytest.fixture(scope="module")
def hostile_worker(start_worker) -> tuple[str, str]:
    queue = f"hostile-{uuid.uuid4().hex[:8]}"
    _, hostname = start_worker(queue, **WORKER_ENV)
    return hostname, queue


@pytest.fixture(scope="module")
def outcomes(client: LlavaClient, hostile_worker, image_server: ImageServer) -> dict[str, tuple[Any, float]]:
    """Send every case at once, then collect each outcome (result or error) and when it arrived."""
    queue = hostile_worker[1]
    started = time.monotonic()
    jobs = {name: send(client, queue, image_server) for name, (send, _) in CASES.items()}
    jobs |= {name: send(client, queue, image_server) for name, send in SERVED.items()}
    results: dict[str, tuple[Any, float]] = {}
    for name, job in jobs.items():
        try:
            results[name] = (job.get(timeout=60), time.monotonic() - started)
        except LlavaError as error:
            results[name] = (error, time.monotonic() - started)
    return results


def test_there_are_at_least_twenty_hostile_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_ends_in_its_code(outcomes, name: str) -> None:
    outcome, elapsed = outcomes[name]
    expected = CASES[name][1]
    assert isinstance(outcome, LlavaError), f"{name}: expected {expected}, got a result"
    assert outcome.code == expected, f"{name}: {outcome}"
    assert elapsed < 45


@pytest.mark.parametrize("name", list(SERVED))
def test_odd_but_valid_images_are_served(outcomes, name: str) -> None:
    outcome, _ = outcomes[name]
    assert isinstance(outcome, CaptionResult), f"{name}: {outcome}"


def test_worker_answers_a_good_job_afterwards(client: LlavaClient, hostile_worker, outcomes) -> None:
    hostname, queue = hostile_worker
    assert client.caption(IMAGES / "stop_sign.jpg", queue=queue).get(timeout=30).worker == hostname
