"""The continuous-batching engine on the real tiny checkpoint (no queue, no fake model): token identity with
one-by-one ``generate``, per-row limits and deadlines, the KV budget, cancellation, classify between decode
steps, isolated jobs, and out-of-memory paths (the static batcher's frees the failed attempt first)."""

from __future__ import annotations

import base64
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from producer.errors import InvalidRequest, JobTimeout, ResourceExhausted
from tests.integration.conftest import IMAGES, wait_for
from worker.batching import SCORE, BatchKey
from worker.engine import ContinuousEngine
from worker.executor import Item, ModelHooks, StaticExecutor, scorer
from worker.faults import Faults
from worker.runtime import Generation, Prepared, Prompt, Runtime, Sampling
from worker.runtime.decoding import GrowingLayer
from worker.runtime.scoring import LabelQuery
from worker.service import Service
from worker.settings import WorkerSettings
from worker.steps import RuntimeSteps

WAIT = 120  # seconds: a generous bound on any wait


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint: Path) -> Runtime:
    return Runtime(WorkerSettings(model=str(tiny_checkpoint), device="cpu", dtype="float32"))


def faults(runtime: Runtime, **settings: Any) -> Faults:
    """The faults of a worker with the runtime's settings and these ``fault_*`` ones."""
    return Faults.from_settings(runtime.settings.model_copy(update=settings))


class ObservedSteps(RuntimeSteps):
    """The real steps, counting decode steps and recording the KV held and the rows of each step."""

    def __init__(self, runtime: Runtime, faults: Faults | None = None) -> None:
        super().__init__(runtime, faults or Faults.from_settings(runtime.settings), self._score)
        self._scorer = scorer(runtime, self.faults, ModelHooks())
        self.classify_calls: list[int] = []  # how many jobs each classify call scored together
        self.count = 0
        self.peak_kv = 0
        self.rows_per_step: list[tuple[int, ...]] = []
        self.prefilling_per_step: list[tuple[int, ...]] = []  # rows still prefilling at each decode step
        self.chunks: list[tuple[int, int]] = []  # (row id, tokens asked) of each prefill chunk
        self.after_step: dict[int, Callable[[], object]] = {}  # step count -> action (on the engine's thread)
        self.admitting = threading.Event()  # cleared: the engine's thread waits before its next prefill
        self.admitting.set()

    def _score(self, items: list[Item]) -> list[Any]:
        """The worker's classify (fault injection, then one scoring call for the step's jobs), counted."""
        self.classify_calls.append(len(items))
        return self._scorer(items)

    def prefill(self, row_id: int, tokens: int) -> int:
        assert self.admitting.wait(WAIT), "the test never let the engine go on"
        left = super().prefill(row_id, tokens)
        self.chunks.append((row_id, tokens))
        self.peak_kv = max(self.peak_kv, self.kv_tokens)
        return left

    def step(self) -> None:
        super().step()
        self.count += 1
        self.peak_kv = max(self.peak_kv, self.batch.kv_tokens)
        self.rows_per_step.append(tuple(self._ids))
        self.prefilling_per_step.append(tuple(self._pending))
        if self.count in self.after_step:
            self.after_step.pop(self.count)()


@pytest.fixture
def make_engine() -> Iterator[Callable[..., ContinuousEngine]]:
    engines: list[ContinuousEngine] = []

    def make(steps: RuntimeSteps, budget: int = 100_000, max_rows: int = 16, **kw: Any) -> ContinuousEngine:
        engines.append(ContinuousEngine(steps, budget, max_rows, **kw).start())
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


def prompts() -> list[Prompt]:
    return [
        Prompt(Image.open(IMAGES / "stop_sign.jpg").convert("RGB"), "What does the sign say?"),
        Prompt(Image.new("RGB", (100, 300), (10, 200, 10)), "What colour is this?"),
        Prompt(
            Image.open(IMAGES / "radar_chart.png").convert("RGB"), "Describe the chart in detail, please."
        ),
        Prompt(Image.new("RGB", (700, 200), (200, 10, 10)), "Caption it."),
    ]


def one_by_one(runtime: Runtime, prepared: Prepared, max_new_tokens: int) -> Generation:
    """The seed's way: ``model.generate`` on one prompt, greedy."""
    inputs = runtime.collate([prepared])
    with torch.inference_mode():
        output = runtime.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    length = runtime._generated_length(tokens)
    text = runtime.processor.decode(tokens[:length], skip_special_tokens=True).strip()
    return Generation(text, prepared.prompt_tokens, prepared.image_tokens, length)


