"""Image handling: the producer's wire form (``to_wire``, ``sniff_mime``, ``redact``) and the worker's
reading and decoding (``read_image_bytes``, ``decode_image``). Pure functions: no network, no Redis."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from producer.errors import (
    FetchFailed,
    FetchForbidden,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobTimeout,
    LlavaError,
)
from producer.images import data_uri, redact, sniff_mime, to_wire
from worker.fetch import FetchAborted
from worker.images import (
    ImageLoader,
    PixelBudget,
    _draft,
    decode_image,
    keep_side_for,
    read_image_bytes,
    shrink_factor,
)
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


# -- worker: MIME-wrapped base64 --------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\n", "\r\n", " ", "\t"], ids=["lf", "crlf", "space", "tab"])
def test_read_mime_wrapped_base64_data_uri(separator: str, tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (40, 30), RED))
    text = base64.b64encode(data).decode()
    wrapped = separator.join(text[i : i + 76] for i in range(0, len(text), 76)) + separator
    assert read_image_bytes("data:image/png;base64," + wrapped, settings_for(tmp_path)) == data


def test_whitespace_does_not_stretch_the_byte_cap(tmp_path: Path) -> None:
    text = base64.b64encode(b"\0" * 1100).decode()
    uri = "data:image/png;base64," + "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    with pytest.raises(ImageTooLarge) as exc:
        read_image_bytes(uri, settings_for(tmp_path, max_bytes=1024))
    assert_code(exc, "image_too_large")


# -- worker: shrinking decoded images to what the processor keeps ------------------------------------------


@pytest.mark.parametrize(
    ("size", "keep", "factor"),
    [
        ((6300, 6300), 1008, 6),  # shorter side 1050 >= 1008
        ((4032, 3024), 1008, 3),
        ((4000, 3000), 1008, 2),  # 3 does not divide 4000
        ((2000, 1500), 1008, 1),  # halving would go under 1008
        ((6301, 6300), 1008, 1),  # no common factor: the aspect ratio could not stay exact
        ((640, 480), 64, 5),  # 7 fits the side but does not divide gcd 160
    ],
)
def test_shrink_factor_divides_both_sides_and_keeps_the_shorter_one(
    size: tuple[int, int], keep: int, factor: int
) -> None:
    assert shrink_factor(*size, keep) == factor


def noisy(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A photo-like image: smooth gradients plus some noise (compresses, resizes like a photo)."""
    gradient = Image.linear_gradient("L").resize(size)
    noise = Image.effect_noise(size, 20).convert("L")
    image = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return image.convert(mode) if mode != "RGB" else image


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP")],
)
def test_ordinary_images_decode_exactly_as_before(mode: str, fmt: str) -> None:
    data = encode(noisy((127, 100), mode), fmt)  # shorter side under 2 x keep_side
    full = decode_image(data, max_pixels=BIG)
    kept = decode_image(data, max_pixels=BIG, keep_side=64)
    assert kept.size == full.size and kept.tobytes() == full.tobytes()


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG")])
def test_large_images_shrink_by_an_exact_factor_and_keep_their_look(mode: str, fmt: str) -> None:
    data = encode(noisy((640, 480), mode), fmt)
    full = decode_image(data, max_pixels=BIG)
    kept = decode_image(data, max_pixels=BIG, keep_side=64)
    assert kept.mode == "RGB" and min(kept.size) >= 64
    assert kept.width * 480 == kept.height * 640 and kept.size != full.size
    resized = full.resize(kept.size, Image.Resampling.BOX)
    difference = sum(abs(a - b) for a, b in zip(kept.tobytes(), resized.tobytes(), strict=True))
    assert difference / len(resized.tobytes()) < 4  # mean difference per channel, out of 255


def test_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    data = encode(noisy((640, 480)), "JPEG")
    with Image.open(io.BytesIO(data)) as image:
        _draft(image, 64)
        assert image.size == (160, 120)  # libjpeg scales by 1/4 while decoding: no full-size pixels
    assert decode_image(data, max_pixels=BIG, keep_side=64).size == (160, 120)


def test_exif_orientation_applies_to_the_shrunk_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noisy((640, 480)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, max_pixels=BIG, keep_side=64).size == (120, 160)


# llava-hf's anyres grid (336 px tiles) at a third of the scale, to keep the test fast
SMALL_GRID = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]


