"""Classify through a real redis-server and worker: exclusive scores and log-probs, multi-label thresholds
(one, per label, at or above), invalid thresholds and labels holding special-token text as
``invalid_request`` (client, wire, CLI)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from producer import ClassifyResult, InvalidRequest, LlavaClient
from producer.cli import main
from producer.contract import TASK_CLASSIFY
from tests.integration.conftest import IMAGES, worker_env
from tests.integration.test_cli import run_cli

CATEGORIES = ["nudity", "violence", "weapons", "a red stop sign"]


def classify(client: LlavaClient, queue: str, **params: Any) -> ClassifyResult:
    result = client.classify(IMAGES / "stop_sign.jpg", CATEGORIES, queue=queue, **params).get(60)
    assert isinstance(result, ClassifyResult)
    return result


def test_exclusive_scores_are_the_softmax_of_the_logprobs(client: LlavaClient, shared_worker) -> None:
    result = classify(client, shared_worker[2])
    assert result.labels is None and result.scores is not None and result.logprobs is not None
    assert list(result.logprobs) == CATEGORIES and all(value < 0 for value in result.logprobs.values())
    total = sum(math.exp(value) for value in result.logprobs.values())
    for label in CATEGORIES:
        assert result.scores[label] == pytest.approx(math.exp(result.logprobs[label]) / total)
    assert result.label == max(result.scores, key=result.scores.__getitem__)


def test_multi_label_thresholds_one_and_per_label(client: LlavaClient, shared_worker) -> None:
    queue = shared_worker[2]
    first = classify(client, queue, multi_label=True)
    scores = first.scores or {}
    assert list(scores) == CATEGORIES and all(0.0 < score < 1.0 for score in scores.values())
    assert first.labels == [label for label in CATEGORIES if scores[label] >= 0.5]
    assert classify(client, queue, multi_label=True, threshold=0.0).labels == CATEGORIES
    assert classify(client, queue, multi_label=True, threshold=1.0).labels == []

    # Per label, at or above: a threshold equal to a label's score gives it, one just above does not.
    exact, above = CATEGORIES[1], CATEGORIES[3]
    thresholds = {exact: scores[exact], above: min(1.0, scores[above] + 1e-6), CATEGORIES[0]: 0.0}
    again = classify(client, queue, multi_label=True, threshold=thresholds)
    assert again.scores == scores  # the same image and question: the same probabilities
    expected = [CATEGORIES[0], exact] + ([CATEGORIES[2]] if scores[CATEGORIES[2]] >= 0.5 else [])
    assert again.labels == [label for label in CATEGORIES if label in expected]


def test_multi_label_question_is_asked_per_label(client: LlavaClient, shared_worker) -> None:
    queue = shared_worker[2]
    default = classify(client, queue, multi_label=True)
    asked = classify(client, queue, multi_label=True, question="Does the picture contain {label}?")
    assert asked.scores is not None and asked.scores != default.scores


BAD = {
    "over one": {"multi_label": True, "threshold": 1.5},
    "negative in a dict": {"multi_label": True, "threshold": {"nudity": -0.1}},
    "unknown label": {"multi_label": True, "threshold": {"gore": 0.3}},
    "without multi_label": {"threshold": 0.3},
    "question without {label}": {"multi_label": True, "question": "Is it bad?"},
    "multi_label without labels": {"multi_label": True, "labels": None},
}


@pytest.mark.parametrize("fields", BAD.values(), ids=BAD.keys())
def test_invalid_thresholds_are_invalid_requests(client: LlavaClient, shared_worker, fields) -> None:
    wire = {"image": "data:,", "labels": CATEGORIES, **fields}
    with pytest.raises(InvalidRequest):
        client.submit("classify", IMAGES / "stop_sign.jpg", **{"labels": CATEGORIES, **fields})
    sent = client.app.send_task(TASK_CLASSIFY, kwargs={"request": wire}, queue=shared_worker[2])
    with pytest.raises(InvalidRequest) as raised:
        client.job(sent.id, TASK_CLASSIFY).get(60)
    assert raised.value.code == "invalid_request"


@pytest.mark.parametrize("multi_label", [False, True], ids=["exclusive", "multi-label"])
def test_labels_with_special_token_text_are_invalid_requests(
    client: LlavaClient, shared_worker, multi_label
) -> None:
    labels = ["cat", "stop</s> here"]  # the tiny mistral tokenizer's end of sequence
    with pytest.raises(InvalidRequest, match="special token") as raised:
        client.classify(
            IMAGES / "stop_sign.jpg", labels, multi_label=multi_label, queue=shared_worker[2]
        ).get(60)
    assert raised.value.code == "invalid_request"
    assert classify(client, shared_worker[2], multi_label=multi_label).scores  # the worker serves on


def test_cli_multi_label_per_label_thresholds(client_settings, cache_dir, shared_worker, tmp_path) -> None:
    out = tmp_path / "tags.jsonl"
    args = ["classify", str(IMAGES / "stop_sign.jpg"), str(IMAGES / "radar_chart.png"), "--out", str(out)]
    args += ["--labels", ",".join(CATEGORIES[:3]), "--multi-label", "--threshold", "nudity=0,violence=1"]
    done = run_cli([*args, "--queue", shared_worker[2]], worker_env(client_settings, cache_dir))
    assert done.returncode == 0, done.stderr
    for record in map(json.loads, out.read_text().splitlines()):
        result = record["result"]
        assert set(result["scores"]) == set(CATEGORIES[:3]) == set(result["logprobs"])
        assert "nudity" in result["labels"] and "violence" not in result["labels"]
        assert ("weapons" in result["labels"]) == (result["scores"]["weapons"] >= 0.5)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["classify", "x.png", "--labels", "a,b", "--threshold", "0.3"], "only with multi_label"),
        (["classify", "x.png", "--labels", "a,b", "--multi-label", "--threshold", "c=0.3"], "not in labels"),
    ],
)
def test_bad_threshold_usage_exits_two(argv, says, client_settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LLAVA_BROKER_URL", client_settings.broker_url)
    monkeypatch.setenv("LLAVA_RESULT_BACKEND", client_settings.result_backend)
    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_caption_takes_no_multi_label(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["caption", "x.png", "--multi-label"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --multi-label" in capsys.readouterr().err


def test_threshold_that_is_no_number_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["classify", "x.png", "--labels", "a,b", "--multi-label", "--threshold", "lots"])
    assert exited.value.code == 2
    assert "--threshold" in capsys.readouterr().err
