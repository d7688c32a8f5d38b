"""worker.fetch against a hostile HTTP(S) server on loopback (allowed with 127.0.0.1/32, as operators do)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.errors import (
    FetchFailed,
    FetchForbidden,
    ImageTooLarge,
    InvalidRequest,
    JobTimeout,
    LlavaError,
)
from tests.integration.conftest import wait_for
from tests.integration.image_server import GOOD_PNG, ImageServer, self_signed_certificate
from worker.fetch import FetchAborted, FetchRegistry, fetch
from worker.fetch_policy import FetchPolicy
from worker.settings import WorkerSettings


def policy_for(allow: list[str], **settings: Any) -> FetchPolicy:
    """The fetch policy of a worker with these settings and ``fetch_allow=allow``."""
    return FetchPolicy.from_settings(WorkerSettings(fetch_allow=allow, **settings))


POLICY = policy_for(
    ["127.0.0.1/32"],
    max_image_bytes=1_000_000,
    fetch_timeout=1.0,
    fetch_deadline=1.5,
    fetch_max_redirects=3,
    fetch_retries=2,
    fetch_backoff=0.05,
)


def fetch_error(url: str, policy: FetchPolicy = POLICY) -> LlavaError:
    started = time.monotonic()
    with pytest.raises(LlavaError) as error:
        fetch(url, policy)
    assert time.monotonic() - started < 10, "a fetch must end in bounded time"
    return error.value


def test_good_image_and_redirect_to_it(image_server: ImageServer) -> None:
    assert fetch(image_server.url("/good.png"), POLICY) == GOOD_PNG
    assert fetch(image_server.url("/to-good"), POLICY) == GOOD_PNG


def test_loopback_is_refused_without_the_allow_list(image_server: ImageServer) -> None:
    before = image_server.hits["/good.png"]
    error = fetch_error(image_server.url("/good.png"), policy_for([], max_image_bytes=1_000_000))
    assert isinstance(error, FetchForbidden) and "loopback" in error.message
    assert image_server.hits["/good.png"] == before  # refused before connecting


def test_slow_drip_hits_the_deadline(image_server: ImageServer) -> None:
    error = fetch_error(
        image_server.url("/drip"),
        policy_for(["127.0.0.1"], max_image_bytes=10**6, fetch_deadline=0.5, fetch_retries=0),
    )
    assert isinstance(error, FetchFailed) and "fetch_deadline" in error.message


@pytest.mark.parametrize("path", ["/huge-length", "/no-length", "/endless"])
def test_byte_cap_with_huge_missing_or_endless_length(image_server: ImageServer, path: str) -> None:
    error = fetch_error(image_server.url(path))
    assert isinstance(error, ImageTooLarge) and "max_image_bytes" in error.message


def test_lying_content_length_reads_only_what_it_declared(image_server: ImageServer) -> None:
    assert fetch(image_server.url("/lying-length"), POLICY) == GOOD_PNG[:100]


def test_404_is_permanent_and_not_retried(image_server: ImageServer) -> None:
    before = image_server.hits["/missing.png"]
    error = fetch_error(image_server.url("/missing.png"))
    assert isinstance(error, FetchFailed) and not error.retryable and "HTTP 404" in error.message
    assert image_server.hits["/missing.png"] == before + 1


def test_500_is_retried_with_backoff_then_fails(image_server: ImageServer) -> None:
    before = image_server.hits["/status-500"]
    error = fetch_error(image_server.url("/status-500"))
    assert isinstance(error, FetchFailed) and error.retryable and "HTTP 500" in error.message
    assert image_server.hits["/status-500"] == before + 3  # one try + fetch_retries (2)


def test_transient_failures_recover_on_retry(image_server: ImageServer) -> None:
    assert fetch(image_server.url("/flaky"), POLICY) == GOOD_PNG
    assert image_server.hits["/flaky"] == 3


def test_redirect_loop_and_redirect_to_metadata(image_server: ImageServer) -> None:
    loop = fetch_error(image_server.url("/loop"))
    assert isinstance(loop, FetchFailed) and not loop.retryable and "redirects" in loop.message
    metadata = fetch_error(image_server.url("/to-metadata"))
    assert isinstance(metadata, FetchForbidden) and "link-local" in metadata.message


def test_connection_refused_is_retryable_fetch_failed() -> None:
    from devtools.devstack import free_port

    error = fetch_error(f"http://127.0.0.1:{free_port()}/x.png")
    assert isinstance(error, FetchFailed) and error.retryable


# -- one wall-clock budget for the whole fetch -------------------------------------------------------------

MARGIN = 1.0  # seconds past the budget a fetch may take to notice it is over (generous; it takes ms)


def timed_error(url: str, policy: FetchPolicy, **kwargs: object) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises((LlavaError, FetchAborted)) as error:
        fetch(url, policy, **kwargs)  # type: ignore[arg-type]
    return error.value, time.monotonic() - started


def test_headers_dripped_byte_by_byte_end_at_the_fetch_deadline(image_server: ImageServer) -> None:
    # each byte comes well within fetch_timeout (a per-read timeout would wait for ever), retries allowed
    policy = policy_for(
        ["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=5, fetch_deadline=1.5, fetch_retries=3
    )
    error, took = timed_error(image_server.url("/drip-headers"), policy)
    assert isinstance(error, FetchFailed) and "1.5 s (fetch_deadline)" in error.message
    assert 1.5 <= took < 1.5 + MARGIN


def test_the_jobs_deadline_caps_the_fetch(image_server: ImageServer) -> None:
    policy = policy_for(["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=5, fetch_deadline=60)
    error, took = timed_error(image_server.url("/drip-headers"), policy, deadline=time.monotonic() + 1.0)
    assert isinstance(error, JobTimeout) and error.code == "timeout"
    assert took < 1.0 + MARGIN


def test_retries_and_backoff_pauses_stay_inside_the_budget(image_server: ImageServer) -> None:
    before = image_server.hits["/status-500"]
    policy = policy_for(
        ["127.0.0.1"], max_image_bytes=10**6, fetch_deadline=1.3, fetch_retries=10, fetch_backoff=0.3
    )  # alone, the pauses would add up to 0.3 x (2^10 - 1) s; the third attempt starts at ~0.9 s, 0.4 s left
    error, took = timed_error(image_server.url("/status-500"), policy)
    assert isinstance(error, FetchFailed) and "HTTP 500" in error.message
    assert took < 1.3 + MARGIN
    assert 2 <= image_server.hits["/status-500"] - before <= 3  # 0.3 s and 0.6 s pauses fit; 1.2 s does not


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never says a word (a TLS handshake against it waits for ever)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    for sock in accepted:
        sock.close()
    listener.close()


def test_a_stalled_tls_handshake_ends_at_the_budget(silent_server: int) -> None:
    policy = policy_for(["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=30, fetch_deadline=1.0)
    error, took = timed_error(f"https://127.0.0.1:{silent_server}/x.png", policy)
    assert isinstance(error, FetchFailed) and "fetch_deadline" in error.message
    assert took < 1.0 + MARGIN


@pytest.fixture
def dripping_handshake_server() -> Iterator[int]:
    """A TCP server that reads the client's hello, then answers with a TLS record one byte every 0.2 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as client:
            client.recv(65536)
            for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 16000:  # a handshake record, never complete
                if stop.wait(0.2):
                    return
                client.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(5)


