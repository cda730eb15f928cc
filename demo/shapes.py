"""Procedural images of geometric shapes: the data of the demo image classifier.

The same drawing code makes the training set (random parameters) and the
sample images shipped in ``samples/images`` (fixed parameters that the
training sampler never produces exactly).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class ShapeParams:
    shape: str
    size: int = 224
    cx: float = 0.5  # centre, as a fraction of the side
    cy: float = 0.5
    radius: float = 0.3  # half-extent, as a fraction of the side
    angle: float = 0.0  # rotation in degrees (square and triangle)
    fill: tuple[int, int, int] = (200, 40, 40)
    background: tuple[int, int, int] = (245, 245, 245)
    noise: float = 0.0  # standard deviation of per-pixel noise, 0-255 scale
    blur: float = 0.0


def _polygon(cx: float, cy: float, r: float, sides: int, angle_deg: float) -> list[tuple[float, float]]:
    start = math.radians(angle_deg) - math.pi / 2
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / sides), cy + r * math.sin(start + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def draw(p: ShapeParams, rng: random.Random | None = None) -> Image.Image:
    img = Image.new("RGB", (p.size, p.size), p.background)
    d = ImageDraw.Draw(img)
    cx, cy, r = p.cx * p.size, p.cy * p.size, p.radius * p.size
    if p.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=p.fill)
    elif p.shape == "square":
        # r is the half side; the polygon radius of a square is r * sqrt(2).
        d.polygon(_polygon(cx, cy, r * math.sqrt(2), 4, p.angle + 45), fill=p.fill)
    elif p.shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, p.angle), fill=p.fill)
    else:
        raise ValueError(f"unknown shape {p.shape!r}")
    if p.blur:
        img = img.filter(ImageFilter.GaussianBlur(p.blur))
    if p.noise:
        rng = rng or random.Random(0)
        noise = Image.effect_noise((p.size, p.size), p.noise).convert("RGB")
        img = Image.blend(img, noise, 0.15)
    return img


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))  # type: ignore[return-value]


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def random_params(rng: random.Random, size: int) -> ShapeParams:
    shape = rng.choice(SHAPES)
    radius = rng.uniform(0.15, 0.38)
    fill = _colour(rng)
    background = _colour(rng)
    while _contrast(fill, background) < 150:
        background = _colour(rng)
    return ShapeParams(
        shape=shape,
        size=size,
        cx=rng.uniform(radius + 0.02, 0.98 - radius),
        cy=rng.uniform(radius + 0.02, 0.98 - radius),
        radius=radius,
        angle=rng.uniform(0, 360),
        fill=fill,
        background=background,
        noise=rng.choice([0.0, 0.0, 20.0, 40.0]),
        blur=rng.choice([0.0, 0.0, 0.5, 1.0]),
    )


# The shipped sample images: fixed, hand-picked parameters.
SAMPLES: dict[str, ShapeParams] = {
    "circle.jpg": ShapeParams("circle", cx=0.45, cy=0.55, radius=0.3, fill=(30, 90, 200), background=(250, 240, 200)),
    "square.jpg": ShapeParams(
        "square", cx=0.5, cy=0.5, radius=0.28, angle=10, fill=(40, 160, 60), background=(240, 240, 240)
    ),
    "triangle.jpg": ShapeParams(
        "triangle", cx=0.5, cy=0.55, radius=0.3, angle=0, fill=(220, 120, 20), background=(20, 30, 60)
    ),
    "image.jpg": ShapeParams("circle", cx=0.6, cy=0.4, radius=0.22, fill=(200, 30, 30), background=(255, 255, 255)),
}
