"""Images in the worker: each request's encoded images are decoded once, in ``prepare`` (in a thread,
before batching), within the limits the ingress checked on their headers."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps

from serve_app.core.errors import BadImage
from serve_app.core.images import IMAGE_FORMATS, decoder_error, open_image

MAX_SIDE = 1024
"""A larger image is shrunk (keeping its aspect ratio) before preprocessing: image models resize to a few
hundred pixels anyway."""


def decode_image(data: bytes) -> Image.Image:
    try:
        img = open_image(data)
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # cheap downscale while decoding a JPEG
        img = img.convert("RGB")  # a truncated or corrupt image fails here
    except Exception as e:
        raise BadImage(
            f"not a readable image of an allowed format ({', '.join(IMAGE_FORMATS)}): {decoder_error(e)}"
        ) from None
    try:  # upright, as a camera's orientation tag says (as transformers' load_image turns it)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # EXIF that cannot be read: the pixels as stored, and no EXIF left to trip on later
        img.info.pop("exif", None)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img


def decode_images(inputs: list[Any]) -> list[Image.Image]:
    """Encoded images (bytes) as RGB images; images already decoded are kept."""
    return [i if isinstance(i, Image.Image) else decode_image(i) for i in inputs]
