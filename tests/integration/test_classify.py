"""Label scoring on every tiny family checkpoint against a plain reference: one uncached forward pass per
answer over prompt + answer + end-of-turn token, through the processor; several images scored together as
each alone; labels holding special-token text; and its memory: no per-label copy of the prompt's KV."""

from __future__ import annotations

import collections
import math
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from producer.errors import InvalidRequest, JobTimeout
from worker.runtime import LabelScores, Prepared, Prompt, Runtime
from worker.runtime.scoring import NO, YES, LabelQuery
from worker.settings import WorkerSettings

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

FAMILIES = ("mistral", "vicuna", "chatml", "llama3")
TEXT = "Which traffic sign is this?"
QUESTION = "Is there {label} in this image? Answer Yes or No."
LABEL_SETS = {
    "prefixes": ["stop", "stop sign", "stop signs", "sign"],
    "edges": [" cat", "  leading", "!dog", "...?", "猫の写真", "кошка", "stop-sign.", "\nnewline"],
    "one": ["stop"],
    "hundred": [f"{'class' if i % 3 else 'sign'} {i}{'!' * (i % 4)}" for i in range(100)],
}


@pytest.fixture(scope="module", params=FAMILIES)
def runtime(request: pytest.FixtureRequest, cache_dir: Path) -> Runtime:
    return Runtime(WorkerSettings(model=f"tiny:{request.param}", cache_dir=cache_dir, dtype="float32"))


def image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 30, 30))


