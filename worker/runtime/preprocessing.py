"""The processor in a pool of processes (``preprocess_workers``), off the model thread's GIL.

Each child is started by the ``forkserver`` (never a fork of the worker, which holds torch and threads),
gets the worker's own processor object once (its initializer), runs torch on one thread, and turns an image
and a prompt text into the processor's tensors. Every wait ends by the job's deadline. Each child sits in a
one-process executor of its own, so that a child that dies or hangs takes at most the job it held with it; it
is replaced (see :class:`PreprocessPool`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
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


class _Overdue(Exception):
    """The child holding a job did not answer by the job's deadline (hung, or too slow for it)."""


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


class _Child:
    """One child in a one-process executor of its own: a ProcessPoolExecutor fails every future it holds when
    any of its processes dies, so with one process each, a death fails only the job that child held. The
    process starts at the first submit."""

    def __init__(self, context: BaseContext, processor: Any) -> None:
        self.executor = ProcessPoolExecutor(1, mp_context=context, initializer=_adopt, initargs=(processor,))

    def submit(self, image: Image.Image, text: str) -> Future[dict[str, np.ndarray]]:
        """Raises ``BrokenProcessPool`` if the process died while idle, ``RuntimeError`` once shut down."""
        return self.executor.submit(_process, image, text)

    def processes(self) -> list[BaseProcess]:
        return list((self.executor._processes or {}).values())  # private: no public accessor before 3.14

    def discard(self) -> None:
        """Kill the process (a hung one never reads the executor's stop message) and drop the executor."""
        for process in self.processes():
            process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