def test_the_processor_sees_the_same_grid_and_nearly_the_same_pixels() -> None:
    """What the LLaVA-NeXT processor (llava-hf's grid at 112 px tiles) makes of a 896 x 672 photo, decoded
    at full size and shrunk to its largest grid side (336): same tensor shape and image size ratio (hence
    the same anyres grid and image tokens), pixel values within a small tolerance."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, image_grid_pinpoints=SMALL_GRID
    )
    keep = keep_side_for(processor)
    assert keep == 336
    data = encode(noisy((896, 672)), "PNG")
    full = processor(decode_image(data, max_pixels=BIG), return_tensors="np")
    kept_image = decode_image(data, max_pixels=BIG, keep_side=keep)
    kept = processor(kept_image, return_tensors="np")
    assert kept_image.size == (448, 336)
    assert kept["pixel_values"].shape == full["pixel_values"].shape
    (full_h, full_w), (kept_h, kept_w) = full["image_sizes"][0], kept["image_sizes"][0]
    assert full_h * kept_w == full_w * kept_h
    assert abs(kept["pixel_values"] - full["pixel_values"]).mean() < 0.05  # normalised units (about ±2)


# -- worker: the decode pixel budget ----------------------------------------------------------------------


def test_pixel_budget_waits_until_pixels_are_free() -> None:
    budget = PixelBudget(100)
    entered = threading.Event()

    def second() -> None:
        with budget.hold(60, time.monotonic() + 30):
            entered.set()

    with budget.hold(60, time.monotonic() + 30):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.2)  # 60 + 60 > 100: it waits
    waiter.join(30)
    assert entered.is_set() and budget.free == 100


def test_pixel_budget_wait_ends_at_the_deadline_with_a_timeout() -> None:
    budget = PixelBudget(100)
    with (
        budget.hold(100, time.monotonic() + 30),
        pytest.raises(JobTimeout) as exc,
        budget.hold(1, time.monotonic() + 0.1),
    ):
        pass
    assert_code(exc, "timeout")
    assert budget.free == 100


def test_abort_wakes_decode_waiters_and_refuses_later_ones_as_aborted() -> None:
    budget = PixelBudget(100)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            with budget.hold(60, time.monotonic() + 600):  # would wait up to the job's deadline
                pass
        except BaseException as exc:
            errors.append(exc)

    with budget.hold(60, time.monotonic() + 30):
        waiters = [threading.Thread(target=wait, daemon=True) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        deadline = time.monotonic() + 30
        while budget.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # wait for both to block on the budget
        assert budget.abort() == 2
        for waiter in waiters:
            waiter.join(30)
        assert not any(waiter.is_alive() for waiter in waiters)
        assert len(errors) == 2 and all(isinstance(error, FetchAborted) for error in errors)
    assert budget.free == 100 and budget.waiting == 0  # the running decode gave its pixels back
    with pytest.raises(FetchAborted), budget.hold(1, time.monotonic() + 30):
        pass


def test_the_loaders_shutdown_abort_ends_a_job_waiting_to_decode(tmp_path: Path) -> None:
    loader = ImageLoader(settings_for(tmp_path))
    errors: list[BaseException] = []

    def load() -> None:
        try:
            loader.load(data_uri(png_bytes((20, 20))), time.monotonic() + 600)
        except BaseException as exc:
            errors.append(exc)

    with loader.decoding.hold(loader.decoding.total, time.monotonic() + 30):
        job = threading.Thread(target=load, daemon=True)
        job.start()
        deadline = time.monotonic() + 30
        while loader.decoding.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loader.abort_fetches() == 1  # no fetch running, one decode waiting
        job.join(30)
    assert not job.is_alive() and len(errors) == 1 and isinstance(errors[0], FetchAborted)


def test_one_image_larger_than_the_budget_still_decodes_alone() -> None:
    budget = PixelBudget(10)
    with budget.hold(10**6, time.monotonic() + 1):
        assert budget.free == 0
    data = png_bytes((20, 20))
    assert decode_image(data, max_pixels=BIG, budget=(budget, time.monotonic() + 1)).size == (20, 20)


def test_a_path_with_a_nul_byte_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as exc:
        read_image_bytes(str(tmp_path / "a\x00b.png"), settings_for(tmp_path))
    assert_code(exc, "invalid_request")


class _BlinkingStore:
    """A blob store that does not answer ``blinks`` times (a Redis restart, a failover), then does."""

    def __init__(self, blinks: int, data: bytes) -> None:
        self.blinks, self.data, self.reads = blinks, data, 0

    def get(self, reference: str, max_bytes: int) -> bytes:
        self.reads += 1
        if self.reads <= self.blinks:
            raise redis.ConnectionError("Connection refused")
        return self.data


def test_a_blob_read_rides_out_a_store_that_does_not_answer_until_the_deadline(tmp_path: Path) -> None:
    reference = "blob:sha256:" + "a" * 64
    store = _BlinkingStore(blinks=2, data=b"image")
    deadline = time.monotonic() + 30
    assert read_image_bytes(reference, settings_for(tmp_path), deadline=deadline, blobs=store) == b"image"  # type: ignore[arg-type]
    assert store.reads == 3
    with pytest.raises(FetchFailed, match="blob store did not answer") as error:
        read_image_bytes(
            reference, settings_for(tmp_path), deadline=time.monotonic() + 0.1, blobs=_BlinkingStore(9, b"")
        )  # type: ignore[arg-type]
    assert error.value.retryable


def test_a_warm_shutdown_ends_a_blob_read_waiting_on_its_store(tmp_path: Path) -> None:
    """The grace period's abort reaches a job waiting for the blob store, which goes back to the queue."""
    from worker.fetch import FetchRegistry

    fetches = FetchRegistry()
    threading.Timer(0.2, fetches.abort).start()
    with pytest.raises(FetchAborted):  # not FetchFailed at the deadline
        read_image_bytes(
            "blob:sha256:" + "b" * 64,
            settings_for(tmp_path),
            deadline=time.monotonic() + 20,
            fetches=fetches,
            blobs=_BlinkingStore(10**6, b""),  # type: ignore[arg-type]
        )
