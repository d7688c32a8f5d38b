"""A Redis primary, one replica and three Sentinels on free loopback ports, for the failover drill and its
tests: kill or hang the primary, wait for the Sentinels to promote the replica, bring the old primary back
as the new one's replica.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import redis

from devtools.devstack import RedisServer, TlsFiles, free_port

MASTER = "llava"  # the master (service) name the Sentinels monitor: LLAVA_SENTINEL_MASTER
QUORUM = 2
_DEBUG = ("--enable-debug-command", "local")  # DEBUG SLEEP: a primary that hangs


class SentinelCluster:
    """``start()``, then ``url(db)`` for ``LLAVA_BROKER_URL``/``LLAVA_RESULT_BACKEND`` with
    ``LLAVA_SENTINEL_MASTER=MASTER``. ``down_after_ms``: how long a silent primary is taken for alive."""

    def __init__(self, base: Path, down_after_ms: int = 2000, tls: TlsFiles | None = None) -> None:
        self.base = base
        self.down_after_ms = down_after_ms
        self.tls = tls  # every server and Sentinel listens with TLS only, and asks clients for a certificate
        first = RedisServer(base / "redis-a", extra=_DEBUG, tls=tls)
        replica_of = ("--replicaof", "127.0.0.1", str(first.port))
        second = RedisServer(base / "redis-b", extra=(*_DEBUG, *replica_of), tls=tls)
        self.servers = {first.port: first, second.port: second}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self._first = first.port

    def url(self, db: int = 0) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/{db}" for port in self.sentinel_ports)

    def start(self, timeout: float = 30.0) -> SentinelCluster:
        for server in self.servers.values():
            server.start()
        for port in self.sentinel_ports:
            self.sentinels.append(self._start_sentinel(port))
        deadline = time.monotonic() + timeout
        while not self.settled():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinel cluster did not settle within {timeout} s ({self.base})")
            time.sleep(0.1)
        return self

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        folder = self.base / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        listen = f"port {port}\n"
        if self.tls is not None:
            options = self.tls.server_args()
            listen = f"port 0\ntls-port {port}\n" + "".join(
                f"{name[2:]} {value}\n" for name, value in zip(options[::2], options[1::2], strict=True)
            )
        (folder / "sentinel.conf").write_text(
            f"{listen}bind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self._first} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 3000\n"
        )
        log = open(folder / "sentinel.log", "ab")  # noqa: SIM115  (kept open for the child)
        binary = shutil.which("redis-server") or "redis-server"
        command = [binary, str(folder / "sentinel.conf"), "--sentinel"]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _ask(self, port: int, *command: str) -> object:
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        client = redis.Redis("127.0.0.1", port, socket_timeout=0.5, socket_connect_timeout=0.5, **tls)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def primary_port(self, sentinel: int = 0) -> int | None:
        """The primary's port as one Sentinel sees it (None: it does not answer)."""
        try:
            reply = self._ask(self.sentinel_ports[sentinel], "SENTINEL", "get-master-addr-by-name", MASTER)
        except (redis.RedisError, OSError):
            return None
        return int(reply[1]) if isinstance(reply, list | tuple) else None

    def _sentinels_agree(self) -> bool:
        seen = {self.primary_port(index) for index in range(len(self.sentinel_ports))}
        return len(seen) == 1 and None not in seen and self._role(seen.pop() or 0) == "master"

    def settled(self) -> bool:
        """Ready for a failover: the Sentinels name one primary, know each other and a replica in sync."""
        if not (self._sentinels_agree() and self._replica_in_sync()):
            return False
        try:
            for port in self.sentinel_ports:
                replicas = self._ask(port, "SENTINEL", "replicas", MASTER)
                peers = self._ask(port, "SENTINEL", "sentinels", MASTER)
                if not (isinstance(replicas, list) and isinstance(peers, list)) or len(peers) < 2:
                    return False
                if not any(isinstance(r, dict) and r.get(b"flags") == b"slave" for r in replicas):
                    return False
        except (redis.RedisError, OSError):
            return False
        return True

    def _role(self, port: int) -> str | None:
        try:
            reply = self._ask(port, "ROLE")
        except (redis.RedisError, OSError):
            return None
        return reply[0].decode() if isinstance(reply, list) else None

    def _replica_in_sync(self) -> bool:
        primary = self.primary_port()
        replicas = [port for port in self.servers if port != primary]
        try:
            info = [self._ask(port, "INFO", "replication") for port in replicas]
        except (redis.RedisError, OSError):
            return False
        return all(b"master_link_status:up" in bytes(text) for text in info if isinstance(text, bytes))

    def primary(self) -> RedisServer:
        port = self.primary_port()
        if port is None:
            raise RuntimeError("no Sentinel names a primary")
        return self.servers[port]

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (no AOF flush, no goodbye): the Sentinels notice after ``down_after_ms``."""
        primary = self.primary()
        primary.stop(signal.SIGKILL)
        return primary

    def hang_primary(self, seconds: float) -> tuple[RedisServer, threading.Thread]:
        """``DEBUG SLEEP seconds`` on the primary: it accepts connections and answers nothing meanwhile."""
        primary = self.primary()
        thread = threading.Thread(
            target=self._ask_quietly, args=(primary.port, "DEBUG", "SLEEP", str(seconds)), daemon=True
        )
        thread.start()
        return primary, thread

    def _ask_quietly(self, port: int, *command: str) -> None:
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        client = redis.Redis("127.0.0.1", port, socket_timeout=None, **tls)
        try:
            client.execute_command(*command)
        except (redis.RedisError, OSError):
            pass
        finally:
            client.close()

    def wait_promotion(self, old: int, timeout: float = 30.0) -> float:
        """Wait until every Sentinel names a primary other than port ``old`` that says it is one; returns
        ``time.monotonic()`` then."""
        deadline = time.monotonic() + timeout
        while True:
            ports = {self.primary_port(index) for index in range(len(self.sentinel_ports))}
            settled = len(ports) == 1 and old not in ports and None not in ports
            if settled and self._role(ports.pop() or 0) == "master":
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no primary promoted within {timeout} s of losing port {old}")
            time.sleep(0.05)

    def rejoin(self, server: RedisServer, timeout: float = 60.0) -> None:
        """Bring ``server`` (a killed old primary) back; the Sentinels make it the new primary's replica."""
        if server.process is None:
            server.extra = (*_DEBUG, "--replicaof", "127.0.0.1", str(self.primary().port))  # tls kept
            server.start()
        deadline = time.monotonic() + timeout
        while not (self._role(server.port) == "slave" and self.settled()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {server.port} did not rejoin as a replica within {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        self.sentinels.clear()
        for server in self.servers.values():
            server.stop()
