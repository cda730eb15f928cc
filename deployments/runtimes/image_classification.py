from __future__ import annotations

from PIL import Image

from deployments.runtimes.base import PipelineRuntime, Scores
from serve_app.core.errors import BadImage
from serve_app.core.images import IMAGE_FORMATS, open_image
from serve_app.core.registry import Task

# A larger image is shrunk (keeping its aspect ratio) before preprocessing:
# every image classifier resizes to a few hundred pixels anyway.
MAX_SIDE = 1024


def decode_image(data: bytes) -> Image.Image:
    try:
        img = open_image(data)
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # cheap downscale while decoding a JPEG
        img = img.convert("RGB")  # a truncated or corrupt image fails here
    except Exception as e:
        raise BadImage(
            f"not a readable image of an allowed format ({', '.join(IMAGE_FORMATS)}): {type(e).__name__}: {e}"
        ) from None
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img


class ImageClassificationRuntime(PipelineRuntime):
    """Encoded image bytes in, labels out. Each image is decoded once, in ``prepare``."""

    task = Task.IMAGE_CLASSIFICATION

    def prepare(self, inputs: list[bytes | Image.Image]) -> list[Image.Image]:
        return [i if isinstance(i, Image.Image) else decode_image(i) for i in inputs]

    def predict(self, inputs: list[bytes | Image.Image]) -> list[Scores]:
        return self._run(self.prepare(inputs))
