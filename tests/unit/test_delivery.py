"""The delivery rules as pure functions: when a job is suspect, when it is given up, fleet warnings."""

from __future__ import annotations

import pytest

from producer.contract import CaptionRequest, ClassifyRequest, VQARequest
from producer.status import fleet_warnings
from worker.delivery import BACKSTOP_FACTOR, Delivery, DeliveryLedger


class _Backend:
    client = None


class _App:
    backend = _Backend()


def ledger(max_deliveries: int = 2) -> DeliveryLedger:
    from worker.settings import WorkerSettings

    return DeliveryLedger(_App(), WorkerSettings(max_deliveries=max_deliveries))  # type: ignore[arg-type]


def test_a_job_never_on_the_model_is_not_suspect_and_runs() -> None:
    assert not Delivery(deliveries=2, attempts=0).suspect
    assert ledger().verdict(Delivery(2, 0)) is None


def test_a_job_that_was_on_the_model_when_its_worker_died_runs_isolated() -> None:
    assert Delivery(deliveries=2, attempts=1).suspect
    assert ledger().verdict(Delivery(2, 1)) is None


def test_the_cap_counts_model_attempts() -> None:
    error = ledger(2).verdict(Delivery(3, 2))
    assert error is not None and error.code == "worker_lost" and "max_deliveries 2" in error.message


def test_a_backstop_ends_jobs_that_kill_workers_before_the_model() -> None:
    assert ledger(2).verdict(Delivery(BACKSTOP_FACTOR * 2, 0)) is None
    assert ledger(2).verdict(Delivery(BACKSTOP_FACTOR * 2 + 1, 0)) is not None


def test_fleet_warnings_name_disagreeing_visibility_timeouts() -> None:
    assert fleet_warnings({"a": {"visibility_timeout": 60}, "b": {"visibility_timeout": 60}}) == []
    assert fleet_warnings({"a": {"visibility_timeout": 60}, "b": {}}) == []
    (warning,) = fleet_warnings({"a": {"visibility_timeout": 60}, "b": {"visibility_timeout": 90}})
    assert "a=60" in warning and "b=90" in warning


def _worker(queues: list[str], **outcome: object) -> dict[str, object]:
    from producer.contract import OUTCOME_SETTINGS_KEY
    from worker.settings import WorkerSettings, outcome_settings

    return {"queues": queues, OUTCOME_SETTINGS_KEY: outcome_settings(WorkerSettings(**outcome))}


def test_outcome_settings_are_compared_among_the_workers_of_one_queue() -> None:
    from producer.app import outcome_differences

    workers = {
        "a": _worker(["llava", "llava.tiny"], max_new_tokens_cap=256),
        "b": _worker(["llava.tiny"], max_new_tokens_cap=512, max_image_bytes=4096),
        "c": _worker(["llava.other"], max_image_bytes=1024),  # another queue: any caps it likes
        "old": {"queues": ["llava.tiny"]},  # reports none: left out
    }
    assert outcome_differences(workers) == {
        "llava.tiny": {
            "max_new_tokens_cap": {"a": 256, "b": 512},
            "max_image_bytes": {"a": 20 * 1024 * 1024, "b": 4096},
        }
    }
    warnings = fleet_warnings(workers)
    assert any("LLAVA_MAX_NEW_TOKENS_CAP (a=256, b=512)" in w and "queue llava.tiny" in w for w in warnings)


def test_a_starting_worker_names_the_settings_its_queue_peers_set_otherwise() -> None:
    from worker.delivery import disagreeing_peers
    from worker.settings import WorkerSettings

    settings = WorkerSettings(queues=["llava.tiny"], max_labels=10)
    peers = {"p1": _worker(["llava.tiny"], max_labels=20), "p2": _worker(["llava.tiny"], max_labels=10)}
    assert disagreeing_peers(peers, settings) == ["queue llava.tiny: LLAVA_MAX_LABELS is 10 here, p1: 20"]
    assert disagreeing_peers({"p2": peers["p2"]}, settings) == []
    others = {"o1": _worker(["llava.other"], max_labels=5), "o2": _worker(["llava.other"], max_labels=7)}
    assert disagreeing_peers(others, settings) == []  # a queue this worker does not consume


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (CaptionRequest, {"prompt": "what is <image> here"}),
        (VQARequest, {"question": "<image>"}),
        (ClassifyRequest, {"labels": ["cat", "a <image>"]}),
        (CaptionRequest, {"generation": {"max_new_tokens": "12"}}),
        (CaptionRequest, {"generation": {"max_new_tokens": True}}),
        (CaptionRequest, {"timeout_s": "30"}),
        (ClassifyRequest, {"labels": "cat,dog"}),
    ],
)
def test_the_contract_refuses_placeholders_and_loose_types(model, fields) -> None:
    with pytest.raises(ValueError):
        model.model_validate({"image": "https://example.com/a.png", **fields})


def test_the_contract_accepts_integers_for_floats() -> None:
    request = CaptionRequest.model_validate(
        {"image": "https://example.com/a.png", "timeout_s": 30, "generation": {"temperature": 1}}
    )
    assert request.timeout_s == 30.0 and request.generation.temperature == 1.0
