"""A hostile little HTTP(S) server on loopback for the image-fetching tests (threaded, counts hits)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

GOOD_PNG = (Path(__file__).resolve().parents[2] / "examples" / "images" / "radar_chart.png").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ImageServer

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Connection": "close", **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True

    def _send(self, status: int, body: bytes, content_type: str = "image/png", **extra: str) -> None:
        self._head(status, {"Content-Type": content_type, "Content-Length": str(len(body)), **extra})
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.server.hits[path] += 1
        route = getattr(self, "route_" + path.strip("/").replace("-", "_").replace(".", "_"), None)
        if route is None:
            self._send(404, b"not found", "text/plain")
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            route()

    def route_good_png(self) -> None:
        self._send(200, GOOD_PNG)

    def route_html_png(self) -> None:
        self._send(200, b"<!doctype html><html><body>not an image</body></html>")

    def route_status_500(self) -> None:
        self._send(500, b"boom", "text/plain")

    def route_flaky(self) -> None:  # 500 twice, then the image
        if self.server.hits["/flaky"] <= 2:
            self._send(503, b"busy", "text/plain")
        else:
            self._send(200, GOOD_PNG)

    def route_drip(self) -> None:
        self._head(200, {"Content-Type": "image/png", "Content-Length": "1000000"})
        for _ in range(10_000):
            self.wfile.write(b"\x89")
            self.wfile.flush()
            time.sleep(0.05)

    def route_drip_headers(self) -> None:  # the status line and headers, one byte every 0.3 s, for minutes
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n"
        for byte in head:
            if self.server.stopping.wait(self.server.drip_pause):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
        self.close_connection = True

    def route_huge_length(self) -> None:
        self._head(200, {"Content-Type": "image/png", "Content-Length": str(10**10)})
        self.wfile.write(GOOD_PNG)

    def route_lying_length(self) -> None:  # says 100 bytes, sends far more: only 100 are read
        self._head(200, {"Content-Type": "image/png", "Content-Length": "100"})
        self.wfile.write(GOOD_PNG + b"\0" * 3_000_000)

    def route_no_length(self) -> None:  # no Content-Length, closes when done: bytes must be counted
        self._head(200, {"Content-Type": "image/png"})
        for _ in range(100):
            self.wfile.write(b"\0" * 65536)

    def route_endless(self) -> None:
        self._head(200, {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
        chunk = b"\0" * 65536
        for _ in range(100_000):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def route_loop(self) -> None:
        self._send(302, b"", "text/plain", Location="/loop")

    def route_to_metadata(self) -> None:
        self._send(302, b"", "text/plain", Location="http://169.254.169.254/latest/meta-data/")

    def route_to_unparsable(self) -> None:
        self._send(302, b"", "text/plain", Location="http://[::1/x.png")

    def route_to_good(self) -> None:
        self._send(301, b"", "text/plain", Location="/good.png")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for ``127.0.0.1`` (and ``localhost``) and its key, made by ``openssl``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    request = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost".split()
    names = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    command = ["openssl", *request, "-addext", names, "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tls = tls  # https: each connection's handshake runs in its handler thread, not in accept
        self.hits: Counter[str] = Counter()
        self.drip_pause = 0.3  # under every test's fetch_timeout: only a wall-clock budget stops it
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ssl.SSLError | ConnectionError):  # a client refusing our TLS
            super().handle_error(request, client_address)

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}{path}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
