"""Images in the worker: each request's encoded images are decoded once, in ``prepare`` (in a thread,
before batching), within the limits the ingress checked on their headers."""

from __future__ import annotations

import contextlib
from typing import Any

from PIL import Image

from serve_app.core.errors import BadImage
from serve_app.core.images import IMAGE_FORMATS, RAW_PROFILE_EXIF, check_exif, decoder_error, open_image
from serve_app.core.inputs import item_where

MAX_SIDE = 1024
"""A larger image is shrunk (keeping its aspect ratio) before preprocessing: image models resize to a few
hundred pixels anyway."""


ORIENTATION = 0x0112
"""The EXIF tag of how a camera held the picture."""
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""How to turn a picture of each orientation upright, as ``ImageOps.exif_transpose`` turns it. That function also
reads and writes again every EXIF directory, entry by entry in Python (a sub-directory of 65,535 entries: 1.5 s),
for EXIF this worker drops: it reads the first directory only (bounded: ``images.MAX_EXIF_ENTRIES``)."""


def decode_image(data: bytes, where: str = "the image") -> Image.Image:
    """``data`` as an RGB image; ``where`` names it in the error (BadImage) if it cannot be decoded."""
    try:
        img = open_image(data)
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # cheap downscale while decoding a JPEG
        img = img.convert("RGB")  # a truncated or corrupt image fails here
        raw = img.info.pop(RAW_PROFILE_EXIF, None)  # a PNG's text, which getexif would read for want of EXIF
        if "exif" not in img.info and raw is not None:
            with contextlib.suppress(ValueError, TypeError):  # unreadable, as getexif would find it: none
                img.info["exif"] = bytes.fromhex("".join(str(raw).split("\n")[3:]))
        check_exif(img.info.get("exif") or b"")  # a WebP's, that text's (a JPEG's and eXIf were checked already)
    except Exception as e:
        raise BadImage(
            f"{where}: not a readable image of an allowed format ({', '.join(IMAGE_FORMATS)}): {decoder_error(e)}"
        ) from None
    # Upright, as a camera's orientation tag says (as transformers' load_image turns it); EXIF that cannot be read
    # leaves the pixels as stored.
    with contextlib.suppress(Exception):
        turn = UPRIGHT.get(img.getexif().get(ORIENTATION))
        img = img.transpose(turn) if turn is not None else img
    img.info.clear()  # its text, profile and EXIF (none left to trip on later): the pixels are what the model reads
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img


def decode_images(inputs: list[Any]) -> list[Image.Image]:
    """One request's encoded images (bytes) as RGB images, each named by its place in the request in an
    error; images already decoded are kept."""
    return [i if isinstance(i, Image.Image) else decode_image(i, item_where(n)) for n, i in enumerate(inputs)]