def generate(engine: ContinuousEngine, item: Item, max_new_tokens: int, timeout: float = WAIT) -> Future:
    return engine.submit(BatchKey(Sampling(max_new_tokens=max_new_tokens)), item, timeout)


def test_greedy_rows_are_token_identical_to_one_by_one_generate(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    limits = [24, 5, 17, 9]  # mixed lengths: rows end early and leave while others go on
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    later: list[Future] = []
    steps.after_step[3] = (  # set before any job is sent: the engine cannot pass the step first
        lambda: later.extend(  # they join mid-decode, after the third step
            generate(engine, Item(p), n) for p, n in zip(prepared[2:], limits[2:], strict=True)
        )
    )
    first = [generate(engine, Item(p), n) for p, n in zip(prepared[:2], limits[:2], strict=True)]
    wait_for(lambda: len(later) == 2, WAIT, "the later jobs")
    outputs = [future.result(WAIT).output for future in first + later]
    assert outputs == [one_by_one(runtime, p, n) for p, n in zip(prepared, limits, strict=True)]
    assert len({p.prompt_tokens for p in prepared}) == 4  # mixed image sizes: the cache really was padded
    assert max(len(rows) for rows in steps.rows_per_step) >= 3  # they did decode together
    assert [o.generated_tokens for o in outputs] == limits  # each row stopped at its own max_new_tokens


def test_admission_never_exceeds_the_kv_budget(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    costs = [p.prompt_tokens + 8 + GrowingLayer.SPARE for p in prepared]
    budget = 2 * max(costs)  # room for two rows of the widest kind, not four
    steps = ObservedSteps(runtime)
    engine = make_engine(steps, budget=budget)
    futures = [generate(engine, Item(p), 8) for p in prepared]
    outputs = [future.result(WAIT).output for future in futures]
    assert outputs == [one_by_one(runtime, p, 8) for p in prepared]
    assert 0 < steps.peak_kv <= budget
    assert max(len(rows) for rows in steps.rows_per_step) == 2
    assert engine.status()["kv_tokens_used"] == 0  # every row's KV freed when it left


def test_a_job_larger_than_the_budget_fails_alone(runtime: Runtime, make_engine) -> None:
    small, big = (runtime.prepare(p) for p in prompts()[1:3])
    engine = make_engine(ObservedSteps(runtime), budget=small.prompt_tokens + 4 + GrowingLayer.SPARE)
    too_big = generate(engine, Item(big), 4)
    fits = generate(engine, Item(small), 4)
    with pytest.raises(ResourceExhausted, match="kv_cache_tokens"):
        too_big.result(WAIT)
    assert fits.result(WAIT).output == one_by_one(runtime, small, 4)


def test_one_row_timing_out_or_cancelled_leaves_the_others_tokens_unchanged(
    runtime: Runtime, make_engine
) -> None:
    prepared = [runtime.prepare(p) for p in prompts()[:3]]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps, clock=lambda: float(steps.count))  # time counted in decode steps
    steps.admitting.clear()  # held until every job and the step action are in place
    late = generate(engine, Item(prepared[0]), 30, timeout=4)  # its deadline strikes after 4 steps
    cancelled = generate(engine, Item(prepared[1]), 30)
    steps.after_step[2] = cancelled.cancel  # the engine's thread cancels it after its second step
    kept = generate(engine, Item(prepared[2]), 20)
    steps.admitting.set()
    assert kept.result(WAIT).output == one_by_one(runtime, prepared[2], 20)
    with pytest.raises(JobTimeout):
        late.result(WAIT)
    assert cancelled.cancelled()
    assert all(rows == (2,) for rows in steps.rows_per_step[4:])  # the other two left early


def test_classify_between_decode_steps_finishes_before_long_captions(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    finished: list[str] = []
    lock = threading.Lock()

    def note(name: str) -> Callable[[Future], None]:
        return lambda _: (lock.acquire(), finished.append(name), lock.release())

    labels = ["cat", "dog", "stop sign"]
    classify: list[Future] = []
    query = LabelQuery(prompts()[3].text)
    job = Item(prepared[3], labels, query=query)

    def submit_classify() -> None:  # on the engine's thread, so noted before it can finish
        classify.append(engine.submit(SCORE, job, WAIT))
        classify[0].add_done_callback(note("classify"))

    steps.after_step[2] = submit_classify
    for index, item in enumerate(prepared[:3]):
        generate(engine, Item(item), 60).add_done_callback(note(f"caption{index}"))
    wait_for(lambda: classify, WAIT, "the classify job")
    scored = classify[0]
    assert scored.result(WAIT).output == runtime.score_labels([prepared[3]], [labels], queries=[query])[0]
    wait_for(lambda: len(finished) == 4, WAIT, "every job")
    assert finished[0] == "classify"


def classify_jobs(runtime: Runtime, *marks: frozenset[str]) -> list[Item]:
    """Three classify jobs of different images: exclusive, multi-label, and one whose label is refused."""
    question = "Is there {label} in this image? Answer Yes or No."
    exclusive, multi = ["cat", "dog", "stop sign"], ["violence", "a red sign"]
    text = question.replace("{label}", max(multi, key=len))
    shapes = [
        (prompts()[1].image, exclusive, LabelQuery(prompts()[1].text)),
        (prompts()[2].image, multi, LabelQuery(text, question)),
        (prompts()[3].image, ["cat", "an <image> tag"], LabelQuery(prompts()[3].text)),
    ]
    return [
        Item(runtime.prepare(Prompt(image, query.text)), labels, query=query, marks=mark)
        for (image, labels, query), mark in zip(shapes, marks or [frozenset()] * 3, strict=True)
    ]


def alone(runtime: Runtime, item: Item) -> Any:
    return runtime.score_labels([item.prepared], [item.labels or []], queries=[item.query])[0]  # type: ignore[list-item]


def submit_during_decoding(
    runtime: Runtime, steps: ObservedSteps, engine: ContinuousEngine, items: list[Item]
) -> list[Future]:
    """Submit ``items`` from the engine's thread after the first decode step of a caption: they all wait for
    the same next step (the caption's greedy answer on this checkpoint is longer than one token)."""
    futures: list[Future] = []
    steps.after_step[1] = lambda: futures.extend(engine.submit(SCORE, item, WAIT) for item in items)
    sampling = Sampling(max_new_tokens=8)
    caption = engine.submit(BatchKey(sampling), Item(runtime.prepare(prompts()[0])), WAIT)
    wait_for(lambda: futures, WAIT, "the classify jobs")
    caption.result(WAIT)
    return futures


def test_classify_jobs_of_one_step_are_scored_together_as_each_alone(runtime: Runtime, make_engine) -> None:
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    items = classify_jobs(runtime)
    futures = submit_during_decoding(runtime, steps, engine, items)
    for item, future in zip(items[:2], futures, strict=False):
        scored, expected = future.result(WAIT).output, alone(runtime, item)
        assert scored.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        assert scored.scores == pytest.approx(expected.scores, abs=1e-4)
    with pytest.raises(InvalidRequest, match="special token"):
        futures[2].result(WAIT)  # its labels failed it alone
    assert steps.classify_calls == [3]  # one call for the three; no retry


def test_out_of_memory_of_classify_jobs_together_retries_each_alone(runtime: Runtime, make_engine) -> None:
    steps = ObservedSteps(runtime, faults(runtime, fault_oom_marker="OOM"))
    engine = make_engine(steps)
    items = classify_jobs(runtime, frozenset(), frozenset({"OOM"}), frozenset())
    items[2] = Item(items[2].prepared, ["cat", "a tag"], query=items[2].query)
    futures = submit_during_decoding(runtime, steps, engine, items)
    with pytest.raises(ResourceExhausted):
        futures[1].result(WAIT)
    for index in (0, 2):
        scored, expected = futures[index].result(WAIT).output, alone(runtime, items[index])
        assert scored.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert steps.classify_calls == [3, 1, 1, 1]  # together, then each alone


def test_an_isolated_job_runs_with_no_other_row_in_flight(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    later: list[Future] = []
    steps.after_step[1] = lambda: later.extend(
        [generate(engine, Item(prepared[1], isolated=True), 10), generate(engine, Item(prepared[2]), 6)]
    )
    before = generate(engine, Item(prepared[0]), 12)
    wait_for(lambda: later, WAIT, "the later jobs")
    suspect, after = later
    results = [f.result(WAIT).output for f in (before, suspect, after)]
    assert results == [one_by_one(runtime, p, n) for p, n in zip(prepared, (12, 10, 6), strict=False)]
    suspect_row = next(rows for rows in steps.rows_per_step if len(rows) == 1 and rows[0] == 1)
    assert all(rows == suspect_row for rows in steps.rows_per_step if 1 in rows)  # alone every step


def test_out_of_memory_beside_others_retries_the_row_alone(runtime: Runtime, make_engine) -> None:
    prepared = [runtime.prepare(p) for p in prompts()[:3]]
    steps = ObservedSteps(runtime, faults(runtime, fault_oom_above_batch=1))  # any step with two rows: OOM
    engine = make_engine(steps)
    futures = [generate(engine, Item(p), 6) for p in prepared]
    assert [f.result(WAIT).output for f in futures] == [one_by_one(runtime, p, 6) for p in prepared]
    assert max(len(rows) for rows in steps.rows_per_step) == 1


class _OomOnce(Faults):
    """Raises out-of-memory in the first decoding step, mid-``generate``, with its KV cache alive; records
    whether that cache is gone when the retry's first step runs."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(**asdict(Faults.from_settings(settings)))
        self.failed: weakref.ref | None = None
        self.alive_at_retry: list[bool] = []

    def step_hook(self, marks: Any) -> Callable[[], None]:
        return self._hook

    def _hook(self) -> None:
        if self.failed is None:
            frame = inspect.currentframe()
            while frame is not None and not (
                frame.f_code.co_name == "generate" and "cache" in frame.f_locals
            ):
                frame = frame.f_back
            assert frame is not None
            self.failed = weakref.ref(frame.f_locals["cache"])
            del frame
            raise torch.OutOfMemoryError("simulated out of memory mid-generate")
        self.alive_at_retry.append(self.failed() is not None)


def test_static_out_of_memory_frees_the_failed_attempt_before_retrying(runtime: Runtime) -> None:
    faults = _OomOnce(runtime.settings)
    started: list[list[str]] = []
    static = StaticExecutor(runtime, faults, ModelHooks(started.append), max_batch_size=4, max_wait=0.0)
    items = [runtime.prepare(p) for p in prompts()[:2]]
    key = BatchKey(Sampling(max_new_tokens=3))
    outputs = static.run_batch(key, [Item(p, job_id=f"job-{i}") for i, p in enumerate(items)])
    assert outputs == [one_by_one(runtime, p, 3) for p in items]
    assert faults.failed is not None and faults.alive_at_retry[0] is False
    assert started == [["job-0", "job-1"]]  # the delivery hooks see the batch once, not once per half


class _CountedFaults(Faults):
    """Out of memory for any batch holding an ``OOM``-marked job; records the size of each model call."""

    def __init__(self, settings: WorkerSettings) -> None:
        marked = settings.model_copy(update={"fault_oom_marker": "OOM"})
        super().__init__(**asdict(Faults.from_settings(marked)))
        self.calls: list[int] = []

    def before_model_call(self, marks: Any) -> None:
        self.calls.append(len(marks))
        super().before_model_call(marks)


def test_static_out_of_memory_halves_the_batch_until_the_job_that_does_not_fit_fails_alone(
    runtime: Runtime,
) -> None:
    faults = _CountedFaults(runtime.settings)
    started: list[list[str]] = []
    static = StaticExecutor(runtime, faults, ModelHooks(started.append), max_batch_size=4, max_wait=0.0)
    prepared = [runtime.prepare(p) for p in prompts()]
    marks = [frozenset({"OOM"}) if i == 1 else frozenset() for i in range(4)]
    items = [
        Item(p, marks=m, job_id=f"job-{i}") for i, (p, m) in enumerate(zip(prepared, marks, strict=True))
    ]
    outputs = static.run_batch(BatchKey(Sampling(max_new_tokens=3)), items)
    assert faults.calls == [4, 2, 1, 1, 2]  # all four, the first half, each of it alone, the second half
    assert isinstance(outputs[1], ResourceExhausted)
    expected = [one_by_one(runtime, p, 3) for p in prepared]
    assert [outputs[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert started == [[f"job-{i}" for i in range(4)]]


def test_service_serves_through_the_engine_and_health_reports_the_kv_budget(tiny_checkpoint: Path) -> None:
    from worker.service import JobContext

    settings = WorkerSettings(model=str(tiny_checkpoint), device="cpu", dtype="float32", kv_cache_tokens=9000)
    service = Service(settings)
    service.start()
    try:
        image = (
            "data:image/png;base64," + base64.b64encode((IMAGES / "radar_chart.png").read_bytes()).decode()
        )
        caption = service.run("llava.caption", {"image": image}, JobContext("job-1", "test"))
        scored = service.run(
            "llava.classify", {"image": image, "labels": ["a", "b"]}, JobContext("job-2", "test")
        )
        batching = service.health()["batching"]
    finally:
        service.stop()
    assert caption["text"] is not None and set(scored["scores"]) == {"a", "b"}
    assert batching["scheduler"] == "continuous" and batching["kv_tokens_budget"] == 9000
    assert batching["running_rows"] == 0 and batching["kv_tokens_used"] == 0
    assert batching["kv_tokens_free"] == 9000 and batching["jobs_batched"] == 2


class _PrefillOomOnce:
    """A forward hook on the LM's last layer: the first armed prefill runs out of memory with its new KV
    cache alive; the next prefill records whether that cache was already gone."""

    def __init__(self) -> None:
        self.armed = False
        self.failed: weakref.ref | None = None
        self.alive_at_retry: list[bool] = []

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        if args[0].shape[1] == 1 or not (self.armed or self.failed):
            return  # a decode step, or not armed yet
        if self.failed is not None:
            self.alive_at_retry.append(self.failed() is not None)
            self.failed, self.armed = None, False
            return
        frame = inspect.currentframe()
        while frame is not None and not isinstance(frame.f_locals.get("cache"), DynamicCache):
            frame = frame.f_back
        assert frame is not None
        self.failed = weakref.ref(frame.f_locals["cache"])
        del frame
        raise torch.OutOfMemoryError("simulated out of memory mid-prefill")


def test_engine_out_of_memory_frees_the_failed_prefill_before_its_retry(
    runtime: Runtime, make_engine
) -> None:
    prepared = [runtime.prepare(p) for p in prompts()[:2]]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps)
    fault = _PrefillOomOnce()
    handle = runtime.model.model.language_model.layers[-1].register_forward_hook(fault)
    try:
        later: list[Future] = []
        steps.after_step[2] = lambda: (
            setattr(fault, "armed", True),
            later.append(generate(engine, Item(prepared[1]), 5)),
        )
        first = generate(engine, Item(prepared[0]), 12)
        wait_for(lambda: later, WAIT, "the second job")
        outputs = [first.result(WAIT).output, later[0].result(WAIT).output]
    finally:
        handle.remove()
    assert outputs == [one_by_one(runtime, p, n) for p, n in zip(prepared, (12, 5), strict=True)]
    assert fault.alive_at_retry == [False]  # freed before the retry, which ran alone after the first job


def test_chunked_prefill_is_token_identical_and_running_rows_decode_between_chunks(
    runtime: Runtime, make_engine
) -> None:
    prepared = [runtime.prepare(p) for p in prompts()]
    limits = [20, 6, 15, 9]
    chunk = 16  # every prompt (45-109 tokens with this checkpoint) takes several chunks
    steps = ObservedSteps(runtime)
    engine = make_engine(steps, prefill_tokens=chunk)
    later: list[Future] = []
    steps.after_step[2] = (  # set before any job is sent: the engine cannot pass the step first
        lambda: later.extend(  # they join mid-decode
            generate(engine, Item(p), n) for p, n in zip(prepared[2:], limits[2:], strict=True)
        )
    )
    first = [generate(engine, Item(p), n) for p, n in zip(prepared[:2], limits[:2], strict=True)]
    wait_for(lambda: len(later) == 2, WAIT, "the later jobs")
    outputs = [future.result(WAIT).output for future in first + later]
    assert outputs == [one_by_one(runtime, p, n) for p, n in zip(prepared, limits, strict=True)]
    assert all(0 < tokens <= chunk for _, tokens in steps.chunks)
    per_row = [sum(1 for row, _ in steps.chunks if row == row_id) for row_id in range(4)]
    assert all(count >= p.prompt_tokens // chunk for count, p in zip(per_row, prepared, strict=True))
    # rows decoded while another row's prompt was still being prefilled
    assert any(
        rows and prefilling
        for rows, prefilling in zip(steps.rows_per_step, steps.prefilling_per_step, strict=True)
    )
    assert engine.status()["kv_tokens_used"] == 0 and engine.status()["prefilling_rows"] == 0


def test_a_prefilling_row_timing_out_leaves_the_others_tokens_unchanged(
    runtime: Runtime, make_engine
) -> None:
    prepared = [runtime.prepare(p) for p in prompts()[:2]]
    steps = ObservedSteps(runtime)
    engine = make_engine(steps, prefill_tokens=8, clock=lambda: float(steps.count))
    later: list[Future] = []
    steps.after_step[1] = lambda: later.append(generate(engine, Item(prepared[1]), 8, timeout=3))
    kept = generate(engine, Item(prepared[0]), 16)
    assert kept.result(WAIT).output == one_by_one(runtime, prepared[0], 16)
    wait_for(lambda: later, WAIT, "the later job")
    with pytest.raises(JobTimeout):
        later[0].result(WAIT)
    assert prepared[1].prompt_tokens > 3 * 8  # it timed out with its prompt only partly prefilled
    assert all(rows == (0,) for rows in steps.rows_per_step)  # it never decoded
    assert engine.status()["kv_tokens_used"] == 0 and not steps._pending


@pytest.fixture(scope="module")
def prefix_runtime(tiny_checkpoint: Path) -> Runtime:
    settings = WorkerSettings(model=str(tiny_checkpoint), device="cpu", dtype="float32")
    return Runtime(settings.model_copy(update={"prefix_cache_tokens": 8192}))


@pytest.mark.parametrize("chunk", [None, 16])
def test_jobs_on_the_same_image_reuse_its_prefix_and_stay_token_identical(
    prefix_runtime: Runtime, make_engine, chunk: int | None
) -> None:
    runtime = prefix_runtime
    image = Image.open(IMAGES / "stop_sign.jpg").convert("RGB")
    texts = ["Describe the image.", "What does the sign say?", "What colour is the sign?"]
    prepared = [runtime.prepare(Prompt(image, text)) for text in texts]
    other = runtime.prepare(prompts()[1])
    assert len({p.image_digest for p in prepared}) == 1 and other.image_digest != prepared[0].image_digest
    steps = ObservedSteps(runtime)
    engine = make_engine(steps, budget=100_000, prefill_tokens=chunk)
    futures = [generate(engine, Item(p), n) for p, n in zip([*prepared, other], (12, 8, 8, 6), strict=True)]
    outputs = [future.result(WAIT).output for future in futures]
    assert outputs == [
        one_by_one(runtime, p, n) for p, n in zip([*prepared, other], (12, 8, 8, 6), strict=True)
    ]
    assert (steps.prefix.hits, steps.prefix.misses) == (2, 2)  # the two questions; the caption, the other
    assert steps.prefix.tokens == _prefix_end(runtime, prepared[0]) + _prefix_end(runtime, other)
    status = engine.status()
    assert status["prefix_cache_tokens"] == steps.prefix.tokens
    assert status["kv_tokens_budget"] == 100_000 - 8192  # the prefix cache's share is set aside


def _prefix_end(runtime: Runtime, prepared: Prepared) -> int:
    ids = prepared.input_ids.tolist()
    return max(i for i, t in enumerate(ids) if t == runtime.image_token_id) + 1


def test_service_reuses_an_images_prefix_and_health_reports_the_prefix_cache(tiny_checkpoint: Path) -> None:
    from worker.service import JobContext

    settings = WorkerSettings(
        model=str(tiny_checkpoint),
        device="cpu",
        dtype="float32",
        kv_cache_tokens=9000,
        prefix_cache_tokens=1000,
    )
    service = Service(settings)
    service.start()
    try:
        image = "data:image/png;base64," + base64.b64encode((IMAGES / "stop_sign.jpg").read_bytes()).decode()
        caption = service.run("llava.caption", {"image": image}, JobContext("job-1", "test"))
        answer = service.run("llava.vqa", {"image": image, "question": "What?"}, JobContext("job-2", "test"))
        batching = service.health()["batching"]
        engine = service.host.executor
        assert isinstance(engine, ContinuousEngine) and isinstance(engine.steps, RuntimeSteps)
        steps = engine.steps
    finally:
        service.stop()
    assert caption["text"] is not None and answer["text"] is not None
    assert (steps.prefix.hits, steps.prefix.misses) == (1, 1)  # the question reused the caption's image
    assert batching["prefix_cache_tokens_budget"] == 1000 and batching["kv_tokens_budget"] == 8000
    assert 0 < batching["prefix_cache_tokens"] <= 1000 and batching["kv_tokens_used"] == 0
