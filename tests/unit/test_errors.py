"""The error tree: stable codes, and errors survive Celery's JSON result encoding as the same type."""

from __future__ import annotations

from celery import Celery
from celery.backends.base import Backend

import producer.errors as errors

EXPECTED_CODES = {
    "LlavaError": "llava_error",
    "InvalidRequest": "invalid_request",
    "ImageError": "image_error",
    "InvalidImage": "invalid_image",
    "ImageTooLarge": "image_too_large",
    "FetchForbidden": "fetch_forbidden",
    "FetchFailed": "fetch_failed",
    "ResourceExhausted": "resource_exhausted",
    "BrokerFull": "broker_full",
    "JobTimeout": "timeout",
    "WorkerLost": "worker_lost",
    "InternalError": "internal_error",
    "ResultTimeout": "result_timeout",
    "BrokerUnavailable": "broker_unavailable",
}


def test_codes_are_stable_and_unique() -> None:
    assert {cls.__name__: code for code, cls in errors.ERRORS.items()} == EXPECTED_CODES
    assert issubclass(errors.InvalidImage, errors.ImageError)
    assert errors.FetchFailed.retryable and not errors.InvalidImage.retryable
    assert not errors.FetchFailed("404", retryable=False).retryable
    assert errors.BrokerUnavailable.retryable
    # A full Redis refused the send (nothing stored) and frees memory as workers drain it: send it again.
    assert issubclass(errors.BrokerFull, errors.ResourceExhausted) and errors.BrokerFull.retryable
    assert not errors.ResourceExhausted.retryable and "broker_full" in errors.RETRYABLE_CODES


def test_error_round_trips_through_celery_json_encoding() -> None:
    backend = Backend(app=Celery(set_as_current=False), serializer="json")
    original = errors.ImageTooLarge("image is 9000x9000 pixels")
    wire = backend.prepare_exception(original, serializer="json")
    assert list(wire["exc_message"]) == ["image is 9000x9000 pixels", "image_too_large"]
    rebuilt = backend.exception_to_python(wire)
    assert type(rebuilt) is errors.ImageTooLarge
    assert rebuilt.code == "image_too_large" and rebuilt.message == "image is 9000x9000 pixels"
    assert str(rebuilt) == "[image_too_large] image is 9000x9000 pixels"


def test_error_from_code() -> None:
    assert type(errors.error_from_code("timeout", "slow")) is errors.JobTimeout
    assert type(errors.error_from_code("no_such_code", "x")) is errors.InternalError
