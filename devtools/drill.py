"""The failover drill (``make drill``): a Redis primary, a replica and three Sentinels on free loopback ports
(:mod:`devtools.sentinel`), one tiny-model worker and a producer on them through ``sentinel://`` URLs, caption
jobs with inline images at a steady rate, and the primary disrupted part-way: SIGKILLed, or hung
(``DEBUG SLEEP``) until the Sentinels promote the replica.

    python -m devtools.drill [--jobs 200] [--rate 4] [--after 50] [--scenarios kill,kill,hang] [--json F]

For each scenario it prints what was sent, answered (result or coded error, by code), lost (no answer within
the drill's bound), resent (sends refused with a retryable error, then sent again), duplicated runs (the
worker's job count above the jobs answered), whether the worker stayed up, and the outage: seconds from the
disruption to the promotion, and from the promotion to the first job answered after it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from devtools.devstack import TlsFiles, WorkerProcess, make_tls_files
from devtools.sentinel import MASTER, SentinelCluster
from producer import LlavaClient
from producer.app import worker_health
from producer.errors import LlavaError
from producer.settings import ClientSettings

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "stop_sign.jpg"
WAIT_CODES = frozenset({"broker_unavailable", "result_timeout"})  # the producer's own wait failed: wait again


@dataclass
class Report:
    """One scenario's figures."""

    scenario: str
    sent: int = 0
    answered: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    resent: int = 0
    duplicated_runs: int = 0
    worker_alive: bool = True
    down_to_promotion_s: float | None = None
    promotion_to_answer_s: float | None = None
    problems: list[str] = field(default_factory=list)  # what went wrong with the cluster itself


@dataclass
class _Clock:
    disrupted: float | None = None
    promoted: float | None = None
    answers: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self) -> None:
        with self.lock:
            self.answers.append(time.monotonic())


