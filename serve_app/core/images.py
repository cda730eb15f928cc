"""Which images the app takes, and how they are opened: the same rules in the ingress (header checks)
and in the worker (the one decode)."""

from __future__ import annotations

import io

from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""The formats Pillow may open here. Others (EPS runs Ghostscript, TIFF has many decoders) are refused."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
"""File names that an image path input may have."""


def open_image(data: bytes) -> Image.Image:
    """A lazily opened image (its header read, its pixels not decoded), of an allowed format only."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