def reference_logprob(runtime: Runtime, text: str, answer: str) -> float:
    """log P(answer + end of turn | prompt): one forward over the whole conversation, no cache."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    processor = runtime.processor
    prompt = processor.apply_chat_template([user], add_generation_prompt=True)
    full = processor.apply_chat_template([user, reply])
    prompt_ids = processor(images=[image()], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    inputs = processor(images=[image()], text=[full], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    start = 0  # the answer starts where the conversation's tokens leave the prompt's
    while start < len(prompt_ids) and prompt_ids[start] == ids[start]:
        start += 1
    eos = runtime.processor.tokenizer.eos_token_id
    end = next(k for k in range(start, len(ids)) if ids[k] == eos)
    with torch.inference_mode():
        logits = runtime.model(**{**inputs, "input_ids": inputs["input_ids"][:, : end + 1]}).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logprobs[k - 1, ids[k]]) for k in range(start, end + 1))


def prepared(runtime: Runtime, text: str) -> Prepared:
    return runtime.prepare(Prompt(image(), text))


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_exclusive_logprobs_match_the_reference(runtime: Runtime, labels: list[str]) -> None:
    [scores] = runtime.score_labels([prepared(runtime, TEXT)], [labels], queries=[LabelQuery(TEXT)])
    assert not isinstance(scores, Exception)
    expected = [reference_logprob(runtime, TEXT, label) for label in labels]
    assert scores.logprobs == pytest.approx(expected, abs=1e-4)
    softmax = torch.softmax(torch.tensor(expected, dtype=torch.float64), dim=0).tolist()
    assert scores.scores == pytest.approx(softmax, abs=1e-4)
    assert sum(scores.scores) == pytest.approx(1.0)


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_multi_label_yes_no_matches_the_reference(runtime: Runtime, labels: list[str]) -> None:
    item = prepared(runtime, QUESTION.replace("{label}", max(labels, key=len)))
    [scores] = runtime.score_labels([item], [labels], queries=[LabelQuery("", QUESTION)])
    assert not isinstance(scores, Exception)
    questions = [QUESTION.replace("{label}", label) for label in labels]
    yes = [reference_logprob(runtime, q, YES) for q in questions]
    no = [reference_logprob(runtime, q, NO) for q in questions]
    assert scores.logprobs == pytest.approx(yes, abs=1e-4)
    margins = torch.tensor(yes, dtype=torch.float64) - torch.tensor(no, dtype=torch.float64)
    expected = torch.sigmoid(margins).tolist()  # P(Yes) / (P(Yes) + P(No))
    assert scores.scores == pytest.approx(expected, abs=1e-4)
    assert all(0.0 <= score <= 1.0 for score in scores.scores)


def test_eager_attention_takes_the_same_mask(runtime: Runtime, cache_dir: Path) -> None:
    eager = Runtime(runtime.settings.model_copy(update={"attn_implementation": "eager"}))
    assert eager.attention == "eager"
    labels = LABEL_SETS["prefixes"]
    [expected] = runtime.score_labels([prepared(runtime, TEXT)], [labels], queries=[LabelQuery(TEXT)])
    [scores] = eager.score_labels([prepared(eager, TEXT)], [labels], queries=[LabelQuery(TEXT)])
    assert not isinstance(scores, Exception) and not isinstance(expected, Exception)
    assert scores.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def batch_mates(runtime: Runtime) -> list[tuple[Prepared, list[str], LabelQuery]]:
    """Four images of different sizes, each with its own labels; exclusive and multi-label side by side."""
    question = "Does this picture show {label}? Answer Yes or No."
    multi = [["nudity", "violence", "a red stop sign"], ["cat"]]
    exclusive = [LABEL_SETS["prefixes"], ["stop", "go", "猫"]]
    jobs = []
    for index, size in enumerate([(64, 48), (40, 90), (700, 200), (300, 300)]):
        picture = Image.new("RGB", size, (30 * index, 200, 90))
        if index % 2:  # multi-label, beside an exclusive job
            labels = multi[index // 2]
            text = question.replace("{label}", max(labels, key=len))
            query = LabelQuery(text, question)
        else:
            labels = exclusive[index // 2]
            text = f"{TEXT} Answer with one of: {', '.join(labels)}."
            query = LabelQuery(text)
        jobs.append((runtime.prepare(Prompt(picture, text)), labels, query))
    return jobs


def test_images_scored_together_equal_each_scored_alone(runtime: Runtime) -> None:
    jobs = batch_mates(runtime)
    alone = [runtime.score_labels([p], [labels], queries=[q])[0] for p, labels, q in jobs]
    assert len({p.prompt_tokens for p, _, _ in jobs}) == 4  # different sizes: the caches are padded
    items, labels, queries = (list(column) for column in zip(*jobs, strict=True))
    planned = [runtime._plan_scoring(*job) for job in jobs]
    for count in (2, 3, 4):  # in ONE forward, however unlike their shapes
        with torch.inference_mode():
            together = runtime._score_together(planned[:count])
        for scores, expected in zip(together, alone, strict=False):
            assert isinstance(scores, LabelScores) and isinstance(expected, LabelScores)
            assert scores.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
            assert scores.scores == pytest.approx(expected.scores, abs=1e-4)
    for scores, expected in zip(runtime.score_labels(items, labels, queries=queries), alone, strict=True):
        assert isinstance(scores, LabelScores) and isinstance(expected, LabelScores)
        assert scores.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        assert scores.scores == pytest.approx(expected.scores, abs=1e-4)


def test_a_failing_job_does_not_fail_its_batch_mates(runtime: Runtime) -> None:
    (first, first_labels, first_query), _, (last, last_labels, last_query) = batch_mates(runtime)[:3]
    bad = [f"a {runtime.processor.tokenizer.eos_token} b"]  # a special token's text: refused
    items, labels = [first, first, first, last], [first_labels, bad, first_labels, last_labels]
    deadlines = [math.inf, math.inf, time.monotonic() - 1, math.inf]  # the third is already late
    queries = [first_query, first_query, first_query, last_query]
    scored = runtime.score_labels(items, labels, deadlines, queries=queries)
    assert isinstance(scored[1], InvalidRequest) and "special token" in scored[1].message
    assert isinstance(scored[2], JobTimeout)
    for index in (0, 3):
        [expected] = runtime.score_labels([items[index]], [labels[index]], queries=[queries[index]])
        assert scored[index].logprobs == pytest.approx(expected.logprobs, abs=1e-4)  # type: ignore[union-attr]


SPECIAL_TEXT = ["</s>", "<|im_end|>", "<|eot_id|>", "[INST]", "<image>", "<|start_header_id|>"]


def test_labels_with_special_token_text_are_refused_or_scored_as_plain_text(runtime: Runtime) -> None:
    """A label holding one of this tokenizer's special tokens is refused (it would be cut short or read as a
    control token); the other families' special strings are plain text here and score as the reference."""
    tokenizer = runtime.processor.tokenizer
    specials = {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
    refused = [f"a {text} b" for text in SPECIAL_TEXT if text in specials]
    plain = [f"a {text} b" for text in SPECIAL_TEXT if text not in specials]
    assert refused and plain and "<image>" in " ".join(refused)
    item = prepared(runtime, TEXT)
    for label in refused:
        [scores] = runtime.score_labels([item], [["cat", label]], queries=[LabelQuery(TEXT)])
        assert isinstance(scores, InvalidRequest) and repr(label) in scores.message
    [scores] = runtime.score_labels([item], [plain], queries=[LabelQuery(TEXT)])
    assert isinstance(scores, LabelScores)
    assert scores.logprobs == pytest.approx(
        [reference_logprob(runtime, TEXT, label) for label in plain], abs=1e-4
    )


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under it and still alive; ``peak``: their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: collections.Counter[int] = collections.Counter()
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.holders[key] += 1
                weakref.finalize(tensor, self._release, key)
        return output

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.current -= self.sizes.pop(key)


def peak_scoring_bytes(runtime: Runtime, item: Prepared, text: str, labels: list[str]) -> int:
    with torch.inference_mode(), LiveTensorBytes() as live:
        [scores] = runtime.score_labels([item], [labels], queries=[LabelQuery(text)])
    assert not isinstance(scores, Exception)
    return live.peak


def test_a_hundred_labels_make_no_copy_of_the_prompt_kv(runtime: Runtime) -> None:
    config = runtime.model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # K and V, fp32
    labels = LABEL_SETS["hundred"]

    def growth(text: str) -> tuple[int, int]:
        """What 99 more labels add to the peak, and the prompt's length."""
        item = prepared(runtime, text)
        alone = peak_scoring_bytes(runtime, item, text, labels[:1])
        return peak_scoring_bytes(runtime, item, text, labels) - alone, item.prompt_tokens

    short, short_tokens = growth("Which sign?")
    long, long_tokens = growth("Which traffic sign is this, and what does it tell a driver to do? " * 20)
    assert long_tokens > short_tokens + 500
    # A copy of the prompt's KV per label would add 99 x the prompt's KV, more with a longer prompt;
    # what the labels add is their own tokens: about the same whatever the prompt's length.
    copy = 99 * per_token * (long_tokens - short_tokens)
    assert long < short + 0.1 * copy, (short, long, copy)
    assert long < 0.1 * 99 * per_token * long_tokens