class Drill:
    """A cluster, a worker and a client; :meth:`scenario` runs one disruption under load."""

    def __init__(
        self,
        base: Path,
        job_timeout: float = 120.0,
        hang_s: float = 20.0,
        fork: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.base = base
        self.hang_s = hang_s  # how long a hung primary sleeps (the Sentinels promote after ~4 s)
        self.fork = fork  # the worker forked from a preloaded forkserver (WorkerProcess): the tests
        self.tls = tls  # Sentinels and servers on TLS only, client certificates required
        self.cluster = SentinelCluster(base / "cluster", tls=tls)
        self.job_timeout = job_timeout
        self.queue = f"drill-{uuid.uuid4().hex[:8]}"
        self.hostname = f"drill-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.worker: WorkerProcess | None = None
        self.client: LlavaClient | None = None

    def env(self) -> dict[str, str]:
        return {f"LLAVA_{name.upper()}": str(value) for name, value in self.settings_values().items()}

    def start(self, **worker_env: str) -> Drill:
        self.cluster.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_")} | self.env() | worker_env
        env["PYTHONPATH"] = str(ROOT)
        self.client = LlavaClient(ClientSettings(**self.settings_values(), result_timeout=self.job_timeout))
        args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--queues", self.queue]
        args += ["--hostname", self.hostname]
        self.worker = WorkerProcess(args, env, self.base / "worker.log", fork=self.fork).start()
        self.worker.wait_ready(self.client.app, self.hostname)
        return self

    def settings_values(self) -> dict[str, Any]:
        """The settings both sides run with (``env``: the same as ``LLAVA_*`` variables)."""
        values: dict[str, Any] = {
            "broker_url": self.cluster.url(0),
            "result_backend": self.cluster.url(1),
            "sentinel_master": MASTER,
        }
        if self.tls is not None:
            values |= {"sentinel_tls": "true", "sentinel_tls_ca": self.tls.ca}
            values |= {"sentinel_tls_cert": self.tls.cert, "sentinel_tls_key": self.tls.key}
        return values

    def stop(self) -> int | None:
        status = self.worker.stop() if self.worker is not None else None
        if self.client is not None:
            self.client.close()
        self.cluster.stop()
        return status

    def alive(self) -> bool:
        process = self.worker.process if self.worker is not None else None
        return process is not None and process.poll() is None

    def jobs_run(self, tries: int = 5) -> int:
        """Jobs the worker ran (done or failed), from its health; a pooled connection to a primary that is
        gone fails once, then the pool reconnects through the Sentinels."""
        assert self.client is not None
        for _ in range(tries - 1):
            try:
                info = worker_health(self.client.app, timeout=5.0, nodes=[self.hostname])
                break
            except (OSError, redis.RedisError):
                time.sleep(0.5)
        else:
            info = worker_health(self.client.app, timeout=5.0, nodes=[self.hostname])
        node = info.get(self.hostname, {})
        return int(node.get("jobs_done", 0)) + int(node.get("jobs_failed", 0))

    def scenario(self, kind: str, jobs: int, rate: float, after: int) -> Report:
        """Send ``jobs`` jobs at ``rate``/s, disrupt the primary (``kill`` or ``hang``) after ``after`` of
        them, wait for every answer (bounded), bring the old primary back as a replica."""
        assert self.client is not None
        report, clock = Report(kind), _Clock()
        runs_before = self.jobs_run()
        disruptor: threading.Thread | None = None
        with ThreadPoolExecutor(max_workers=32) as waiters:
            futures: list[Future[str | None]] = []
            sent: list[Any] = []
            for index in range(jobs):
                if index == after:
                    disruptor = threading.Thread(target=self._disrupt, args=(kind, clock), daemon=True)
                    disruptor.start()
                job, resends = self._send()
                report.resent += resends
                report.sent += job is not None
                if job is not None:
                    sent.append((job, time.monotonic()))
                    futures.append(waiters.submit(self._wait, job, clock))
                time.sleep(1 / rate)
            outcomes = [future.result() for future in futures]
            lost = [(job, at) for (job, at), outcome in zip(sent, outcomes, strict=True) if outcome is None]
            report.lost_ids = [f"{job.id} (sent {at - (clock.disrupted or at):+.2f} s)" for job, at in lost]
        if disruptor is not None:
            disruptor.join(timeout=120)
        report.answered = sum(outcome is not None for outcome in outcomes)
        report.lost = report.sent - report.answered + (jobs - report.sent)
        report.codes = dict(Counter(outcome for outcome in outcomes if outcome is not None))
        report.worker_alive = self.alive()
        report.duplicated_runs = max(0, self.jobs_run() - runs_before - report.answered)
        _outage(report, clock)
        return report

    def _send(self, bound: float = 60.0) -> tuple[Any, int]:
        """Send one caption job, again while the send fails with a retryable error (within ``bound``)."""
        assert self.client is not None
        deadline, resends = time.monotonic() + bound, 0
        while True:
            try:
                return self.client.caption(IMAGE, queue=self.queue, max_new_tokens=4), resends
            except LlavaError as exc:
                if not exc.retryable or time.monotonic() > deadline:
                    print(f"drill: a send failed for good: {exc.code}: {exc}", file=sys.stderr)
                    return None, resends
                resends += 1
                time.sleep(0.2)

    def _wait(self, job: Any, clock: _Clock) -> str | None:
        """The job's outcome (``ok`` or its error code); None when nothing came within the drill's bound."""
        deadline = time.monotonic() + self.job_timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                job.get(timeout=left)
            except LlavaError as exc:
                if exc.code in WAIT_CODES:
                    time.sleep(0.2)
                    continue
                clock.answered()
                return exc.code
            clock.answered()
            return "ok"
        return None

    def _disrupt(self, kind: str, clock: _Clock) -> None:
        clock.disrupted = time.monotonic()
        try:
            self._disrupt_primary(kind, clock)
        except Exception as exc:  # the cluster's own failure (no promotion, no rejoin): in the report
            clock.problems.append(f"{type(exc).__name__}: {exc}")

    def _disrupt_primary(self, kind: str, clock: _Clock) -> None:
        if kind == "kill":
            old = self.cluster.kill_primary()
            clock.promoted = self.cluster.wait_promotion(old.port)
            self.cluster.rejoin(old)
        else:
            old, sleeper = self.cluster.hang_primary(seconds=self.hang_s)
            clock.promoted = self.cluster.wait_promotion(old.port)
            sleeper.join(timeout=60)
            self.cluster.rejoin(old)


def _outage(report: Report, clock: _Clock) -> None:
    report.problems = list(clock.problems)
    if clock.disrupted is None or clock.promoted is None:
        return
    report.down_to_promotion_s = round(clock.promoted - clock.disrupted, 2)
    later = [moment for moment in clock.answers if moment > clock.promoted]
    if later:
        report.promotion_to_answer_s = round(min(later) - clock.promoted, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per scenario")
    parser.add_argument("--rate", type=float, default=4.0, help="jobs sent per second")
    parser.add_argument("--after", type=int, default=50, help="jobs sent before the disruption")
    parser.add_argument("--scenarios", default="kill,kill,hang", help="comma-separated: kill, hang")
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--tls", action="store_true", help="Sentinels and servers on TLS (a throwaway CA)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="llava-drill-"))
    drill = Drill(base, tls=make_tls_files(base / "tls") if args.tls else None)
    reports = []
    try:
        drill.start()
        for kind in args.scenarios.split(","):
            reports.append(drill.scenario(kind, args.jobs, args.rate, args.after))
            print(json.dumps(asdict(reports[-1])), flush=True)
    finally:
        status = drill.stop()
    if args.json:
        args.json.write_text(json.dumps([asdict(report) for report in reports], indent=2))
    failed = any(r.lost or not r.worker_alive for r in reports) or status not in (0, None)
    print(f"drill: {'FAILED' if failed else 'passed'} (worker exit status {status}; files: {drill.base})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
