"""Load the image a request names (blob reference, ``data:`` URI, http(s) URL or allowed local path) as an
RGB PIL image.

Every failure is a typed, coded error from :mod:`producer.errors`. URLs are fetched by :mod:`worker.fetch`
(its SSRF guard and budgets) and ``data:`` URIs decoded by the contract's
:func:`~producer.contract.decode_data_uri` (the producer checks inline images with it too); here: the blob
read, the local-root allow-list, and image decoding under the format allow-list and the byte and pixel caps.

Memory: a decoded image is shrunk at once to what the LLaVA-NeXT processor can use (``keep_side``: its
largest anyres grid side; JPEG is even decoded at 1/2..1/8 scale directly with ``draft``), and the pixels
decoded at full size at once in a worker are bounded by ``decode_pixel_budget`` (:class:`PixelBudget`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import struct
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError
from redis.exceptions import RedisError

from producer.blobs import BlobStore
from producer.contract import decode_data_uri, image_kind
from producer.errors import (
    FetchFailed,
    FetchForbidden,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobTimeout,
    LlavaError,
)
from worker.fetch import FetchAborted, FetchRegistry, fetch
from worker.fetch_policy import FetchPolicy, Resolver, system_resolver
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Until the processor is known (keep_side_for): LLaVA-NeXT's largest anyres grid side at 336 px is 1008 in the
# llava-hf checkpoints; 1344 leaves room for 4-tile grids.
DEFAULT_KEEP_SIDE = 1344
# What Pillow can ``reduce`` in place of the full-size image; other modes are converted first.
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"}
_READ_CHUNK = 1 << 20  # a local file is read in 1 MiB chunks, the job's deadline checked between them
# What malformed image data makes Pillow raise, besides its own errors (truncated chunks, bad EXIF, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)


class PixelBudget:
    """Pixels being decoded at full size at once in one worker: a semaphore weighted by pixels.

    A job takes ``min(pixels, total)`` (one image at the pixel cap always fits) and waits, at most until its
    deadline or the worker's :meth:`abort`, while other jobs' decodes hold the rest.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.waiting = 0
        self._aborted = False
        self._changed = threading.Condition()

    def abort(self) -> int:
        """Warm shutdown: end every wait (and every later one) with :class:`~worker.fetch.FetchAborted`, so
        its job goes back to the queue; decodes already holding pixels finish. Returns how many waited."""
        with self._changed:
            self._aborted = True
            self._changed.notify_all()
            return self.waiting

    @contextmanager
    def hold(self, pixels: int, deadline: float) -> Iterator[None]:
        weight = min(pixels, self.total)
        with self._changed:
            self.waiting += 1
            try:
                enough = self._changed.wait_for(
                    lambda: self._aborted or self.free >= weight,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            finally:
                self.waiting -= 1
            if self._aborted:
                raise FetchAborted("the worker shut down while the job waited to decode its image")
            if not enough:
                raise JobTimeout("the job's deadline passed while it waited to decode its image")
            self.free -= weight
        try:
            yield
        finally:
            with self._changed:
                self.free += weight
                self._changed.notify_all()


class ImageLoader:
    """One worker's image loading: its fetch registry (aborted at warm shutdown), its pixel budget, the
    size its processor keeps (``keep_side``, set once the model is loaded) and the blob store images sent by
    reference are read from (``blobs``, set by the Celery app from the result backend)."""

    def __init__(self, settings: WorkerSettings, resolve: Resolver = system_resolver) -> None:
        self.settings = settings
        self.resolve = resolve
        self.fetches = FetchRegistry()
        self.decoding = PixelBudget(settings.decode_pixel_budget)
        self.keep_side = DEFAULT_KEEP_SIDE
        self.blobs: BlobStore | None = None
        _pool_freed_blocks(settings.decode_pixel_budget)

    def load(self, reference: str, deadline: float) -> Image.Image:
        """Fetch or decode ``reference`` (all waits end by ``deadline``, ``time.monotonic()``): an RGB image
        within every cap, shrunk to what the processor keeps. Raises a coded error, or
        :class:`~worker.fetch.FetchAborted` when the worker aborts its fetches and decode waits."""
        data = read_image_bytes(reference, self.settings, self.resolve, deadline, self.fetches, self.blobs)
        return decode_image(
            data,
            self.settings.max_image_pixels,
            self.settings.image_formats,
            self.settings.max_aspect_ratio,
            keep_side=self.keep_side,
            budget=(self.decoding, deadline),
        )

    def abort_fetches(self) -> int:
        """Warm shutdown: end running fetches and waits for decode capacity (and refuse new ones), so their
        jobs go back to the queue; returns how many were running or waiting."""
        return self.fetches.abort() + self.decoding.abort()


def _pool_freed_blocks(pixels: int) -> None:
    """Let Pillow keep freed image blocks for the next decode (its documented memory pool, off by default),
    up to one budget of RGBA pixels, unless ``PILLOW_BLOCKS_MAX`` is set. Without the pool, glibc keeps the
    blocks a thread freed in that thread's own arena: measured, eight threads decoding 40 MP images one
    after another (the budget's turn) kept about 700 MB more resident than with it."""
    if "PILLOW_BLOCKS_MAX" not in os.environ:
        blocks = math.ceil(pixels * 4 / Image.core.get_block_size())
        Image.core.set_blocks_max(max(blocks, Image.core.get_blocks_max()))


def keep_side_for(image_processor: Any) -> int:
    """The longest side the LLaVA-NeXT image processor resizes to: its largest anyres grid side (the base
    view is smaller): an image shrunk no further has at least the pixels the processor's resize keeps."""
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None) or []
    sides = [int(side) for point in pinpoints for side in point]
    return max(sides, default=DEFAULT_KEEP_SIDE)


