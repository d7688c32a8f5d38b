"""worker.fetch against a hostile HTTP server on loopback (allowed with 127.0.0.1/32, as operators would)."""

from __future__ import annotations

import time

import pytest

from producer.errors import FetchFailed, FetchForbidden, ImageTooLarge, LlavaError
from tests.integration.image_server import GOOD_PNG, ImageServer
from worker.fetch import FetchPolicy, fetch

POLICY = FetchPolicy.from_allow_list(
    ["127.0.0.1/32"], max_bytes=1_000_000, timeout=1.0, deadline=1.5, max_redirects=3, retries=2, backoff=0.05
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
    error = fetch_error(image_server.url("/good.png"), FetchPolicy(max_bytes=1_000_000))
    assert isinstance(error, FetchForbidden) and "loopback" in error.message
    assert image_server.hits["/good.png"] == before  # refused before connecting


def test_slow_drip_hits_the_deadline(image_server: ImageServer) -> None:
    error = fetch_error(
        image_server.url("/drip"),
        FetchPolicy.from_allow_list(["127.0.0.1"], max_bytes=10**6, deadline=0.5, retries=0),
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
    from worker.devstack import free_port

    error = fetch_error(f"http://127.0.0.1:{free_port()}/x.png")
    assert isinstance(error, FetchFailed) and error.retryable
