"""The processor in a pool of processes (``preprocess_workers``), off the model thread's GIL.

Each child is started by the ``forkserver`` (never a fork of the worker, which holds torch and threads),
gets the worker's own processor object once (its initializer), runs torch on one thread, and turns an image
and a prompt text into the processor's tensors. Every wait ends by the job's deadline; a child that dies
fails the jobs it held with a coded error and the pool is rebuilt for the next job.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch
from PIL import Image

from producer.errors import InternalError, JobTimeout
from worker.runtime.loading import StartupError

log = logging.getLogger(__name__)

_processor: Any = None  # a child's processor (set by its initializer)


class PoolStopped(Exception):
    """The worker is shutting down: the job's preprocessing was abandoned (its job goes back to the queue)."""


def default_workers(cores: int | None = None) -> int:
    """``preprocess_workers`` when unset: none on 2 cores or fewer (the model and the pool would only take
    turns on them: bench/serving.py), else up to 4, leaving 2 cores to the model and the job threads."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 2)


def _adopt(processor: Any) -> None:
    """A child's initializer: keep the worker's processor, one torch thread."""
    global _processor
    torch.set_num_threads(1)
    _processor = processor


def _process(image: Image.Image, text: str) -> dict[str, np.ndarray]:
    inputs = _processor(images=[image], text=[text], return_tensors="pt")
    return {name: value.numpy() for name, value in inputs.items() if isinstance(value, torch.Tensor)}


class PreprocessPool:
    """``processes`` children running ``processor``; :meth:`__call__` takes the processor's arguments."""

    def __init__(self, processor: Any, processes: int) -> None:
        self.processor = processor
        self.processes = processes
        self.restarts = 0
        self.in_flight = 0  # jobs waiting on the pool
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        self._lock = threading.Lock()
        self._stopped: Future[None] = Future()  # done once the pool stops taking work (wakes every wait)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes, mp_context=self._context, initializer=_adopt, initargs=(self.processor,)
        )

    def start(self, timeout: float) -> PreprocessPool:
        """Start every child (each loads the processor) by running a small image through each."""
        started, image = time.monotonic(), Image.new("RGB", (64, 48))
        text = f"warm-up {self.processor.image_token}"
        warm = [self._executor.submit(_process, image, text) for _ in range(self.processes)]
        done, _ = wait(warm, timeout=timeout)
        failed = next((f.exception() for f in done if f.exception() is not None), None)
        if len(done) < len(warm) or failed is not None:
            reason = repr(failed) if failed else f"not ready within {timeout:g} s"
            raise StartupError(f"the preprocessing pool (preprocess_workers) did not start: {reason}")
        log.info("preprocessing pool: %d processes (%.1f s)", self.processes, time.monotonic() - started)
        return self

    def __call__(
        self, *, images: list[Image.Image], text: list[str], return_tensors: str, deadline: float
    ) -> dict[str, torch.Tensor]:
        """The processor's output for one image and text, computed in a child, by ``deadline``
        (``time.monotonic()``). Raises :class:`JobTimeout`, :class:`PoolStopped`, or :class:`InternalError`
        when the child running it died."""
        if return_tensors != "pt" or len(images) != 1 or len(text) != 1:
            raise ValueError("the preprocessing pool takes one image and one text, returns torch tensors")
        executor, future = self._submit(images[0], text[0])
        with self._lock:
            self.in_flight += 1
        try:
            remaining = max(0.0, deadline - time.monotonic())
            done, _ = wait([future, self._stopped], timeout=remaining, return_when=FIRST_COMPLETED)
        finally:
            with self._lock:
                self.in_flight -= 1
        if future not in done:
            future.cancel()
            if self._stopped.done():
                raise PoolStopped("the worker shut down while the job's image was being preprocessed")
            raise JobTimeout("the job's deadline passed while its image was being preprocessed")
        try:
            arrays = future.result()
        except BrokenProcessPool as exc:
            self._rebuild(executor, exc)
            raise InternalError(
                "the preprocessing process running this job died (killed, or crashed on its image); "
                "the pool was restarted"
            ) from None
        return {name: torch.from_numpy(value) for name, value in arrays.items()}

    def _submit(self, image: Image.Image, text: str) -> tuple[ProcessPoolExecutor, Future[Any]]:
        """Submit to the current pool; one that broke while idle (a child killed between jobs) is rebuilt
        first."""
        for attempt in range(2):
            executor = self._executor
            try:
                return executor, executor.submit(_process, image, text)
            except RuntimeError as exc:  # shut down, or broken (BrokenProcessPool is a RuntimeError)
                if self._stopped.done():
                    raise PoolStopped(
                        "the worker shut down before the job's image was preprocessed"
                    ) from None
                if attempt:
                    raise InternalError(f"the preprocessing pool cannot start: {exc}") from None
                self._rebuild(executor, exc)
        raise AssertionError("unreachable")

    def _rebuild(self, broken: ProcessPoolExecutor, reason: BaseException) -> None:
        """Replace ``broken`` by a new pool (once, whichever job notices first)."""
        with self._lock:
            if self._executor is not broken or self._stopped.done():
                return
            log.error("a preprocessing process died (%s): restarting the pool", reason)
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            self.restarts += 1

    def status(self) -> dict[str, Any]:
        """For health: processes, jobs waiting on them, restarts after a child died, the children's pids."""
        pids = sorted(self._executor._processes or {})  # private: no public accessor before 3.14
        return {
            "workers": self.processes,
            "in_flight": self.in_flight,
            "restarts": self.restarts,
            "pids": pids,
        }

    def abort(self) -> None:
        """Warm shutdown's grace is over: every job waiting on the pool raises :class:`PoolStopped`."""
        with self._lock:
            if not self._stopped.done():
                self._stopped.set_result(None)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; the children finish what they hold within ``timeout`` s, or are killed."""
        self.abort()
        with self._lock:
            executor = self._executor
        processes = list((executor._processes or {}).values())
        stopping = threading.Thread(target=executor.shutdown, kwargs={"cancel_futures": True}, daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("the preprocessing pool did not stop in %g s: its processes are killed", timeout)
            for process in processes:
                process.kill()
            stopping.join(timeout)
