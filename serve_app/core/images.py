"""Which images the app takes, and how they are opened: the same rules in the ingress (header checks)
and in the worker (the one decode)."""

from __future__ import annotations

import io
import re

from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""The formats Pillow may open here. Others (EPS runs Ghostscript, TIFF has many decoders) are refused."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
"""File names that an image path input may have."""


def open_image(data: bytes) -> Image.Image:
    """A lazily opened image (its header read, its pixels not decoded), of an allowed format only."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


_OBJECT = re.compile(r"\s*<[^<>]{0,200} at 0x[0-9a-fA-F]+>")
_MESSAGE_CHARS = 200


def decoder_error(e: Exception) -> str:
    """A decoder's error as a client may read it: its type and message, without object addresses (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x...>"), and bounded."""
    message = _OBJECT.sub("", str(e))[:_MESSAGE_CHARS]
    return f"{type(e).__name__}: {message}" if message else type(e).__name__
