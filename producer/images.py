"""Turn what a caller passes as an image into what is sent: an http(s) URL as it is, anything inline as its
raw bytes (:func:`image_source`), which the client stores in the blob store or, small or without one, sends
as a ``data:`` URI (:func:`to_wire`).

Torch-free and Pillow-free: a PIL image is recognised by duck typing and saved as PNG.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Union

from producer.contract import decode_data_uri, image_kind, redact_url
from producer.errors import ImageTooLarge, InvalidImage, InvalidRequest

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_mime(data: bytes) -> str:
    """The image MIME type from magic bytes, or ``application/octet-stream`` (the worker decides)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


def data_uri(data: bytes) -> str:
    return f"data:{sniff_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise ImageTooLarge(f"{what} is {size} bytes, over the {max_bytes}-byte cap (max_image_bytes)")


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        _check_size(path.stat().st_size, max_bytes, f"image file {path}")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read image file {path}: {exc.strerror or exc}") from exc


def image_source(image: ImageInput, max_bytes: int) -> str | bytes:
    """An http(s) URL (``str``) to pass on, or the raw, size-checked bytes of an inline image.

    A ``str`` must be an http(s) URL or a ``data:`` URI (decoded here): it is never read as a local path (a
    web backend passing a user's string on would let the user read the server's files). Local files come as
    :class:`pathlib.Path` (any ``os.PathLike``), bytes or a PIL image.
    """
    if isinstance(image, str):
        return _string_source(image, max_bytes)
    if isinstance(image, os.PathLike):
        return _read_file(Path(image), max_bytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        _check_size(len(data), max_bytes, "image")
        return data
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        return _png_bytes(image, max_bytes)
    raise InvalidRequest(
        f"unsupported image type {type(image).__name__}: pass an http(s) URL, a data: URI, a pathlib.Path, "
        "bytes or a PIL image"
    )


def to_wire(image: ImageInput, max_bytes: int) -> str:
    """The ``image`` field with no blob store: URLs pass through; everything else inline, as a data: URI."""
    source = image_source(image, max_bytes)
    return source if isinstance(source, str) else data_uri(source)


def _string_source(image: str, max_bytes: int) -> str | bytes:
    kind = image_kind(image)
    if kind == "url":
        return image
    if kind == "data":
        return decode_data_uri(image, max_bytes)
    shown = repr(image[:40]) + ("…" if len(image) > 40 else "")
    if "://" in image[:16]:
        raise InvalidRequest(f"unsupported image URL scheme in {shown}: a string must be http(s) or data:")
    raise InvalidRequest(
        f"image {shown} is not an http(s) URL or a data: URI; a string is never read as a local file: "
        "pass a pathlib.Path (or bytes, or a PIL image) to send a local file"
    )


def _png_bytes(image: Any, max_bytes: int) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"cannot encode the PIL image (mode {image.mode}) as PNG: {exc}") from None
    _check_size(buffer.tell(), max_bytes, "image")
    return buffer.getvalue()


def describe(data: bytes, sha256: str | None = None) -> str:
    """A byte-free description of inline image bytes for logs and Flower: type, size, short sha256
    (``sha256``: the hex digest when the caller has it already)."""
    digest = sha256 or hashlib.sha256(data).hexdigest()
    return f"<{sniff_mime(data)}, {len(data)} bytes, sha256 {digest[:12]}>"


def redact(image: str) -> str:
    """A short, byte-free description of a wire image for logs and Flower: kind, size, short sha256."""
    if image_kind(image) != "data":
        return redact_url(image) if "://" in image[:12] else image[:200]
    header, _, payload = image[5:].partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return f"<data:{header[:40]}, {len(payload)} chars, not valid base64>"
    return f"<data:{header[:40]}, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"
