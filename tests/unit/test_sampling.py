"""Sampling parameters: the contract refuses temperatures that would overflow, and a row's next token is
picked without overflow, or the row alone fails when its logits are not finite."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from producer import ClientSettings, InternalError, InvalidRequest, LlavaClient
from producer.contract import MAX_TEMPERATURE, MIN_TEMPERATURE, CaptionRequest, GenerationParams
from worker.runtime import Sampling
from worker.runtime.decoding import Row, advance, pick

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize("temperature", [1e-39, 1e-40, 5e-324, 1e-5, 0.009])
def test_a_temperature_between_greedy_and_the_minimum_is_refused(temperature: float) -> None:
    with pytest.raises(ValidationError, match=r"temperature\n.*must be 0 \(greedy\) or at least 0.01"):
        GenerationParams(temperature=temperature)
    with pytest.raises(ValidationError, match="temperature"):
        CaptionRequest.model_validate({"image": PNG, "generation": {"temperature": temperature}})


@pytest.mark.parametrize("temperature", [0.0, MIN_TEMPERATURE, 0.7, MAX_TEMPERATURE])
def test_greedy_and_sampling_temperatures_are_accepted(temperature: float) -> None:
    assert GenerationParams(temperature=temperature).temperature == temperature


@pytest.mark.parametrize("temperature", [-0.0001, 2.0001, math.inf, math.nan])
def test_temperatures_out_of_range_are_refused(temperature: float) -> None:
    with pytest.raises(ValidationError, match="temperature"):
        GenerationParams(temperature=temperature)


def test_the_client_refuses_an_overflowing_temperature_before_sending() -> None:
    offline = LlavaClient(
        ClientSettings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/1")
    )
    with pytest.raises(InvalidRequest, match=r"generation\.temperature: .*at least 0\.01"):
        offline.caption(PNG, temperature=1e-39)


def _row(temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 4) -> Row:
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    generator = torch.Generator().manual_seed(0) if temperature > 0 else None
    return Row(prepared=None, sampling=sampling, generator=generator)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e-39, 1e-46, MIN_TEMPERATURE])
def test_a_tiny_temperature_picks_the_most_likely_token_without_overflow(temperature: float) -> None:
    logits = torch.tensor([3.0, 40.0, -1e30, 39.5, 1e-3], dtype=torch.float16)
    assert pick(_row(temperature), logits) == 1
    assert pick(_row(temperature, top_p=1e-9), logits) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_fail_their_row_alone(bad: float, temperature: float) -> None:
    logits = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(InternalError, match="not finite"):
        pick(_row(temperature), logits)
    row = _row(temperature)
    advance(row, logits, eos_ids={0})
    assert row.ended and isinstance(row.failure, InternalError) and row.tokens == []


def test_masked_logits_still_sample() -> None:
    """-inf is a masked token, not an overflow: it is never picked, the others still are."""
    logits = torch.tensor([-math.inf, 0.0, -math.inf, 0.1])
    sampled = _row(1.0)
    assert {pick(sampled, logits) for _ in range(20)} == {1, 3}
    row = _row(0.0, max_new_tokens=2)
    advance(row, logits, eos_ids={7})
    advance(row, logits, eos_ids={7})
    assert row.tokens == [3, 3] and row.ended and row.failure is None