def test_a_dripped_tls_handshake_ends_at_the_budget(dripping_handshake_server: int) -> None:
    # every byte comes well within the per-read timeout; the handshake as a whole is what is bounded
    policy = policy_for(
        ["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=30, fetch_deadline=1.0, fetch_retries=0
    )
    error, took = timed_error(f"https://127.0.0.1:{dripping_handshake_server}/x.png", policy)
    assert isinstance(error, FetchFailed) and "fetch_deadline" in error.message
    assert took < 1.0 + MARGIN


def test_abort_ends_running_fetches_at_once_and_refuses_new_ones(image_server: ImageServer) -> None:
    registry = FetchRegistry()
    policy = policy_for(["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=5, fetch_deadline=60)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fetch(image_server.url("/drip-headers"), policy, registry=registry)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    before = image_server.hits["/drip-headers"]  # the server is the session's: other tests' hits count too
    for thread in threads:
        thread.start()
    wait_for(lambda: image_server.hits["/drip-headers"] >= before + 3, 10, "the three requests to reach it")
    assert registry.abort() == 3
    for thread in threads:
        thread.join(MARGIN)
    assert not any(thread.is_alive() for thread in threads)
    assert len(errors) == 3 and all(isinstance(error, FetchAborted) for error in errors)
    with pytest.raises(FetchAborted):
        fetch(image_server.url("/good.png"), policy, registry=registry)


# -- https: the same budget and abort once the TLS socket carries the response ------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageServer, Path]]:
    """The hostile server over TLS, with its self-signed certificate (the CA file a fetch must trust)."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ImageServer(tls=context).start()
    yield server, cert
    server.stop()


@pytest.fixture
def https_server(tls_server: tuple[ImageServer, Path], monkeypatch: pytest.MonkeyPatch) -> ImageServer:
    """The TLS server, its certificate trusted the way operators add a CA: ``SSL_CERT_FILE`` (fetch keeps
    its production TLS settings: certificate and host name required)."""
    server, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return server


def test_https_fetch_verifies_the_certificate(
    https_server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fetch(https_server.url("/good.png"), POLICY) == GOOD_PNG
    monkeypatch.delenv("SSL_CERT_FILE")
    error = fetch_error(https_server.url("/good.png"))  # an untrusted certificate is refused
    assert isinstance(error, FetchFailed) and "TLS error" in error.message


def test_https_headers_dripped_byte_by_byte_end_at_the_fetch_deadline(https_server: ImageServer) -> None:
    policy = policy_for(
        ["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=5, fetch_deadline=1.5, fetch_retries=3
    )
    error, took = timed_error(https_server.url("/drip-headers"), policy)
    assert isinstance(error, FetchFailed) and "1.5 s (fetch_deadline)" in error.message
    assert 1.5 <= took < 1.5 + MARGIN


def test_abort_ends_a_running_https_fetch_at_once(https_server: ImageServer) -> None:
    registry = FetchRegistry()
    policy = policy_for(["127.0.0.1"], max_image_bytes=10**6, fetch_timeout=5, fetch_deadline=60)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fetch(https_server.url("/drip-headers"), policy, registry=registry)
        except BaseException as exc:
            errors.append(exc)

    before = https_server.hits["/drip-headers"]
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while https_server.hits["/drip-headers"] == before and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the request to reach the server (TLS handshake done)
    assert registry.abort() == 1
    thread.join(MARGIN)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], FetchAborted)


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/x.png", "http:///x.png"])
def test_unparsable_urls_are_invalid_requests(url: str) -> None:
    error = fetch_error(url)
    assert isinstance(error, InvalidRequest) and error.code == "invalid_request"


def test_redirect_to_an_unparsable_url_is_a_permanent_fetch_failure(image_server: ImageServer) -> None:
    error = fetch_error(image_server.url("/to-unparsable"))
    assert isinstance(error, FetchFailed) and not error.retryable
