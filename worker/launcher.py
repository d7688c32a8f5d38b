"""``llava-worker --gpus all|0,2``: one worker process per GPU, supervised. Never imports torch.

CUDA and fork do not mix, and one process per GPU keeps a crash to one GPU: the parent finds the GPUs
(``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``), starts ``python -m worker.cli`` once per GPU with
``CUDA_VISIBLE_DEVICES=<index>`` set before torch is imported and the node name ``gpu<index>@%h``, restarts a
child that crashes (exponential backoff), forwards SIGTERM/SIGINT (warm shutdown) and exits when every child
has exited. With metrics on, each child serves them on ``LLAVA_METRICS_PORT`` + its GPU index. ``--device
cpu`` with ``--gpus 0,1`` runs one CPU process per index under the same names: how the tests exercise the
launcher without GPUs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("llava.launcher")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a child that ran this long starts its backoff afresh after a crash


class LaunchError(RuntimeError):
    """The GPUs asked for cannot be found."""


def discover_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """GPU indices: from ``CUDA_VISIBLE_DEVICES`` if set, else one per ``nvidia-smi -L`` line."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        listing = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def select_gpus(spec: str, environ: dict[str, str] | None = None) -> list[str]:
    """``all`` -> every GPU found (an error if none); ``0,2`` -> those indices; ``none`` -> []."""
    if spec == "none":
        return []
    if spec == "all":
        found = discover_gpus(environ)
        if not found:
            raise LaunchError("--gpus all: no GPU found (no CUDA_VISIBLE_DEVICES, nvidia-smi lists none)")
        return found
    return [gpu.strip() for gpu in spec.split(",")]


def next_backoff(previous: float, ran_for: float) -> float:
    """Pause before restarting a crashed child: doubling, capped, reset after a stable run."""
    if ran_for >= STABLE_AFTER_S or previous <= 0:
        return BACKOFF_FIRST_S
    return min(previous * 2, BACKOFF_MAX_S)


def child_env(gpu: str, metrics_port: int | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: its GPU only (set before it imports torch) and, when metrics are on, its own
    metrics port (the base port + the GPU index)."""
    environ = os.environ if environ is None else environ
    env = {key: value for key, value in environ.items() if key != "LLAVA_GPUS"}
    env["CUDA_VISIBLE_DEVICES"] = gpu
    if metrics_port is not None:
        env["LLAVA_METRICS_PORT"] = str(metrics_port + int(gpu))
    return env


@dataclass
class _Child:
    gpu: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None
    restarts: int = field(default=0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("gpu%s: started worker pid %d", self.gpu, self.process.pid)


class Supervisor:
    """Starts one child per GPU and keeps them running until told to stop."""

    def __init__(
        self,
        gpus: list[str],
        child_args: list[str],
        python: str = sys.executable,
        metrics_port: int | None = None,
    ) -> None:
        self.children = [
            _Child(
                gpu,
                [python, "-m", "worker.cli", *child_args, "--hostname", f"gpu{gpu}@%h"],
                child_env(gpu, metrics_port),
            )
            for gpu in gpus
        ]
        self.stopping = False

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for child in self.children:
            child.start()
        codes: dict[str, int] = {}
        while len(codes) < len(self.children):
            for child in self.children:
                self._tend(child, codes)
            time.sleep(0.2)
        return 0 if all(code == 0 for code in codes.values()) else 1

    def _tend(self, child: _Child, codes: dict[str, int]) -> None:
        if child.gpu in codes:
            return
        now = time.monotonic()
        if child.restart_at is not None:
            if self.stopping:
                codes[child.gpu] = 0
            elif now >= child.restart_at:
                child.restarts += 1
                child.start()
            return
        code = child.process.poll() if child.process is not None else None
        if code is None:
            return
        if self.stopping or code == 0:
            codes[child.gpu] = code
            log.info("gpu%s: worker exited with %d", child.gpu, code)
            return
        child.backoff = next_backoff(child.backoff, now - child.started)
        child.restart_at = now + child.backoff
        log.warning("gpu%s: worker died (exit %d); restarting in %.0f s", child.gpu, code, child.backoff)


def launch(gpus: list[str], child_args: list[str], metrics_port: int | None = None) -> int:
    """Run one supervised worker per GPU (metrics on ``metrics_port`` + GPU index); returns the status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("one worker per GPU: %s", ", ".join(f"gpu{g}" for g in gpus))
    return Supervisor(gpus, child_args, metrics_port=metrics_port).run()
