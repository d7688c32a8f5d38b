"""Every prompt family: golden prompts, each tiny family checkpoint through the real queue, the seed's custom
config, and the start-up refusals (FlashAttention-2 or 4-bit on a CPU, CLIP with 'full' features)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from producer import LlavaClient
from tests.integration.conftest import IMAGES, ROOT, WorkerCli
from worker.runtime import StartupError, resolve_model_source
from worker.runtime.loading import load_processor
from worker.settings import WorkerSettings

QUESTION = "What is shown in this image?"
# As the llava-hf model cards print them.
GOLDEN = {
    "mistral": "[INST] <image>\nWhat is shown in this image? [/INST]",
    "vicuna": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in "
        "this image? ASSISTANT:"
    ),
    "chatml": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this "
        "image?<|im_end|><|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and "
        "vision assistant. You are able to understand the visual content that the user provides, and assist "
        "the user with a variety of tasks using natural language.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown in this image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def family_checkpoint(cache_dir: Path, family: str) -> Path:
    return Path(resolve_model_source(WorkerSettings(model=f"tiny:{family}", cache_dir=cache_dir)))


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_prompt_from_each_tiny_checkpoint(cache_dir: Path, family: str) -> None:
    path = family_checkpoint(cache_dir, family)
    processor = load_processor(str(path), WorkerSettings(model=str(path)))
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == GOLDEN[family]
    special = {processor.tokenizer.decode([i]) for i in processor.tokenizer.all_special_ids}
    assert "<image>" in special and processor.tokenizer.eos_token in special


def test_checkpoint_without_template_uses_the_configured_family(cache_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "no-template"
    shutil.copytree(family_checkpoint(cache_dir, "vicuna"), bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(StartupError, match="ships no chat template: set prompt_family"):
        load_processor(str(bare), WorkerSettings(model=str(bare)))
    processor = load_processor(str(bare), WorkerSettings(model=str(bare), prompt_family="vicuna"))
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == GOLDEN["vicuna"]


@pytest.fixture(scope="module")
def family_workers(start_worker) -> dict[str, tuple[str, str]]:
    """One worker per non-default family (started together) and one on configs/custom-config.yaml."""
    started = {}
    for family in ("vicuna", "chatml", "llama3"):
        queue = f"{family}-{uuid.uuid4().hex[:6]}"
        worker = start_worker(queue, "--model", f"tiny:{family}", wait=False, LLAVA_MODEL_NAME=family)
        started[family] = (*worker, queue)
    queue = f"custom-{uuid.uuid4().hex[:6]}"
    started["custom"] = (
        *start_worker(queue, "--config", str(ROOT / "configs" / "custom-config.yaml"), wait=False),
        queue,
    )
    return started


@pytest.mark.parametrize("family", ["vicuna", "chatml", "llama3"])
def test_each_family_answers_through_the_queue(client: LlavaClient, family_workers, family: str) -> None:
    worker, hostname, queue = family_workers[family]
    worker.wait_ready(client.app, hostname)
    caption = client.caption(IMAGES / "stop_sign.jpg", queue=queue, max_new_tokens=6).get()
    vqa = client.vqa(IMAGES / "radar_chart.png", "How many axes?", queue=queue, max_new_tokens=6).get()
    classify = client.classify(IMAGES / "transparent_logo.png", ["logo", "sign"], queue=queue).get()
    assert {caption.worker, vqa.worker, classify.worker} == {hostname}
    assert caption.model == vqa.model == family
    assert caption.prompt_tokens - caption.image_tokens >= len(GOLDEN[family].split()) // 2
    assert set(classify.scores or {}) == {"logo", "sign"}


def test_custom_config_serves_a_caption(client: LlavaClient, family_workers) -> None:
    worker, hostname, queue = family_workers["custom"]
    worker.wait_ready(client.app, hostname)
    result = client.caption(IMAGES / "stop_sign.jpg", queue=queue, max_new_tokens=4).get()
    assert result.worker == hostname and result.model == "custom-config"
    # 512 px tiles of 32 px patches, grid pinpoints up to 1024 px: far more image tokens than the tiny model.
    assert result.image_tokens > 500


def test_four_bit_on_cpu_stops_the_worker(worker_cli: WorkerCli) -> None:
    status, output = worker_cli(LLAVA_QUANTIZATION="4bit")
    assert status == 1
    assert "quantization=4bit needs a CUDA GPU" in output


def test_clip_with_full_features_stops_the_worker(worker_cli: WorkerCli, tmp_path: Path) -> None:
    config = tmp_path / "full.yaml"
    config.write_text(
        (ROOT / "configs" / "custom-config.yaml").read_text().replace("strategy: default", "strategy: full")
    )
    status, output = worker_cli("--config", str(config))
    assert status == 1
    assert "keeps CLIP's CLS token" in output
