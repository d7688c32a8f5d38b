"""The worker's metrics endpoint (``serve_metrics``, ``worker.endpoint.Endpoint``) over real loopback sockets,
in this process: idle and slow clients cost no thread and are dropped, ``/metrics`` keeps answering."""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack import free_port
from worker.endpoint import Endpoint
from worker.metrics import serve_metrics

IDLE_CONNECTIONS = 300


class HealthyService:
    """What ``HealthCollector`` reads at each scrape: ``Service.health()``."""

    def health(self) -> dict[str, Any]:
        return {"model_loaded": True, "loads": 1, "model": "tiny", "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def metrics_port() -> Iterator[int]:
    """The worker's own ``serve_metrics`` on the global registry (once per process: it registers there)."""
    port = free_port()
    endpoint = serve_metrics(port, HealthyService(), "127.0.0.1")  # type: ignore[arg-type]
    yield port
    endpoint.close()


def _served(head_timeout: float) -> Endpoint:
    registry = CollectorRegistry()
    Counter("scrapes_seen", "a counter to find in the page", registry=registry).inc()
    routes = {"/metrics": make_wsgi_app(registry), "/boom": _failing_app}
    return Endpoint(routes, head_timeout=head_timeout, max_connections=4).start("127.0.0.1", 0)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    """An endpoint with short timeouts and four connections at most, serving a registry of its own."""
    served = _served(head_timeout=0.5)
    yield served
    served.close()


@pytest.fixture
def patient_endpoint() -> Iterator[Endpoint]:
    """The same, waiting 60 s for a request: a connection it drops was dropped for room, not for silence."""
    served = _served(head_timeout=60.0)
    yield served
    served.close()


def _failing_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    raise RuntimeError("the app broke")


def get(port: int, path: str = "/metrics", **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def samples(body: bytes) -> dict[str, float]:
    families = text_string_to_metric_families(body.decode())
    return {sample.name: sample.value for family in families for sample in family.samples}


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server ends ``sock`` within ``timeout`` s (end of stream or reset, no data)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_hundreds_of_idle_connections_cost_no_thread_and_metrics_still_answer(metrics_port: int) -> None:
    status, _, body = get(metrics_port)  # the app threads exist from here on
    assert status == 200 and samples(body)["llava_model_loaded"] == 1
    threads = threading.active_count()
    idle = [
        socket.create_connection(("127.0.0.1", metrics_port), timeout=10) for _ in range(IDLE_CONNECTIONS)
    ]
    try:
        assert threading.active_count() <= threads + 2  # prometheus-client's server: one more per connection
        status, _, body = get(metrics_port)
        assert status == 200 and samples(body)["llava_model_loads_total"] == 1
        assert threading.active_count() <= threads + 2
    finally:
        for sock in idle:
            sock.close()


def test_a_silent_client_is_dropped_after_the_head_timeout(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as sock:
        assert closed_by_server(sock)


def test_a_client_trickling_its_request_is_dropped_within_the_head_timeout(endpoint: Endpoint) -> None:
    """A per-read timeout would keep this client forever: one byte every 50 ms, for up to 30 s."""
    trickle = b"GET /metrics HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 600
    dropped = False
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as sock:
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # broken pipe or reset: the server closed it
                dropped = True
                break
            time.sleep(0.05)
    assert dropped


def test_a_new_connection_pushes_out_the_oldest_idle_one_beyond_the_cap(patient_endpoint: Endpoint) -> None:
    endpoint = patient_endpoint
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) for _ in range(4)]
    try:
        status, _, body = get(endpoint.port)  # the fifth connection: the first idle one makes room
        assert status == 200 and samples(body)["scrapes_seen_total"] == 1
        assert closed_by_server(idle[0])
        idle[3].setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, waiting for its request
            idle[3].recv(1)
    finally:
        for sock in idle:
            sock.close()


def test_prometheus_clients_exposition_is_served_unchanged(endpoint: Endpoint) -> None:
    status, headers, body = get(
        endpoint.port, "/metrics?name[]=scrapes_seen_total", **{"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert samples(gzip.decompress(body)) == {"scrapes_seen_total": 1}
    status, headers, body = get(endpoint.port, Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_unknown_paths_bad_requests_and_failing_apps_get_an_http_error(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    assert get(endpoint.port, "/")[0] == 404
    assert get(endpoint.port, "/metrics/extra")[0] == 404
    with caplog.at_level(logging.ERROR, logger="worker.endpoint"):
        assert get(endpoint.port, "/boom")[0] == 500
    assert "the app broke" in caplog.text
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as sock:
        sock.sendall(b"not http at all\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.0 400 ")


def test_a_port_in_use_is_an_os_error_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            Endpoint({}).start("127.0.0.1", taken.getsockname()[1])
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - before
