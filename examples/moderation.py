"""A moderation flow: categories with thresholds, a decision per image, and the bulk CLI tagging a folder.

    python -m devtools.devstack -- .venv/bin/python examples/moderation.py [FOLDER]

Starts a tiny-model worker on its own queue as ``make demo`` does (random weights: the scores are noise,
the plumbing is real); with a real checkpoint behind the queue the same code moderates for real.
Multi-label classify scores each category on its own: P(Yes) / (P(Yes) + P(No)) to "Is there {label} in
this image? Answer Yes or No."; the result's ``labels`` are the categories at or above their threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import IMAGES, _start_worker

from producer import LlavaClient, load_settings
from producer.settings import ClientSettings

# Category -> threshold: block an image when a category's score is at or above it.
POLICY = {"nudity": 0.7, "violence": 0.6, "weapons": 0.5, "drugs": 0.8}
REVIEW_MARGIN = 0.1  # within this below a threshold: a person looks at it


def decide(scores: dict[str, float], flagged: list[str]) -> str:
    """``block`` if a category is at or above its threshold, ``review`` if one is close, else ``allow``."""
    if flagged:
        return "block"
    if any(scores[name] >= POLICY[name] - REVIEW_MARGIN for name in POLICY):
        return "review"
    return "allow"


def moderate_one(client: LlavaClient, image: Path, queue: str) -> None:
    """One upload, as a web backend would check it: send, wait, decide."""
    job = client.classify(image, labels=list(POLICY), multi_label=True, threshold=POLICY, queue=queue)
    result = job.get(timeout=120)
    scores = result.scores or {}
    print(f"{image.name}: {decide(scores, result.labels or [])}")
    for name, score in scores.items():
        mark = "FLAGGED" if name in (result.labels or []) else ""
        print(f"  {name:<9} {score:.3f}  (threshold {POLICY[name]})  {mark}")


def tag_folder(settings: ClientSettings, folder: Path, queue: str) -> list[dict[str, Any]]:
    """The bulk CLI over a folder: one JSON line per image (resumable with the same --out)."""
    out = Path(tempfile.mkdtemp(prefix="moderation-")) / "tags.jsonl"
    thresholds = ",".join(f"{name}={value}" for name, value in POLICY.items())
    argv = [sys.executable, "-m", "producer.cli", "classify", str(folder), "--labels", ",".join(POLICY)]
    argv += ["--multi-label", "--threshold", thresholds, "--out", str(out), "--queue", queue, "--no-progress"]
    env = {"LLAVA_BROKER_URL": settings.broker_url, "LLAVA_RESULT_BACKEND": settings.result_backend}
    subprocess.run(argv, env={**os.environ, **env}, check=False, timeout=600)
    print(f"\nbulk tags written to {out}")
    return [json.loads(line) for line in out.read_text().splitlines()]


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES
    settings = load_settings(ClientSettings)
    client = LlavaClient(settings)
    queue = f"moderation-{uuid.uuid4().hex[:8]}"
    worker = _start_worker(settings, client, queue)
    try:
        moderate_one(client, IMAGES / "stop_sign.jpg", queue)
        for record in tag_folder(settings, folder, queue):
            if "error" in record:
                print(f"{record['image']}: error {record['error']['code']}")
                continue
            result = record["result"]
            decision = decide(result["scores"], result["labels"])
            print(f"{record['image']}: {decision} {result['labels']}")
    finally:
        client.close()
        worker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
