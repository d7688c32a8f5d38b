"""The worker's HTTP endpoint (``LLAVA_METRICS_PORT``): exact paths routed to WSGI apps, served from one
asyncio thread.

prometheus-client's own server starts a thread per connection and never times one out, so idle connections
pile up threads without bound. Here a connection costs no thread: the event loop reads each request head
within a wall-clock bound (``head_timeout``: a client sending one byte a second is dropped as surely as a
silent one), answers within another (``answer_timeout``), keeps at most ``max_connections`` open (a new one
pushes out the oldest, so a scrape still gets in while idle clients hold the rest), and runs the apps on a
small thread pool through the stdlib's WSGI gateway, so prometheus-client's WSGI app serves its exposition
unchanged (content negotiation, gzip, ``name[]`` filters). Every response closes its connection (HTTP/1.0).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote
from wsgiref.handlers import SimpleHandler

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
HEAD_LIMIT = 16 * 1024  # request line and headers; a scrape sends a few hundred bytes
BAD_REQUEST = b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Endpoint:
    """Serves ``routes`` (exact path -> WSGI app; other paths answer 404) from a daemon thread, with bounded
    threads (the loop's and ``workers``) and connections; :meth:`start` binds."""

    def __init__(
        self,
        routes: Mapping[str, WSGIApp],
        *,
        head_timeout: float = 5.0,
        answer_timeout: float = 10.0,
        max_connections: int = 64,
        workers: int = 2,
    ) -> None:
        self.routes = dict(routes)
        self.head_timeout = head_timeout
        self.answer_timeout = answer_timeout
        self.max_connections = max_connections
        self.port = 0
        self._apps = ThreadPoolExecutor(workers, thread_name_prefix="endpoint-app")
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._apps)  # the bind's getaddrinfo too: no other threads
        # Open connections and their tasks, in insertion order: the oldest first.
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}
        self._answering: set[asyncio.StreamWriter] = set()  # connections whose request is being answered
        self._server: asyncio.Server | None = None

    def start(self, address: str, port: int, timeout: float = 30.0) -> Endpoint:
        """Bind ``address:port`` (port 0: a free one, then in :attr:`port`) and serve; raises ``OSError`` when
        it cannot bind."""
        threading.Thread(target=self._run, name="endpoint", daemon=True).start()
        try:
            bind = asyncio.run_coroutine_threadsafe(self._bind(address, port), self._loop)
            self.port = bind.result(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop listening, drop the open connections, end the thread (within ``answer_timeout``)."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(self.answer_timeout + 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._apps.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _bind(self, address: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._connection, address, port, limit=HEAD_LIMIT, backlog=128
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._open.values())
        for writer in list(self._open):
            writer.transport.abort()
        if tasks:  # each ends at once, or once its app returns (answer_timeout)
            await asyncio.wait(tasks, timeout=self.answer_timeout)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection callback always runs as a task
        if len(self._open) >= self.max_connections and not self._make_room():
            writer.transport.abort()  # every connection is being answered: this one waits for none
            return
        self._open[writer] = task
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
            self._answering.add(writer)
            await asyncio.wait_for(self._answer(head, writer), self.answer_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            log.debug("endpoint: connection dropped: %r", exc)
        finally:
            self._open.pop(writer, None)
            self._answering.discard(writer)
            writer.transport.abort()  # a no-op after a clean close; never lingers on a client that won't read

    def _make_room(self) -> bool:
        """Drop the oldest connection still waiting for its request (an answer under way is never cut
        short: a flood of new connections must not starve every scrape); False when none waits."""
        for oldest in self._open:
            if oldest not in self._answering:
                # Aborting (not cancelling: Python 3.11's stream callback logs a cancelled task as an
                # error) ends its read with an error its task handles.
                del self._open[oldest]
                oldest.transport.abort()
                return True
        return False

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        environ = _environ(head, writer.get_extra_info("sockname"))
        if environ is None:
            response = BAD_REQUEST
        else:
            app = self.routes.get(environ["PATH_INFO"], _not_found)
            response = await asyncio.get_running_loop().run_in_executor(self._apps, _respond, app, environ)
        writer.write(response)
        await writer.drain()
        writer.close()
        await writer.wait_closed()


def _environ(head: bytes, sockname: tuple[Any, ...]) -> dict[str, Any] | None:
    """The WSGI environ (PEP 3333) of a request head, or None if it is not an HTTP request."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target, protocol = parts
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        return None
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, "latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": str(sockname[0]),
        "SERVER_PORT": str(sockname[1]),
        "SERVER_PROTOCOL": protocol,
    }
    for name in set(headers.keys()):
        environ["HTTP_" + name.upper().replace("-", "_")] = ",".join(headers.get_all(name, []))
    return environ


class _Gateway(SimpleHandler):
    """The stdlib's WSGI gateway writing one whole response; an app's error is logged, answered 500."""

    def log_exception(self, exc_info: Any) -> None:
        log.error("endpoint: an app failed", exc_info=exc_info)


def _respond(app: WSGIApp, environ: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    _Gateway(io.BytesIO(), out, sys.stderr, environ, multithread=True, multiprocess=False).run(app)
    return out.getvalue()


def _not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"Not Found\n"]
