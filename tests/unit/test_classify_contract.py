"""The classify fields of the wire contract: multi-label, thresholds (one or per label), the question."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from producer.contract import DEFAULT_THRESHOLD, ClassifyRequest, ClassifyResult

PNG = "data:image/png;base64,iVBORw0KGgo="
LABELS = ["nudity", "violence"]


def request(**fields: Any) -> ClassifyRequest:
    return ClassifyRequest.model_validate({"image": PNG, "labels": LABELS, **fields})


def test_thresholds_default_one_number_or_per_label() -> None:
    assert request(multi_label=True).threshold_of("nudity") == DEFAULT_THRESHOLD == 0.5
    assert request(multi_label=True, threshold=0.0).threshold_of("violence") == 0.0
    per_label = request(multi_label=True, threshold={" nudity ": 1, "violence": 0.25})
    assert per_label.threshold == {"nudity": 1.0, "violence": 0.25}  # label keys stripped as labels are
    assert request(multi_label=True, threshold={"nudity": 0.9}).threshold_of("violence") == 0.5


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"multi_label": True, "threshold": 1.01}, "less than or equal to 1"),
        ({"multi_label": True, "threshold": -0.01}, "greater than or equal to 0"),
        ({"multi_label": True, "threshold": {"violence": 2}}, "less than or equal to 1"),
        ({"multi_label": True, "threshold": {"gore": 0.2}}, "not in labels: gore"),
        ({"multi_label": True, "threshold": "high"}, "threshold"),
        ({"threshold": 0.5}, "threshold: only with multi_label"),
        ({"question": "Is there {label}?"}, "question: only with multi_label"),
        ({"multi_label": True, "question": "Is it bad?"}, "must contain {label}"),
        ({"multi_label": True, "prompt": "Look."}, "not prompt"),
        ({"multi_label": True, "labels": None}, "multi_label needs labels"),
    ],
)
def test_invalid_classify_fields(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        request(**fields)


def test_result_carries_logprobs_and_given_labels() -> None:
    timings = {"image_ms": 1, "inference_ms": 1, "total_ms": 2}
    common = {"model": "m", "worker": "w", "prompt_tokens": 1, "image_tokens": 0, "generated_tokens": 0}
    result = ClassifyResult(
        **common,
        timings=timings,
        label="violence",
        scores={"nudity": 0.1, "violence": 0.7},
        logprobs={"nudity": -3.2, "violence": -0.4},
        labels=["violence"],
    )
    assert ClassifyResult.model_validate_json(result.model_dump_json()) == result
