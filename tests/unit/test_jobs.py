"""The job table: each kind's request becomes the model's work, the model's output becomes its result."""

from __future__ import annotations

import pytest

from producer.contract import (
    DEFAULT_CAPTION_PROMPT,
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    TASKS,
    ClassifyResult,
    Timings,
)
from producer.errors import InvalidRequest
from worker.batching import SCORE, BatchKey
from worker.jobs import JOB_KINDS
from worker.runtime import Generation, LabelScores, Sampling
from worker.settings import WorkerSettings

IMAGE = "https://example.com/cat.png"
SETTINGS = WorkerSettings(max_new_tokens=32, max_new_tokens_cap=64)
TIMINGS = Timings(image_ms=1.0, inference_ms=2.0, total_ms=3.0)


def test_every_task_of_the_contract_has_one_job_kind() -> None:
    assert set(JOB_KINDS) == set(TASKS)


def test_generating_kinds_share_a_batch_key_by_sampling() -> None:
    _, caption = JOB_KINDS[TASK_CAPTION].decode({"image": IMAGE}, SETTINGS)
    _, vqa = JOB_KINDS[TASK_VQA].decode(
        {"image": IMAGE, "question": "Why?", "generation": {"max_new_tokens": 8}}, SETTINGS
    )
    assert caption.text == DEFAULT_CAPTION_PROMPT and caption.reserve == 32 and caption.labels is None
    assert caption.key == BatchKey(Sampling(max_new_tokens=32)) and not caption.key.scores
    assert vqa.text == "Why?" and vqa.key == BatchKey(Sampling(max_new_tokens=8)) != caption.key


def test_classify_with_labels_scores_without_reserving_tokens_and_without_labels_generates() -> None:
    _, scored = JOB_KINDS[TASK_CLASSIFY].decode({"image": IMAGE, "labels": ["cat", "dog"]}, SETTINGS)
    assert scored.key == SCORE and scored.key.scores and scored.reserve == 0
    assert scored.text.endswith("Answer with one of: cat, dog.") and scored.query is not None
    _, free = JOB_KINDS[TASK_CLASSIFY].decode({"image": IMAGE}, SETTINGS)
    assert free.labels is None and not free.key.scores


def test_the_workers_caps_refuse_a_request_the_contract_allows() -> None:
    with pytest.raises(InvalidRequest, match="max_new_tokens_cap"):
        JOB_KINDS[TASK_CAPTION].decode({"image": IMAGE, "generation": {"max_new_tokens": 65}}, SETTINGS)
    with pytest.raises(InvalidRequest, match="max_labels"):
        labels = [f"l{i}" for i in range(SETTINGS.max_labels + 1)]
        JOB_KINDS[TASK_CLASSIFY].decode({"image": IMAGE, "labels": labels}, SETTINGS)
    with pytest.raises(InvalidRequest, match="JSON object"):
        JOB_KINDS[TASK_VQA].decode("not a dict", SETTINGS)


def test_multi_label_result_gives_the_labels_at_or_above_their_threshold() -> None:
    kind = JOB_KINDS[TASK_CLASSIFY]
    request = {"image": IMAGE, "labels": ["a", "b", "c"], "multi_label": True, "threshold": {"c": 0.9}}
    _, work = kind.decode(request, SETTINGS)
    output = LabelScores(logprobs=[-0.1, -2.0, -0.2], scores=[0.5, 0.2, 0.8], prompt_tokens=7, image_tokens=5)
    result = ClassifyResult.model_validate(kind.encode(work, output, TIMINGS, "m", "w"))
    assert result.label == "c" and result.labels == ["a"] and result.scores == {"a": 0.5, "b": 0.2, "c": 0.8}
    assert result.generated_tokens == 0 and result.prompt_tokens == 7


def test_caption_result_carries_the_generated_text_and_token_counts() -> None:
    kind = JOB_KINDS[TASK_CAPTION]
    _, work = kind.decode({"image": IMAGE}, SETTINGS)
    wire = kind.encode(work, Generation("a cat", 9, 5, 2), TIMINGS, "m", "w")
    assert wire["kind"] == "caption" and wire["text"] == "a cat" and wire["generated_tokens"] == 2
