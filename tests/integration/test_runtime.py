"""The runtime on the real tiny checkpoint (no queue): loading, token counts, batching (label scoring:
test_classify.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.runtime import Prompt, Runtime, Sampling, StartupError
from worker.runtime.tiny_model import build
from worker.settings import WorkerSettings

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint: Path) -> Runtime:
    return Runtime(WorkerSettings(model=str(tiny_checkpoint), device="cpu", dtype="float32"))


def sample_prompts() -> list[Prompt]:
    return [
        Prompt(Image.open(IMAGES / "stop_sign.jpg").convert("RGB"), "What does the sign say?"),
        Prompt(Image.new("RGB", (100, 300), (10, 200, 10)), "What colour is this?"),
        Prompt(
            Image.open(IMAGES / "radar_chart.png").convert("RGB"), "Describe the chart in detail, please."
        ),
    ]


def test_tiny_checkpoint_is_a_real_small_hf_checkpoint(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in tiny_checkpoint.iterdir()) < 1_000_000
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llava_next"
    assert config["vision_feature_select_strategy"] == "default"


def test_tiny_checkpoint_build_is_deterministic(tmp_path: Path, tiny_checkpoint: Path) -> None:
    build(tmp_path / "again", "mistral")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_prompt_goes_through_the_chat_template(runtime: Runtime) -> None:
    assert (
        runtime.prompt_text("What is shown in this image?")
        == "[INST] <image>\nWhat is shown in this image? [/INST]"
    )


def test_image_token_count_matches_the_anyres_geometry(runtime: Runtime) -> None:
    # 640x480 on 32 px tiles with pinpoints up to 64x64: the processor's count, CLS token accounted for.
    [output] = runtime.generate([runtime.prepare(sample_prompts()[0])], Sampling(max_new_tokens=1))
    expected = runtime.processor._get_number_of_features(480, 640, 32, 32) - 1
    assert output.image_tokens == expected
    assert output.prompt_tokens > output.image_tokens


def test_batched_generation_equals_one_by_one(runtime: Runtime) -> None:
    prepared = [runtime.prepare(prompt) for prompt in sample_prompts()]
    sampling = Sampling(max_new_tokens=12)
    batched = runtime.generate(prepared, sampling)
    alone = [runtime.generate([item], sampling)[0] for item in prepared]
    assert batched == alone
    assert len({output.prompt_tokens for output in batched}) == 3  # left padding really happened


def test_collate_matches_the_processors_own_batch(runtime: Runtime) -> None:
    prompts = sample_prompts()
    collated = runtime.collate([runtime.prepare(prompt) for prompt in prompts])
    reference = runtime.processor(
        images=[p.image for p in prompts],
        text=[runtime.prompt_text(p.text) for p in prompts],
        return_tensors="pt",
        padding=True,
    )
    for name in ("input_ids", "attention_mask", "image_sizes", "pixel_values"):
        assert torch.equal(collated[name], reference[name]), name


def test_batched_equals_unbatched_at_the_real_anyres_geometry(tmp_path_factory) -> None:
    path = build(tmp_path_factory.mktemp("real") / "ckpt", "mistral", geometry="real")
    real = Runtime(WorkerSettings(model=str(path), device="cpu", dtype="float32"))
    images = [Image.new("RGB", size, color) for size, color in [((640, 480), "red"), ((300, 900), "blue")]]
    prepared = [real.prepare(Prompt(image, f"Question {i}?")) for i, image in enumerate(images)]
    assert all(1176 <= item.image_tokens <= 2928 for item in prepared)
    sampling = Sampling(max_new_tokens=6)
    assert real.generate(prepared, sampling) == [real.generate([item], sampling)[0] for item in prepared]


def test_flash_attention_on_cpu_is_a_startup_error(tiny_checkpoint: Path) -> None:
    settings = WorkerSettings(
        model=str(tiny_checkpoint), device="cpu", attn_implementation="flash_attention_2"
    )
    with pytest.raises(StartupError, match="flash_attention_2 needs a CUDA GPU"):
        Runtime(settings)
