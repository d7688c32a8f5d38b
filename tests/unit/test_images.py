"""Image handling: the producer's wire form (``to_wire``, ``sniff_mime``, ``redact``) and the worker's
reading and decoding (``read_image_bytes``, ``decode_image``). Pure functions: no network, no Redis."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from producer.errors import FetchForbidden, ImageTooLarge, InvalidImage, InvalidRequest, LlavaError
from producer.images import data_uri, redact, sniff_mime, to_wire
from worker.images import decode_image, read_image_bytes
from worker.settings import WorkerSettings

BIG = 10**9
WHITE = (255, 255, 255)
RED = (255, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = RED) -> bytes:
    return encode(Image.new("RGB", size, color))


def payload(uri: str) -> bytes:
    header, sep, body = uri.partition(",")
    assert sep and header.startswith("data:") and header.endswith(";base64")
    return base64.b64decode(body, validate=True)


def assert_code(exc: pytest.ExceptionInfo[LlavaError], code: str) -> None:
    assert exc.value.code == code


def settings_for(root: Path, max_bytes: int = 1024 * 1024) -> WorkerSettings:
    return WorkerSettings(local_image_roots=[root], max_image_bytes=max_bytes, max_image_pixels=BIG)


# -- producer: sniff_mime ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_sniff_mime_recognises_real_encoded_images(fmt: str, mime: str) -> None:
    assert sniff_mime(encode(Image.new("RGB", (4, 4), RED), fmt)) == mime


def test_sniff_mime_webp_needs_the_riff_webp_signature() -> None:
    assert sniff_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_mime(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "application/octet-stream"


@pytest.mark.parametrize("data", [b"", b"<html><body>nope</body></html>", b"\x00\x01\x02\x03"])
def test_sniff_mime_unknown_is_octet_stream(data: bytes) -> None:
    assert sniff_mime(data) == "application/octet-stream"


def test_data_uri_embeds_mime_and_round_trips() -> None:
    data = png_bytes()
    uri = data_uri(data)
    assert uri.startswith("data:image/png;base64,")
    assert payload(uri) == data


# -- producer: to_wire ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://example.com/cat.png", "https://example.com/a/b.jpg?x=1", "HTTPS://EXAMPLE.COM/C.PNG"]
)
def test_to_wire_passes_http_urls_through_unchanged(url: str) -> None:
    assert to_wire(url, max_bytes=10) == url


def test_to_wire_passes_data_uri_through_unchanged() -> None:
    uri = data_uri(png_bytes())
    assert to_wire(uri, max_bytes=BIG) == uri


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_to_wire_inlines_bytes_like(wrap: type) -> None:
    data = png_bytes()
    uri = to_wire(wrap(data), max_bytes=BIG)
    assert uri.startswith("data:image/png;base64,")
    assert payload(uri) == data


def test_to_wire_inlines_pathlib_path(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (5, 5), RED), "JPEG")
    path = tmp_path / "cat.jpg"
    path.write_bytes(data)
    uri = to_wire(path, max_bytes=BIG)
    assert uri.startswith("data:image/jpeg;base64,")
    assert payload(uri) == data


def test_to_wire_never_reads_a_str_as_a_path(tmp_path: Path) -> None:
    existing = tmp_path / "cat.png"
    existing.write_bytes(png_bytes())
    for text in (str(existing), "cat.png", "./photos/a.jpg", "C:\\photos\\a.png", ""):
        with pytest.raises(InvalidRequest) as exc:
            to_wire(text, max_bytes=BIG)
        assert_code(exc, "invalid_request")
        assert "pass a pathlib.Path" in exc.value.message


def test_to_wire_saves_pil_image_as_png() -> None:
    image = Image.new("RGB", (13, 7), RED)
    uri = to_wire(image, max_bytes=BIG)
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(payload(uri))) as reopened:
        assert reopened.format == "PNG"
        assert reopened.size == (13, 7)
        assert reopened.convert("RGB").getpixel((0, 0)) == RED


def test_to_wire_bytes_at_cap_pass_and_over_cap_raise() -> None:
    data = png_bytes()
    assert payload(to_wire(data, max_bytes=len(data))) == data
    with pytest.raises(ImageTooLarge) as exc:
        to_wire(data, max_bytes=len(data) - 1)
    assert_code(exc, "image_too_large")


def test_to_wire_file_over_cap_raises(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes())
    with pytest.raises(ImageTooLarge) as exc:
        to_wire(path, max_bytes=10)
    assert_code(exc, "image_too_large")


def test_to_wire_pil_image_over_cap_raises() -> None:
    with pytest.raises(ImageTooLarge) as exc:
        to_wire(Image.new("RGB", (16, 16), RED), max_bytes=10)
    assert_code(exc, "image_too_large")


def test_to_wire_data_uri_over_cap_raises() -> None:
    uri = "data:image/png;base64," + base64.b64encode(b"\x00" * 3000).decode()
    with pytest.raises(ImageTooLarge) as exc:
        to_wire(uri, max_bytes=1000)
    assert_code(exc, "image_too_large")


def test_to_wire_missing_file_is_invalid_request(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    for image in (missing, str(missing)):
        with pytest.raises(InvalidRequest) as exc:
            to_wire(image, max_bytes=BIG)
        assert_code(exc, "invalid_request")


@pytest.mark.parametrize("url", ["ftp://x/y.png", "file:///etc/passwd", "s3://bucket/key.png"])
def test_to_wire_unsupported_scheme_is_invalid_request(url: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        to_wire(url, max_bytes=BIG)
    assert_code(exc, "invalid_request")


@pytest.mark.parametrize("image", [42, 3.5, None, ["http://example.com/a.png"], {"url": "x"}])
def test_to_wire_unsupported_type_is_invalid_request(image: object) -> None:
    with pytest.raises(InvalidRequest) as exc:
        to_wire(image, max_bytes=BIG)
    assert_code(exc, "invalid_request")


# -- producer: redact -------------------------------------------------------------------------------------


def test_redact_never_contains_the_base64_payload() -> None:
    body = base64.b64encode(png_bytes((32, 32))).decode()
    uri = f"data:image/png;base64,{body}"
    text = redact(uri)
    assert body not in text
    assert body[:16] not in text
    data = base64.b64decode(body)
    assert "image/png" in text and f"{len(data)} bytes" in text
    assert f"sha256 {hashlib.sha256(data).hexdigest()[:12]}" in text
    assert len(text) < 80


def test_redact_keeps_short_urls_and_truncates_long_ones() -> None:
    assert redact("https://example.com/cat.png") == "https://example.com/cat.png"
    long_url = "https://example.com/" + "a" * 500
    text = redact(long_url)
    assert len(text) <= 200 and text.endswith("...") and long_url.startswith(text[:-3])


# -- worker: decode_image ---------------------------------------------------------------------------------


def test_decode_plain_rgb_png() -> None:
    image = decode_image(png_bytes((9, 4)), max_pixels=BIG)
    assert image.mode == "RGB" and image.size == (9, 4)
    assert image.getpixel((0, 0)) == RED


def test_decode_rgba_composites_transparency_on_white() -> None:
    source = Image.new("RGBA", (2, 1))
    source.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    source.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    image = decode_image(encode(source), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


def test_decode_palette_with_transparency_composites_on_white() -> None:
    source = Image.new("P", (2, 1))
    source.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 black, index 1 blue
    source.putpixel((0, 0), 0)
    source.putpixel((1, 0), 1)
    image = decode_image(encode(source, transparency=0), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 255)


def test_decode_gif_with_transparency_composites_on_white() -> None:
    source = Image.new("P", (2, 1))
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    source.putpixel((0, 0), 0)
    source.putpixel((1, 0), 1)
    image = decode_image(encode(source, "GIF", transparency=0), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


def test_decode_la_composites_on_white() -> None:
    source = Image.new("LA", (2, 1))
    source.putpixel((0, 0), (0, 0))  # transparent black
    source.putpixel((1, 0), (0, 255))  # opaque black
    image = decode_image(encode(source), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 0)


def test_decode_16_bit_greyscale_scales_to_8_bit_rgb() -> None:
    source = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        source.putpixel((x, 0), value)
    image = decode_image(encode(source), max_pixels=BIG)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_decode_cmyk_jpeg_becomes_rgb() -> None:
    source = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    image = decode_image(encode(source, "JPEG", quality=95), max_pixels=BIG)
    assert image.mode == "RGB" and image.size == (8, 8)
    r, g, b = image.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_decode_one_bit_image_becomes_rgb() -> None:
    source = Image.new("1", (2, 1), 1)
    source.putpixel((0, 0), 0)
    image = decode_image(encode(source), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == WHITE


def test_decode_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = encode(Image.new("RGB", (40, 20), RED), "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)  # stored landscape
    image = decode_image(data, max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.size == (20, 40)


def test_truncated_png_fixture_opens_but_fails_to_load() -> None:
    """Guards the next test: the truncated bytes must get past ``Image.open`` and fail in ``load``."""
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    data = encode(noisy)
    with Image.open(io.BytesIO(data[: len(data) // 2])) as image, pytest.raises(OSError):
        image.load()


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0garbage",
    ],
    ids=["html", "empty", "png-signature-only", "jpeg-garbage"],
)
def test_decode_undecodable_bytes_raise_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as exc:
        decode_image(data, max_pixels=BIG)
    assert_code(exc, "invalid_image")


def test_decode_truncated_png_raises_invalid_image() -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    data = encode(noisy)
    with pytest.raises(InvalidImage) as exc:
        decode_image(data[: len(data) // 2], max_pixels=BIG)
    assert_code(exc, "invalid_image")


def test_decode_pixel_cap_is_inclusive() -> None:
    data = png_bytes((100, 100))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLarge) as exc:
        decode_image(data, max_pixels=9_999)
    assert_code(exc, "image_too_large")


# -- worker: read_image_bytes -----------------------------------------------------------------------------


def test_read_valid_data_uri(tmp_path: Path) -> None:
    data = png_bytes()
    assert read_image_bytes(data_uri(data), settings_for(tmp_path)) == data


@pytest.mark.parametrize(
    "uri",
    ["data:image/png;base64,!!!not-base64!!!", "data:image/png;base64,abc", "data:image/png;base64,"],
    ids=["bad-chars", "bad-padding", "empty"],
)
def test_read_bad_base64_data_uri_raises_invalid_image(uri: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidImage) as exc:
        read_image_bytes(uri, settings_for(tmp_path))
    assert_code(exc, "invalid_image")


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png," + base64.b64encode(b"\x89PNG").decode(),
        "data:image/png;base64" + base64.b64encode(b"\x89PNG").decode(),
    ],
    ids=["no-base64-marker", "no-comma"],
)
def test_read_data_uri_without_base64_marker_raises_invalid_image(uri: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidImage) as exc:
        read_image_bytes(uri, settings_for(tmp_path))
    assert_code(exc, "invalid_image")


def test_read_data_uri_over_cap_raises_image_too_large(tmp_path: Path) -> None:
    uri = data_uri(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096)
    with pytest.raises(ImageTooLarge) as exc:
        read_image_bytes(uri, settings_for(tmp_path, max_bytes=1024))
    assert_code(exc, "image_too_large")


def test_read_path_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    data = png_bytes()
    (root / "sub" / "cat.png").write_bytes(data)
    assert read_image_bytes(str(root / "sub" / "cat.png"), settings_for(root)) == data


def test_read_file_over_cap_inside_root_raises_image_too_large(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"\x00" * 2048)
    with pytest.raises(ImageTooLarge) as exc:
        read_image_bytes(str(tmp_path / "big.png"), settings_for(tmp_path, max_bytes=1024))
    assert_code(exc, "image_too_large")


def test_read_absolute_path_outside_root_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    for reference in (str(outside), f"{root}/../secret.png"):
        with pytest.raises(FetchForbidden) as exc:
            read_image_bytes(reference, settings_for(root))
        assert_code(exc, "fetch_forbidden")


def test_read_sibling_dir_sharing_root_prefix_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    sibling = tmp_path / "root-evil"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(png_bytes())
    with pytest.raises(FetchForbidden):
        read_image_bytes(str(sibling / "x.png"), settings_for(root))


def test_read_symlink_inside_root_pointing_outside_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (root / "link.png").symlink_to(outside)
    with pytest.raises(FetchForbidden) as exc:
        read_image_bytes(str(root / "link.png"), settings_for(root))
    assert_code(exc, "fetch_forbidden")


def test_read_any_absolute_path_is_forbidden_without_roots(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(png_bytes())
    settings = WorkerSettings(local_image_roots=[], max_image_bytes=1024 * 1024, max_image_pixels=BIG)
    with pytest.raises(FetchForbidden):
        read_image_bytes(str(tmp_path / "cat.png"), settings)


@pytest.mark.parametrize(
    "reference",
    ["cat.png", "images/cat.png", "./cat.png", "~/cat.png", "ftp://x/y.png", "file:///etc/passwd", ""],
)
def test_read_relative_or_unknown_reference_is_invalid_request(reference: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as exc:
        read_image_bytes(reference, settings_for(tmp_path))
    assert_code(exc, "invalid_request")


def test_to_wire_converts_a_cmyk_pil_image_to_png() -> None:
    image = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    uri = to_wire(image, max_bytes=1_000_000)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (8, 6)
