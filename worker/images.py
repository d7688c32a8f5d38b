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

import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import FetchFailed, FetchForbidden, ImageTooLarge, InvalidImage, InvalidRequest
from worker.settings import WorkerSettings

_CHUNK = 64 * 1024


def load_image(reference: str, settings: WorkerSettings) -> Image.Image:
    """Fetch or decode ``reference`` and return an RGB image within the byte and pixel caps."""
    return decode_image(read_image_bytes(reference, settings), settings.max_image_pixels)


def read_image_bytes(reference: str, settings: WorkerSettings) -> bytes:
    head = reference[:8].lower()
    if head.startswith("data:"):
        return _decode_data_uri(reference, settings.max_image_bytes)
    if head.startswith(("http://", "https://")):
        return _fetch(reference, settings)
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


def _fetch(url: str, settings: WorkerSettings) -> bytes:
    cap = settings.max_image_bytes
    try:
        with requests.get(url, stream=True, timeout=settings.fetch_timeout) as response:
            if response.status_code >= 400:
                transient = response.status_code >= 500 or response.status_code in (408, 429)
                raise FetchFailed(f"fetching {url} returned HTTP {response.status_code}", retryable=transient)
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cap:
                raise ImageTooLarge(f"{url} is {length} bytes, over the {cap}-byte cap (max_image_bytes)")
            chunks, size = [], 0
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise ImageTooLarge(f"{url} is over the {cap}-byte cap (max_image_bytes)")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise FetchFailed(f"fetching {url} failed: {type(exc).__name__}") from None


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


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully, apply EXIF orientation, composite transparency on white, return RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"image is {image.width}x{image.height} pixels, over the {max_pixels}-pixel cap"
                )
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"cannot decode image ({len(data)} bytes): not a recognised image format"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot decode image ({len(data)} bytes): {exc}") from None
    return _to_rgb(ImageOps.exif_transpose(image))


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
