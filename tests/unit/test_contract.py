"""Request validation: the contract models and the client's checks before anything is sent."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from producer import ClientSettings, ImageTooLarge, InvalidImage, InvalidRequest, LlavaClient
from producer.contract import (
    MAX_LABELS,
    MAX_NEW_TOKENS_LIMIT,
    CaptionRequest,
    ClassifyRequest,
    VQARequest,
    decode_data_uri,
)

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture
def offline_client() -> LlavaClient:
    """A client whose broker is never contacted: every call below fails validation first."""
    return LlavaClient(
        ClientSettings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/1")
    )


def test_vqa_requires_a_question() -> None:
    with pytest.raises(ValidationError, match="question"):
        VQARequest.model_validate({"image": PNG})
    with pytest.raises(ValidationError, match="at least 1 character"):
        VQARequest(image=PNG, question="   ")


def test_classify_labels_must_be_non_empty_and_distinct() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        ClassifyRequest(image=PNG, labels=[])
    with pytest.raises(ValidationError, match="distinct"):
        ClassifyRequest(image=PNG, labels=["cat", "cat"])
    with pytest.raises(ValidationError, match="at most"):
        ClassifyRequest(image=PNG, labels=[f"l{i}" for i in range(MAX_LABELS + 1)])
    assert ClassifyRequest(image=PNG, labels=[" cat ", "dog"]).labels == ["cat", "dog"]


def test_too_many_new_tokens_is_refused() -> None:
    with pytest.raises(ValidationError, match="less than or equal"):
        CaptionRequest.model_validate(
            {"image": PNG, "generation": {"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}}
        )
    with pytest.raises(ValidationError):
        CaptionRequest.model_validate({"image": PNG, "generation": {"max_new_tokens": 0}})


def test_unknown_fields_and_schemes_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        CaptionRequest.model_validate({"image": PNG, "pickle": "x"})
    with pytest.raises(ValidationError, match="scheme 'ftp'"):
        CaptionRequest(image="ftp://example.com/a.png")
    with pytest.raises(ValidationError, match="absolute path"):
        CaptionRequest(image="relative/a.png")
    assert CaptionRequest(image="https://example.com/a.png").prompt is None


def test_client_turns_validation_errors_into_invalid_request(offline_client: LlavaClient) -> None:
    with pytest.raises(InvalidRequest, match="question") as error:
        offline_client.vqa(b"\x89PNG\r\n\x1a\n", "")
    assert error.value.code == "invalid_request"
    with pytest.raises(InvalidRequest, match="labels"):
        offline_client.classify(b"\x89PNG\r\n\x1a\n", labels=[])
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        offline_client.caption(b"\x89PNG\r\n\x1a\n", max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)
    with pytest.raises(InvalidRequest, match="unknown argument"):
        offline_client.caption(b"\x89PNG\r\n\x1a\n", beams=4)


# -- data: URIs: one decoder for the producer and the worker ----------------------------------------------


def test_data_uri_decodes_mime_wrapped_base64_up_to_the_cap_exactly() -> None:
    for size in (1, 10, 1000, 3000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        text = base64.b64encode(data).decode()
        wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
        assert decode_data_uri("data:image/png;base64," + wrapped, max_bytes=size) == data


@pytest.mark.parametrize(
    "uri",
    ["data:image/png;base64,", "data:image/png;base64,abc", "data:image/png," + "AAAA", "data:image/png"],
    ids=["empty", "bad-padding", "no-base64-marker", "no-comma"],
)
def test_data_uri_that_is_not_base64_image_data_is_invalid_image(uri: str) -> None:
    with pytest.raises(InvalidImage) as exc:
        decode_data_uri(uri, max_bytes=1000)
    assert exc.value.code == "invalid_image"


@pytest.mark.parametrize("size", [11, 1001, 100_000], ids=["just-over", "over", "far-over"])
def test_data_uri_over_the_cap_is_image_too_large(size: int) -> None:
    uri = "data:image/png;base64," + base64.b64encode(bytes(size)).decode()
    with pytest.raises(ImageTooLarge, match="max_image_bytes") as exc:
        decode_data_uri(uri, max_bytes=size - 1)
    assert exc.value.code == "image_too_large"
