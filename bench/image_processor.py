"""The LLaVA-NeXT image processors side by side: transformers' PIL one vs its fast torchvision one.

    python bench/image_processor.py [--rounds 21]

On the bench checkpoint's processor (real CLIP 336 px anyres geometry), for the 8 mixed-size bench images and
the example photos:
whether both give the same input ids (so the same image token counts), image sizes and tile shapes, and how
far apart their pixel values are; then each one's time for a 640x480 image, interleaved rounds, one torch
thread, medians. Needs torchvision (the worker's Docker image has it; the CPU ``make install`` does not):
without it, it says so and stops. Writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import build_checkpoint, make_images, median  # noqa: E402


def compare(processors: dict[str, Any], images: list[Any], text: str) -> list[dict[str, Any]]:
    rows = []
    for image in images:
        pil, fast = (p(images=[image], text=[text], return_tensors="pt") for p in processors.values())
        same_shape = pil["pixel_values"].shape == fast["pixel_values"].shape
        diff = (pil["pixel_values"] - fast["pixel_values"]).abs() if same_shape else None
        rows.append(
            {
                "size": list(image.size),
                "same_input_ids": bool(pil["input_ids"].equal(fast["input_ids"])),
                "same_image_sizes": bool(pil["image_sizes"].equal(fast["image_sizes"])),
                "same_tiles": same_shape,
                "pixel_max_abs_diff": round(float(diff.max()), 4) if diff is not None else None,
                "pixel_mean_abs_diff": round(float(diff.mean()), 6) if diff is not None else None,
            }
        )
    return rows


def timings(processors: dict[str, Any], image: Any, text: str, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in processors}
    for _ in range(rounds):
        for name, processor in processors.items():
            started = time.perf_counter()
            processor(images=[image], text=[text], return_tensors="pt")
            times[name].append(round((time.perf_counter() - started) * 1000, 2))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    from worker.runtime.loading import image_processor_backend

    if image_processor_backend() != "torchvision":
        print(
            "torchvision does not import here: nothing to compare (pip install torchvision)", file=sys.stderr
        )
        return 2
    import torch
    import torchvision
    from PIL import Image
    from transformers import LlavaNextProcessor

    torch.set_num_threads(1)
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    processors = {
        b: LlavaNextProcessor.from_pretrained(checkpoint, backend=b) for b in ("pil", "torchvision")
    }
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = processors["pil"].apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in make_images(8)]
    images += [Image.open(path).convert("RGB") for path in sorted((ROOT / "examples" / "images").iterdir())]
    rows = compare(processors, images, text)
    image = next(i for i in images if i.size == (640, 480))
    timings(processors, image, text, 2)  # warm-up
    times = timings(processors, image, text, args.rounds)
    medians = {name: median(values) for name, values in times.items()}
    for row in rows:
        print(row)
    print(
        f"640x480, median of {args.rounds} interleaved rounds: PIL {medians['pil']:.1f} ms, torchvision "
        f"{medians['torchvision']:.1f} ms ({medians['pil'] / medians['torchvision']:.2f}x)"
    )
    meta = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "classes": {name: type(p.image_processor).__name__ for name, p in processors.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"image-processor-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    result = {"meta": meta, "compare": rows, "ms_640x480_median": medians, "ms_640x480": times}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
