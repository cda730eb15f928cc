"""Which images the app takes, and how they are opened: the same rules in the ingress (header checks)
and in the worker (the one decode)."""

from __future__ import annotations

import io

from PIL import Image

from serve_app.core.errors import error_text

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""The formats Pillow may open here. Others (EPS runs Ghostscript, TIFF has many decoders) are refused."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
"""File names that an image path input may have."""

SHRUNK_WHILE_DECODED = frozenset({"JPEG"})
"""The formats Pillow decodes at a fraction of their size (``draft``: a JPEG at 1/2 to 1/8 a side); the others
are decoded whole, so their pixels per byte of file are bounded (``max_pixels_per_byte``)."""


def open_image(data: bytes) -> Image.Image:
    """A lazily opened image (its header read, its pixels not decoded), of an allowed format only."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def decoder_error(e: Exception) -> str:
    """A decoder's error as a client may read it: its type and message, without object addresses (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x...>"), and bounded (``errors.error_text``)."""
    return error_text(e)
