"""Draw three deterministic sample pictures for trying out the job queue.

The pictures are drawn with Pillow only (no font files, no randomness), so every
run writes byte-identical files:

* ``stop_sign.jpg``: a red octagonal stop sign on a post, sky and street behind it.
* ``radar_chart.png``: a six-axis radar chart with two translucent data series.
* ``transparent_logo.png``: an RGBA logo on a fully transparent background.

Usage::

    python examples/make_images.py [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DEFAULT_OUT = Path(__file__).resolve().parent / "images"

Point = tuple[float, float]
RGB = tuple[int, int, int]
RGBA = tuple[int, int, int, int]

RADAR_AXES = ("Accuracy", "Speed", "Memory", "Robustness", "Coverage", "Cost")
RADAR_SERIES: tuple[tuple[str, tuple[float, ...], RGB], ...] = (
    ("Model A", (0.90, 0.55, 0.70, 0.80, 0.65, 0.45), (31, 119, 180)),
    ("Model B", (0.60, 0.85, 0.50, 0.55, 0.90, 0.75), (255, 127, 14)),
)


def regular_polygon(center: Point, radius: float, sides: int, rotation_deg: float = 0.0) -> list[Point]:
    """Return the vertices of a regular polygon, starting at ``rotation_deg`` (0 = pointing up)."""
    cx, cy = center
    points = []
    for i in range(sides):
        angle = math.radians(rotation_deg + 360.0 * i / sides - 90.0)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def vertical_gradient(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB, bottom: RGB
) -> None:
    """Fill ``box`` (left, top, right, bottom; bottom exclusive) with a top-to-bottom colour gradient."""
    left, y0, right, y1 = box
    span = max(y1 - y0 - 1, 1)
    for y in range(y0, y1):
        t = (y - y0) / span
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(left, y), (right - 1, y)], fill=colour)


def draw_street_scene(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Draw sky, distant buildings, a pavement and a road with lane markings."""
    horizon = int(height * 0.62)
    vertical_gradient(draw, (0, 0, width, horizon), (96, 160, 230), (200, 225, 250))
    buildings = [(0, 150, 90), (80, 210, 60), (150, 120, 110), (420, 180, 80), (500, 140, 140)]
    for x, top, w in buildings:
        draw.rectangle([x, horizon - top, x + w, horizon], fill=(150, 155, 170))
        for wy in range(horizon - top + 12, horizon - 12, 24):
            for wx in range(x + 10, x + w - 14, 22):
                draw.rectangle([wx, wy, wx + 10, wy + 12], fill=(225, 230, 190))
    draw.rectangle([0, horizon, width, horizon + 30], fill=(185, 180, 170))
    draw.rectangle([0, horizon + 30, width, height], fill=(70, 72, 78))
    lane_y = horizon + 30 + (height - horizon - 30) // 2
    for x in range(10, width, 80):
        draw.rectangle([x, lane_y - 3, x + 45, lane_y + 3], fill=(240, 220, 90))


def draw_stop_sign(draw: ImageDraw.ImageDraw, center: Point, radius: float, post_bottom: int) -> None:
    """Draw a post and a red octagonal sign with a white rim and the word STOP."""
    cx, cy = center
    draw.rectangle([cx - 7, cy, cx + 7, post_bottom], fill=(120, 124, 130), outline=(80, 82, 88))
    rotation = 180.0 / 8  # flat top edge
    draw.polygon(regular_polygon(center, radius + 4, 8, rotation), fill=(60, 60, 60))
    draw.polygon(regular_polygon(center, radius, 8, rotation), fill=(255, 255, 255))
    draw.polygon(regular_polygon(center, radius * 0.9, 8, rotation), fill=(200, 16, 30))
    font = ImageFont.load_default(size=int(radius * 0.55))
    draw.text(
        center,
        "STOP",
        fill=(255, 255, 255),
        font=font,
        anchor="mm",
        stroke_width=2,
        stroke_fill=(255, 255, 255),
    )