def read_image_bytes(
    reference: str,
    settings: WorkerSettings,
    resolve: Resolver = system_resolver,
    deadline: float | None = None,
    fetches: FetchRegistry | None = None,
    blobs: BlobStore | None = None,
) -> bytes:
    """The encoded bytes ``reference`` names; a fetch ends by ``fetch_deadline`` or ``deadline``."""
    kind = image_kind(reference)
    if kind == "blob":
        return _read_blob(reference, blobs, settings.max_image_bytes, deadline, fetches or FetchRegistry())
    if kind == "data":
        return decode_data_uri(reference, settings.max_image_bytes)
    if kind == "url":
        return fetch(reference, FetchPolicy.from_settings(settings), resolve, deadline, fetches)
    if kind == "path":
        return _read_local(Path(reference), settings, deadline)
    raise InvalidRequest("image must be an http(s) URL, a data: URI, a blob reference or an absolute path")


BLOB_RETRY_PAUSE = 0.5  # seconds between reads of a blob store that did not answer


def _read_blob(
    reference: str, blobs: BlobStore | None, max_bytes: int, deadline: float | None, fetches: FetchRegistry
) -> bytes:
    """The blob's bytes, read again while the store does not answer (a Redis restart, a failover: each read
    is bounded by the store's socket timeouts and reconnects) until the job's ``deadline``, so a job rides
    out what its queue rides out; ``fetch_failed`` after it, or at once without a deadline. A warm shutdown
    ends the wait (``FetchAborted``: the job goes back to the queue)."""
    if blobs is None:
        raise InvalidRequest(
            "this worker has no blob store (its result backend is not Redis): send the image inline"
        )
    while True:
        try:
            return blobs.get(reference, max_bytes)
        except RedisError as exc:
            if deadline is None or time.monotonic() + BLOB_RETRY_PAUSE >= deadline:
                raise FetchFailed(
                    f"the blob store did not answer: {type(exc).__name__}", retryable=True
                ) from None
            log.warning("the blob store did not answer (%s): reading the image again", type(exc).__name__)
            fetches.pause(BLOB_RETRY_PAUSE)


