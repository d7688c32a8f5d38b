"""Memory with max-cap images: eight concurrent 6300 x 6300 PNGs (under the 40 MP pixel cap) through a real
tiny worker. Prints the worker's peak RSS (the README's figure comes from ``make bench-memory``); the only
check on it is a generous sanity bound (before the decode budget, these jobs added 3.6 GB)."""

from __future__ import annotations

import uuid

from bench.image_memory import concurrent_images
from producer import LlavaClient


def test_eight_concurrent_max_cap_images_succeed_within_a_bounded_peak(
    client: LlavaClient, start_worker
) -> None:
    queue = f"memory-{uuid.uuid4().hex[:8]}"
    worker, _ = start_worker(queue)
    assert worker.process is not None
    figures = concurrent_images(client, queue, worker.process.pid, jobs=8, side=6300)
    print(
        f"\n8 concurrent 6300x6300 PNGs, tiny worker: peak RSS {figures['ready_peak_mb']:.0f} MB ready -> "
        f"{figures['peak_mb']:.0f} MB (+{figures['growth_mb']:.0f} MB)"
    )
    assert figures["image_tokens"] > 0
    assert figures["growth_mb"] < 1500, "eight max-cap images decoded at once (LLAVA_DECODE_PIXEL_BUDGET)?"
