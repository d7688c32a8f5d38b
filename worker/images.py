"""Load the image a request names (http(s) URL, ``data:`` URI or allowed local path) as an RGB PIL image.

Every failure is a typed, coded error from :mod:`producer.errors`. This is the one module that touches
untrusted image input; hardening (SSRF guard, format allow-list) lives here too.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import FetchForbidden, ImageTooLarge, InvalidImage, InvalidRequest
from worker.fetch import FetchPolicy, Resolver, fetch, system_resolver
from worker.settings import WorkerSettings


def load_image(reference: str, settings: WorkerSettings, resolve: Resolver = system_resolver) -> Image.Image:
    """Fetch or decode ``reference`` and return an RGB image within every cap in ``settings``."""
    data = read_image_bytes(reference, settings, resolve)
    return decode_image(data, settings.max_image_pixels, settings.image_formats, settings.max_aspect_ratio)


def fetch_policy(settings: WorkerSettings) -> FetchPolicy:
    return FetchPolicy.from_allow_list(
        settings.fetch_allow,
        max_bytes=settings.max_image_bytes,
        timeout=settings.fetch_timeout,
        deadline=settings.fetch_deadline,
        max_redirects=settings.fetch_max_redirects,
        retries=settings.fetch_retries,
        backoff=settings.fetch_backoff,
    )


def read_image_bytes(reference: str, settings: WorkerSettings, resolve: Resolver = system_resolver) -> bytes:
    head = reference[:8].lower()
    if head.startswith("data:"):
        return _decode_data_uri(reference, settings.max_image_bytes)
    if head.startswith(("http://", "https://")):
        return fetch(reference, fetch_policy(settings), resolve)
    if reference.startswith("/"):
        return _read_local(Path(reference), settings)
    raise InvalidRequest("image must be an http(s) URL, a data: URI or an absolute path")


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, body = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidImage("data: URI must look like data:<mime>;base64,<payload>")
    if len(body) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"inline image is over the {max_bytes}-byte cap (max_image_bytes)")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"data: URI payload is not valid base64: {exc}") from None
    if not data:
        raise InvalidImage("data: URI payload is empty")
    return data


def _read_local(path: Path, settings: WorkerSettings) -> bytes:
    resolved = path.resolve()
    roots = [root.resolve() for root in settings.local_image_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise FetchForbidden(f"local path {path} is not under an allowed root (local_image_roots)")
    try:
        if resolved.stat().st_size > settings.max_image_bytes:
            raise ImageTooLarge(f"{path} is over the {settings.max_image_bytes}-byte cap (max_image_bytes)")
        return resolved.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read {path}: {exc.strerror or exc}") from None


def decode_image(
    data: bytes,
    max_pixels: int,
    formats: list[str] | None = None,
    max_aspect_ratio: float | None = None,
) -> Image.Image:
    """Decode ``data`` fully (first frame), apply EXIF orientation, composite transparency on white, RGB."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            _check_geometry(image.width, image.height, max_pixels, max_aspect_ratio)
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        allowed = ", ".join(formats) if formats else "any Pillow format"
        raise InvalidImage(
            f"cannot decode image ({len(data)} bytes): not a recognised image format ({allowed})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot decode image ({len(data)} bytes): {exc}") from None
    return _to_rgb(ImageOps.exif_transpose(image))


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
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