class PreprocessPool:
    """``processes`` children running ``processor``; :meth:`__call__` takes the processor's arguments.

    A job takes an idle child, or waits for one until its deadline. A child that dies holding a job is
    replaced and the job runs once more on the new child (the processor has no side effects; a job that
    kills its child twice fails alone). A child that has not answered by the job's deadline is killed and
    replaced (the only way to take a job back from a process), and the job ends ``timeout``."""

    def __init__(self, processor: Any, processes: int) -> None:
        self.processor = processor
        self.processes = processes
        self.restarts = 0  # children replaced (died, or did not answer by their job's deadline)
        self.in_flight = 0  # jobs waiting on the pool
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a child became idle, or the pool stopped
        self._stopped: Future[None] = Future()  # done once the pool stops taking work (wakes every wait)
        self._children = [_Child(self._context, processor) for _ in range(processes)]
        self._idle = list(self._children)

    def start(self, timeout: float) -> PreprocessPool:
        """Start every child (each loads the processor) by running a small image through each."""
        started, image = time.monotonic(), Image.new("RGB", (64, 48))
        text = f"warm-up {self.processor.image_token}"
        warm = [child.submit(image, text) for child in self._children]
        done, _ = wait(warm, timeout=timeout)
        failed = next((f.exception() for f in done if f.exception() is not None), None)
        if len(done) < len(warm) or failed is not None:
            self.stop()  # no child stays behind a pool that did not start
            reason = repr(failed) if failed else f"not ready within {timeout:g} s"
            raise StartupError(f"the preprocessing pool (preprocess_workers) did not start: {reason}")
        log.info("preprocessing pool: %d processes (%.1f s)", self.processes, time.monotonic() - started)
        return self

    def __call__(
        self, *, images: list[Image.Image], text: list[str], return_tensors: str, deadline: float
    ) -> dict[str, torch.Tensor]:
        """The processor's output for one image and text, computed in a child, by ``deadline``
        (``time.monotonic()``). Raises :class:`JobTimeout`, :class:`PoolStopped`, or :class:`InternalError`
        when the job's child died twice."""
        if return_tensors != "pt" or len(images) != 1 or len(text) != 1:
            raise ValueError("the preprocessing pool takes one image and one text, returns torch tensors")
        with self._lock:
            self.in_flight += 1
        try:
            arrays = self._run(images[0], text[0], deadline)
        finally:
            with self._lock:
                self.in_flight -= 1
        return {name: torch.from_numpy(value) for name, value in arrays.items()}

    def _run(self, image: Image.Image, text: str, deadline: float) -> dict[str, np.ndarray]:
        """The job on an idle child; on a new child once more if that one died holding it."""
        child: _Child | None = self._acquire(deadline)
        for _ in range(2):
            if child is None:  # the pool stopped before the dead child could be replaced
                raise PoolStopped("the worker shut down while the job's image was being preprocessed")
            try:
                arrays = self._on(child, image, text, deadline)
            except BrokenProcessPool as exc:
                child = self._replace(child, f"died holding a job ({exc})")
                continue
            except _Overdue:
                self._release(self._replace(child, "did not answer by its job's deadline"))
                raise JobTimeout("the job's deadline passed while its image was being preprocessed") from None
            except PoolStopped:
                raise  # its child may still be busy: it stays out of the pool, stop() ends it
            except BaseException:
                self._release(child)  # the processor refused the input: the child itself is fine
                raise
            self._release(child)
            return arrays
        self._release(child)
        raise InternalError(
            "the preprocessing process running this job died twice (killed, or crashed on its image); "
            "both were replaced"
        )

    def _on(self, child: _Child, image: Image.Image, text: str, deadline: float) -> dict[str, np.ndarray]:
        """The job on ``child``, which this job holds: its arrays, or :class:`_Overdue` by ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # nothing was sent: the child stays healthy
            raise JobTimeout("the job's deadline passed before its image was preprocessed")
        try:
            future = child.submit(image, text)
        except RuntimeError:  # BrokenProcessPool (died while idle) is one too: the caller replaces it
            if self._stopped.done():
                raise PoolStopped("the worker shut down before the job's image was preprocessed") from None
            raise
        waits: list[Future[Any]] = [future, self._stopped]
        done, _ = wait(waits, timeout=remaining, return_when=FIRST_COMPLETED)
        if future in done and not future.cancelled():  # stop() cancels what a child has not started
            return future.result()
        if self._stopped.done():
            raise PoolStopped("the worker shut down while the job's image was being preprocessed")
        raise _Overdue

    def _acquire(self, deadline: float) -> _Child:
        """An idle child, once one is free; :class:`JobTimeout` at ``deadline``, :class:`PoolStopped`."""
        with self._freed:
            self._freed.wait_for(
                lambda: self._idle or self._stopped.done(), max(0.0, deadline - time.monotonic())
            )
            if self._stopped.done():
                raise PoolStopped("the worker shut down before the job's image was preprocessed")
            if not self._idle:
                raise JobTimeout("the job's deadline passed while it waited for a preprocessing process")
            return self._idle.pop()

    def _release(self, child: _Child | None) -> None:
        with self._freed:
            if child is not None and child in self._children and not self._stopped.done():
                self._idle.append(child)
                self._freed.notify()

    def _replace(self, child: _Child, why: str) -> _Child | None:
        """Kill ``child`` and put a new one (its process starts with its first job) in its place; ``None``
        once the pool stopped. The caller holds the new child."""
        pids = [process.pid for process in child.processes()]
        log.error("preprocessing process %s %s: replacing it", pids, why)
        child.discard()
        with self._lock:
            self._children.remove(child)
            if self._stopped.done():
                return None
            fresh = _Child(self._context, self.processor)
            self._children.append(fresh)
            self.restarts += 1
            return fresh

    def status(self) -> dict[str, Any]:
        """For health: processes, jobs waiting on them, children replaced, the children's pids."""
        with self._lock:
            pids = sorted(p.pid for child in self._children for p in child.processes() if p.pid)
            return {
                "workers": self.processes,
                "in_flight": self.in_flight,
                "restarts": self.restarts,
                "pids": pids,
            }

    def abort(self) -> None:
        """Warm shutdown's grace is over: every job waiting on the pool raises :class:`PoolStopped`."""
        with self._freed:
            if not self._stopped.done():
                self._stopped.set_result(None)
            self._freed.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; the children finish what they hold within ``timeout`` s, or are killed (a hung
        child never would)."""
        self.abort()
        with self._lock:
            children = list(self._children)
        processes = [process for child in children for process in child.processes()]

        def shut_down() -> None:
            for child in children:
                child.executor.shutdown(cancel_futures=True)

        stopping = threading.Thread(target=shut_down, daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("the preprocessing pool did not stop in %g s: its processes are killed", timeout)
            for process in processes:
                process.kill()
            stopping.join(timeout)
