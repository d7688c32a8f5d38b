"""A job's own sampling never fails its batch-mates: on the real tiny checkpoint, a row whose temperature is
too small for float32 samples safely, a row whose logits are not finite fails alone, and through a worker an
overflowing temperature is refused as ``invalid_request`` while the jobs beside it succeed."""

from __future__ import annotations

import base64
import math
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from producer import InternalError, InvalidRequest, LlavaClient
from producer.contract import TASK_CAPTION
from tests.integration import test_engine
from tests.integration.conftest import IMAGES
from tests.integration.test_engine import WAIT, ObservedSteps, one_by_one, prompts
from worker.batching import BatchKey
from worker.executor import Item
from worker.runtime import Prepared, Runtime, Sampling

pytestmark = pytest.mark.integration
runtime = test_engine.runtime  # its fixtures: the tiny checkpoint's runtime, engines stopped after the test
make_engine = test_engine.make_engine


def _submit(engine: Any, prepared: Prepared, sampling: Sampling) -> Future:
    return engine.submit(BatchKey(sampling), Item(prepared), WAIT)


def test_a_temperature_that_overflows_float32_samples_safely_beside_greedy_rows(
    runtime: Runtime, make_engine
) -> None:
    """1e-39 is below float32's smallest normal number: ``logits / temperature`` overflows to inf. The row
    computes safely instead (a temperature that small picks the most likely token) and its batch-mates'
    tokens do not change."""
    prepared = [runtime.prepare(p) for p in prompts()[:3]]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    steps.admitting.clear()  # held until every job is queued: they decode together
    greedy = [_submit(engine, p, Sampling(max_new_tokens=12)) for p in prepared[:2]]
    tiny = _submit(engine, prepared[2], Sampling(max_new_tokens=12, temperature=1e-39, seed=1))
    steps.admitting.set()
    assert [f.result(WAIT).output for f in greedy] == [one_by_one(runtime, p, 12) for p in prepared[:2]]
    assert tiny.result(WAIT).output == one_by_one(runtime, prepared[2], 12)
    assert max(len(rows) for rows in steps.rows_per_step) == 3


class _PoisonedSteps(ObservedSteps):
    """The real steps, with NaN written into the logits of the ``poisoned`` rows (engine ids) in every decode
    step: what a model whose numbers overflow (fp16) gives one row."""

    def __init__(self, runtime: Runtime, poisoned: set[int]) -> None:
        super().__init__(runtime)
        self.poisoned = poisoned
        self._decoding = False

    def step(self) -> None:
        self._decoding = True
        try:
            super().step()
        finally:
            self._decoding = False

    def poison(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self._decoding:
            for index, row_id in enumerate(self._ids):
                if row_id in self.poisoned:
                    output[index] = math.nan
        return output


def test_rows_with_non_finite_logits_fail_alone(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    steps = _PoisonedSteps(runtime, poisoned={1, 2})  # engine ids count from 0 in submission order
    engine = make_engine(steps)
    hook = runtime.model.lm_head.register_forward_hook(steps.poison)
    try:
        steps.admitting.clear()
        good = _submit(engine, prepared[0], Sampling(max_new_tokens=10))
        nan_greedy = _submit(engine, prepared[1], Sampling(max_new_tokens=10))
        nan_sampled = _submit(engine, prepared[2], Sampling(max_new_tokens=10, temperature=0.7, seed=3))
        sampled = _submit(engine, prepared[3], Sampling(max_new_tokens=10, temperature=0.7, seed=4))
        steps.admitting.set()
        assert good.result(WAIT).output == one_by_one(runtime, prepared[0], 10)
        assert sampled.result(WAIT).output.generated_tokens == 10
        for future in (nan_greedy, nan_sampled):
            with pytest.raises(InternalError, match="not finite"):
                future.result(WAIT)
    finally:
        hook.remove()
    assert max(len(rows) for rows in steps.rows_per_step) == 4  # they did decode together


def test_worker_refuses_an_overflowing_temperature_and_serves_the_jobs_beside_it(
    client: LlavaClient, shared_worker
) -> None:
    """Sent past the client's validation (any Celery client can): the worker refuses it as invalid_request."""
    _, _, queue = shared_worker
    image = (IMAGES / "stop_sign.jpg").read_bytes()
    good = [client.caption(image, queue=queue, max_new_tokens=8) for _ in range(2)]
    data_uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    raw = {"image": data_uri, "generation": {"temperature": 1e-39, "max_new_tokens": 8}}
    bad = client.app.send_task(TASK_CAPTION, kwargs={"request": raw}, queue=queue)
    good.append(client.caption(image, queue=queue, max_new_tokens=8, temperature=0.5))
    with pytest.raises(InvalidRequest, match="temperature"):
        client.job(bad.id, TASK_CAPTION).get(timeout=WAIT)
    assert all(job.get(timeout=WAIT).generated_tokens >= 1 for job in good)
