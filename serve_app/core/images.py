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

JPEG_FORMATS = frozenset({"JPEG", "MPO"})
"""What Pillow names a JPEG: ``MPO`` for one with a multi-picture header (as cameras write; its first picture is
a JPEG, and the same decoder reads it)."""

SHRUNK_WHILE_DECODED = JPEG_FORMATS
"""The formats Pillow decodes at a fraction of their size (``draft``: a JPEG at 1/2 to 1/8 a side); the others
are decoded whole, so their pixels per byte of file are bounded (``max_pixels_per_byte``)."""


MAX_JPEG_SCANS = 100
"""Most scans a JPEG may have. A progressive JPEG is decoded one scan after another over the whole image, so a
small file of many tiny scans costs seconds (5000 x 5000 pixels, 1,000 scans of 55 bytes: 104 KB, 3.4 s; the
cost grows with the scans, not the bytes). Encoders write 1 scan (baseline) or about 10 (progressive: libjpeg's
script has 10 for colour, 6 for grey)."""

MAX_SLOW_DECODED_PIXELS = 1_000_000
"""Most pixels of an image that Pillow decodes in Python rather than in C: a BMP compressed with RLE (about 0.1 µs
a pixel: a 5000 x 5000 RLE4 BMP of 210 KB took 2.5 s)."""

BMP_RLE = frozenset({1, 2})
"""The BMP compressions Pillow decodes in Python (RLE8, RLE4), as its header names them (``info["compression"]``)."""


def jpeg_scans(data: bytes) -> int:
    """How many scans a JPEG holds: its start-of-scan markers (FF DA), which its compressed data cannot hold
    (a FF there is followed by 00), counted in C. A thumbnail in its EXIF counts too: an upper bound."""
    return data.count(b"\xff\xda")


def open_image(data: bytes) -> Image.Image:
    """A lazily opened image (its header read, its pixels not decoded), of an allowed format only."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def decoder_error(e: Exception) -> str:
    """A decoder's error as a client may read it: its type and message, without object addresses (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x...>"), and bounded (``errors.error_text``)."""
    return error_text(e)