def _read_local(path: Path, settings: WorkerSettings, deadline: float | None) -> bytes:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
        raise InvalidRequest("the image path is not a usable file path") from None
    roots = [root.resolve() for root in settings.local_image_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise FetchForbidden(f"local path {path} is not under an allowed root (local_image_roots)")
    try:
        with open(_open_regular_file(resolved, path, settings.max_image_bytes), "rb", buffering=0) as file:
            return _read_by(file, path, settings.max_image_bytes, deadline)
    except LlavaError:
        raise  # already coded (JobTimeout is also an OSError)
    except OSError as exc:
        raise InvalidImage(f"cannot read {path}: {exc.strerror or exc}") from None


def _open_regular_file(resolved: Path, path: Path, max_bytes: int) -> int:
    """A descriptor of ``resolved`` if it is a regular file within ``max_bytes``. Opened non-blocking, so
    opening a FIFO never waits for a writer (fstat refuses it next), and not through a final symlink: the
    root check saw the path with every link resolved."""
    fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd)
        if not stat.S_ISREG(mode.st_mode):
            raise InvalidImage(f"{path} is not a regular file ({_file_kind(mode.st_mode)})")
        if mode.st_size > max_bytes:
            raise ImageTooLarge(f"{path} is over the {max_bytes}-byte cap (max_image_bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_by(file: BinaryIO, path: Path, max_bytes: int, deadline: float | None) -> bytes:
    """Read at most ``max_bytes`` (the file may have grown since fstat), checking ``deadline`` between
    chunks: a slow filesystem ends the job as a timeout, not past it."""
    chunks, size = [], 0
    while chunk := file.read(min(_READ_CHUNK, max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLarge(f"{path} is over the {max_bytes}-byte cap (max_image_bytes)")
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeout(f"the job's deadline passed while it read {path}")
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "a device")


def decode_image(
    data: bytes,
    max_pixels: int,
    formats: list[str] | None = None,
    max_aspect_ratio: float | None = None,
    keep_side: int | None = None,
    budget: tuple[PixelBudget, float] | None = None,
) -> Image.Image:
    """Decode ``data`` (first frame), apply EXIF orientation, composite transparency on white, RGB.

    With ``keep_side``, an image whose shorter side is at least twice that is shrunk by an integer factor
    dividing both sides (JPEG: while decoding), its shorter side staying at or above ``keep_side``; other
    images are left exactly as decoded. With ``budget`` (a :class:`PixelBudget` and a deadline), the
    full-size decode waits for its pixels in the budget.
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=formats)
            _check_geometry(image.width, image.height, max_pixels, max_aspect_ratio)
            if keep_side:
                _draft(image, keep_side)
            if budget is None:
                image = _load_reduced(image, keep_side)
            else:
                with budget[0].hold(image.width * image.height, budget[1]):
                    image = _load_reduced(image, keep_side)
            return _to_rgb(ImageOps.exif_transpose(image))
    except LlavaError:
        raise  # already coded (JobTimeout is also an OSError)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        allowed = ", ".join(formats) if formats else "any Pillow format"
        raise InvalidImage(
            f"cannot decode image ({len(data)} bytes): not a recognised image format ({allowed})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"cannot decode image ({len(data)} bytes): {exc}") from None


def shrink_factor(width: int, height: int, keep_side: int, factors: Iterable[int] | None = None) -> int:
    """The largest integer factor dividing both sides that keeps the shorter side at or above ``keep_side``,
    or 1. Dividing both sides exactly keeps the aspect ratio exact, so the LLaVA-NeXT processor picks the same
    anyres grid and the same number of image tokens as for the full-size image."""
    common, top = math.gcd(width, height), min(width, height) // keep_side
    candidates = range(2, top + 1) if factors is None else factors
    return max((f for f in candidates if 2 <= f <= top and common % f == 0), default=1)


def _draft(image: Image.Image, keep_side: int) -> None:
    """JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale directly (never the full-size pixels)."""
    factor = shrink_factor(image.width, image.height, keep_side, (2, 4, 8))
    if image.format == "JPEG" and factor > 1:
        image.draft(None, (image.width // factor, image.height // factor))


def _load_reduced(image: Image.Image, keep_side: int | None) -> Image.Image:
    """Decode, then shrink by :func:`shrink_factor` (box filter) before anything else copies the pixels."""
    image.load()
    factor = shrink_factor(image.width, image.height, keep_side) if keep_side else 1
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE:
        image = _to_rgb(image)
    return image.reduce(factor)


def _check_geometry(width: int, height: int, max_pixels: int, max_aspect_ratio: float | None) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} pixels, over the {max_pixels}-pixel cap (max_image_pixels)"
        )
    ratio = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        raise InvalidImage(
            f"image is {width}x{height}: aspect ratio {ratio:.1f} is over the cap {max_aspect_ratio:g} "
            "(max_aspect_ratio)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)  # its alpha band is the mask: no extra full-size copies
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
