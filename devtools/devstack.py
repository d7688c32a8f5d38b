"""A throwaway local stack for the demo, the tests and the benchmarks: redis-server and worker processes.

    python -m devtools.devstack -- COMMAND [ARGS...]

runs COMMAND with ``LLAVA_BROKER_URL``/``LLAVA_RESULT_BACKEND`` pointing at a Redis that answers: the one
already configured if it replies to PING, otherwise a ``redis-server`` started here on a free port (AOF on,
``noeviction``) and stopped afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: sudo apt-get install redis-server; "
    "macOS: brew install redis) or point LLAVA_BROKER_URL at a running Redis."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and one certificate it signed for 127.0.0.1 (servers and clients alike), for TLS tests:
    :func:`make_tls_files`."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self) -> tuple[str, ...]:
        """redis-server's TLS options: clients must show a certificate of this CA, replicas use TLS."""
        return (
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-replication", "yes", "--tls-auth-clients", "yes",
        )  # fmt: skip

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
        }


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA and a certificate for 127.0.0.1 in ``folder``, made with the ``openssl`` command (two days)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "redis.crt", folder / "redis.key")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=llava-test-ca -keyout ca.key -out {files.ca}",
        f"req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {files.key} -out redis.csr",
        f"x509 -req -days 2 -in redis.csr -CA {files.ca} -CAkey ca.key -CAcreateserial -extfile san.ext "
        f"-out {files.cert}",
    ):
        subprocess.run(["openssl", *command.split()], cwd=folder, check=True, capture_output=True, timeout=60)
    return files


class RedisServer:
    """A ``redis-server`` on a free port with its own data dir; stop, kill and restart it (AOF keeps data).
    ``tls``: it listens with TLS only, on that port."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="llava-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra  # more redis-server arguments (a replica's --replicaof, say)
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/{db}"
        files = self.tls
        query = f"ssl_cert_reqs=required&ssl_ca_certs={files.ca}&ssl_certfile={files.cert}"
        return f"rediss://127.0.0.1:{self.port}/{db}?{query}&ssl_keyfile={files.key}"

    def _listen(self) -> tuple[str, ...]:
        if self.tls is None:
            return ("--port", str(self.port))
        return ("--port", "0", "--tls-port", str(self.port), *self.tls.server_args())

    def start(self, timeout: float = 10.0) -> RedisServer:
        command = [
            self.binary,
            *self._listen(), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no", *self.extra,
        ]  # fmt: skip
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115  (kept open for the child)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url(), timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {log.name}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


# What a worker imports before it reads its settings (torch, transformers' LLaVA-NeXT classes, Celery): ~5 s
# of CPU per start, paid once by the forkserver that ``WorkerProcess(fork=True)`` forks workers from.
PRELOAD = ["torch", "transformers", "worker.cli", "worker.app", "worker.service", "worker.runtime.loading"]
# Coverage measures a subprocess from its start (``patch = ["subprocess"]``), not a fork of a preloaded one.
_COVERAGE_VARIABLES = ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")


class ForkedWorker:
    """The part of ``subprocess.Popen`` that ``WorkerProcess`` and the tests use, for ``python -m MODULE
    ARGS`` forked from a forkserver that has imported ``PRELOAD``: ``pid``, ``poll``, ``wait``,
    ``send_signal``, ``kill``, ``returncode`` (negative: the signal that ended it, as with ``Popen``)."""

    _started: list[ForkedWorker] = []

    def __init__(self, module: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self.args = [module, *args]
        self._process = context.Process(target=_serve_forked, args=(module, args, env, str(log_path)))
        self._process.start()
        self.pid: int = self._process.pid  # type: ignore[assignment]
        self._returncode: int | None = None
        if not ForkedWorker._started:
            atexit.register(ForkedWorker._kill_all)  # before multiprocessing waits for its children at exit
        ForkedWorker._started.append(self)

    @staticmethod
    def usable(env: dict[str, str]) -> bool:
        """A fork serves the worker as a subprocess would when nothing it imported at preload time could
        have read a different environment: outside ``LLAVA_*`` (read at start) and ``PYTHONPATH`` (the
        forkserver has this process's ``sys.path``), ``env`` is this process's environment."""
        if any(name in os.environ for name in _COVERAGE_VARIABLES):
            return False
        ignored = ("LLAVA_", "PYTHONPATH")
        own = {key: value for key, value in os.environ.items() if not key.startswith(ignored)}
        return own == {key: value for key, value in env.items() if not key.startswith(ignored)}

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        if self._returncode is None and self._process.exitcode is not None:
            self._returncode = self._process.exitcode
            self._process.close()  # its sentinel and pipe to the forkserver
            ForkedWorker._started.remove(self)
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._returncode is None:
            self._process.join(timeout)
        returncode = self.poll()
        if returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # The forkserver, its parent, reaps it and reports its status a moment later: in between, the
            # pid is gone while poll() still says it runs.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @classmethod
    def _kill_all(cls) -> None:
        for worker in list(cls._started):
            worker.kill()


def _serve_forked(module: str, args: list[str], env: dict[str, str], log_path: str) -> None:
    """The forked process: its output to ``log_path``, its own environment, then what ``python -m MODULE
    ARGS`` runs; at the end, what the interpreter would run at exit (logging's flush)."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]
    # runpy warns that the preloaded module is imported already; it runs a fresh copy as __main__ all the same
    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning, "runpy")
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()


class WorkerProcess:
    """``python -m MODULE ARGS`` (``llava-worker``: ``worker.cli``) as a subprocess with its own environment
    and log file; ``fork=True``: forked from a preloaded forkserver when ``ForkedWorker.usable`` (the tests:
    ~5 s of CPU less per start), else a new interpreter."""

    module = "worker.cli"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, fork: bool = False) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.fork = fork
        self.process: subprocess.Popen[bytes] | ForkedWorker | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        if self.fork and ForkedWorker.usable(self.env):
            self.process = ForkedWorker(self.module, self.args, self.env, self.log_path)
            return self
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        command = [sys.executable, "-m", self.module, *self.args]
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, app: Any, hostname: str, timeout: float = 120.0) -> None:
        """Wait until the worker answers a ping (its model is loaded by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if app.control.ping(destination=[hostname], timeout=0.5):
                return
        raise RuntimeError(f"worker {hostname} not ready after {timeout} s:\n{self.log_tail()}")

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` if the process still runs (``stop`` then waits for it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send ``sig`` and wait up to ``timeout`` seconds (then SIGKILL); returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode


def stop_all(workers: list[WorkerProcess], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Stop ``workers`` together: signal them all first, then wait for them within one ``timeout`` in all
    (their shutdowns overlap); those still running then are killed."""
    for worker in workers:
        worker.send_signal(sig)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.stop(sig, max(deadline - time.monotonic(), 0.0))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    env = dict(os.environ)
    broker = env.setdefault("LLAVA_BROKER_URL", "redis://localhost:6379/0")
    server = None
    if not broker.startswith("redis") or redis_answers(broker):
        print(f"devstack: using the broker at {broker}", file=sys.stderr)
    else:
        try:
            server = RedisServer().start()
        except RuntimeError as exc:
            print(f"devstack: {exc}", file=sys.stderr)
            return 3
        env["LLAVA_BROKER_URL"], env["LLAVA_RESULT_BACKEND"] = server.url(0), server.url(1)
        print(
            f"devstack: nothing answered at {broker}; started redis-server on {server.url()}", file=sys.stderr
        )
    try:
        return subprocess.call(args, env=env)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