def make_stop_sign(size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Return an RGB street scene with a stop sign in the foreground."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw_street_scene(draw, width, height)
    draw_stop_sign(draw, (width * 0.5, height * 0.36), radius=110, post_bottom=int(height * 0.66))
    return image


def radar_label_anchor(angle_deg: float) -> str:
    """Pick a text anchor so an axis label sits outside the chart at ``angle_deg`` (0 = up, clockwise)."""
    dx = math.sin(math.radians(angle_deg))
    dy = -math.cos(math.radians(angle_deg))
    horizontal = "m" if abs(dx) < 0.2 else ("l" if dx > 0 else "r")
    vertical = "m" if abs(dy) < 0.2 else ("t" if dy > 0 else "s")
    return horizontal + vertical


def draw_radar_grid(draw: ImageDraw.ImageDraw, center: Point, radius: float, labels: Sequence[str]) -> None:
    """Draw concentric grid polygons, spokes, ring values and axis labels."""
    sides = len(labels)
    small = ImageFont.load_default(size=12)
    for level in range(1, 6):
        ring = regular_polygon(center, radius * level / 5, sides)
        draw.polygon(ring, outline=(200, 200, 200), width=1)
        tick = (center[0] + 6, center[1] - radius * level / 5)
        draw.text(tick, f"{level / 5:.1f}", fill=(140, 140, 140), font=small)
    label_font = ImageFont.load_default(size=18)
    outer = regular_polygon(center, radius, sides)
    label_points = regular_polygon(center, radius + 14, sides)
    for i, label in enumerate(labels):
        draw.line([center, outer[i]], fill=(170, 170, 170), width=1)
        anchor = radar_label_anchor(360.0 * i / sides)
        draw.text(label_points[i], label, fill=(40, 40, 40), font=label_font, anchor=anchor)


def radar_points(center: Point, radius: float, values: Sequence[float]) -> list[Point]:
    """Return the chart coordinates of ``values`` (0..1), one per axis, first axis pointing up."""
    sides = len(values)
    points = []
    for i, value in enumerate(values):
        angle = math.radians(360.0 * i / sides - 90.0)
        points.append(
            (center[0] + radius * value * math.cos(angle), center[1] + radius * value * math.sin(angle))
        )
    return points


def fill_radar_series(image: Image.Image, points: Sequence[Point], colour: RGB) -> None:
    """Composite one translucent filled data polygon onto the RGBA ``image``."""
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).polygon(list(points), fill=(*colour, 80))
    image.alpha_composite(overlay)


def outline_radar_series(draw: ImageDraw.ImageDraw, points: Sequence[Point], colour: RGB) -> None:
    """Draw the opaque outline and vertex markers of one data polygon."""
    draw.line([*points, points[0]], fill=colour, width=3, joint="curve")
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)


def draw_legend(draw: ImageDraw.ImageDraw, origin: Point, entries: Sequence[tuple[str, RGB]]) -> None:
    """Draw a small boxed legend with one colour swatch per entry."""
    x, y = origin
    font = ImageFont.load_default(size=15)
    row = 22
    draw.rectangle(
        [x, y, x + 120, y + 10 + row * len(entries)], fill=(255, 255, 255), outline=(180, 180, 180)
    )
    for i, (name, colour) in enumerate(entries):
        top = y + 8 + row * i
        draw.rectangle([x + 8, top, x + 24, top + 14], fill=colour, outline=(60, 60, 60))
        draw.text((x + 32, top + 7), name, fill=(30, 30, 30), font=font, anchor="lm")


def make_radar_chart(size: int = 600) -> Image.Image:
    """Return an RGB radar chart comparing two series on six axes."""
    image = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    center = (size / 2, size / 2 + 20)
    radius = size * 0.32
    draw = ImageDraw.Draw(image)
    title_font = ImageFont.load_default(size=22)
    draw.text((size / 2, 24), "Model comparison", fill=(20, 20, 20), font=title_font, anchor="mt")
    draw_radar_grid(draw, center, radius, RADAR_AXES)
    series = [(radar_points(center, radius, values), colour) for _name, values, colour in RADAR_SERIES]
    for points, colour in series:
        fill_radar_series(image, points, colour)
    draw = ImageDraw.Draw(image)
    for points, colour in series:
        outline_radar_series(draw, points, colour)
    draw_legend(draw, (size - 140, 16), [(name, colour) for name, _values, colour in RADAR_SERIES])
    return image.convert("RGB")


def composite_shape(image: Image.Image, shape: str, box: Sequence[float], fill: RGBA) -> None:
    """Blend a translucent ``ellipse`` or ``rounded`` rectangle onto an RGBA ``image``."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if shape == "ellipse":
        draw.ellipse(list(box), fill=fill)
    else:
        draw.rounded_rectangle(list(box), radius=28, fill=fill)
    image.alpha_composite(layer)


def make_transparent_logo(size: tuple[int, int] = (400, 300)) -> Image.Image:
    """Return an RGBA logo (overlapping translucent shapes and text) on a transparent background."""
    width = size[0]
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    composite_shape(image, "rounded", (30, 170, width - 30, 270), (40, 40, 60, 170))
    composite_shape(image, "ellipse", (95, 25, 215, 145), (220, 50, 80, 190))
    composite_shape(image, "ellipse", (155, 25, 275, 145), (40, 140, 230, 160))
    composite_shape(image, "ellipse", (125, 70, 245, 190), (250, 200, 40, 150))
    draw = ImageDraw.Draw(image)
    title_font = ImageFont.load_default(size=40)
    draw.text((width / 2, 222), "LLaVA-NeXT", fill=(255, 255, 255, 255), font=title_font, anchor="mm")
    subtitle_font = ImageFont.load_default(size=18)
    draw.text((width / 2, 256), "job queue", fill=(255, 255, 255, 200), font=subtitle_font, anchor="mm")
    return image


def main(argv: Sequence[str] | None = None) -> int:
    """Write the sample pictures to ``--out`` and print each path written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    outputs = [
        (out / "stop_sign.jpg", make_stop_sign(), {"quality": 90}),
        (out / "radar_chart.png", make_radar_chart(), {"optimize": True}),
        (out / "transparent_logo.png", make_transparent_logo(), {"optimize": True}),
    ]
    for path, image, options in outputs:
        image.save(path, **options)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
