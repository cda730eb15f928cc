"""The limits at their exact values: an image of exactly ``max_image_pixels`` and a body of exactly
``max_body_bytes`` are taken, and one pixel or one byte more is refused (docs/errors-and-limits.md).
tests/integration/test_exact_limits.py asserts the same through the running 'limits' app."""

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from serve_app.core.errors import ImageOverLimit
from serve_app.core.inputs import IMAGE, InputDecoder
from tests.unit.test_http import ingress_api

LIMIT = 100


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(*images: str) -> list[bytes]:
    decoder = InputDecoder(image_root="samples/images", max_image_bytes=1 << 20, max_image_pixels=LIMIT, max_items=4)
    return asyncio.run(decoder.decode(IMAGE, list(images)))


@pytest.mark.parametrize("width, height", [(10, 10), (100, 1), (1, 100)])
def test_an_image_of_exactly_max_image_pixels_is_taken(width, height):
    assert len(decode(png(width, height))) == 1


@pytest.mark.parametrize("width, height", [(101, 1), (1, 101), (11, 10)])
def test_an_image_of_one_pixel_more_is_refused_naming_the_limit(width, height):
    with pytest.raises(ImageOverLimit, match=f"{width}x{height} pixels is more than the limit of {LIMIT}"):
        decode(png(width, height))


def body_of(size: int) -> bytes:
    """A valid predict body of exactly ``size`` bytes (JSON padded with spaces)."""
    body = json.dumps({"model_id": "ok", "input_data": "x"}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_taken_and_one_byte_more_is_413(chunked):
    """By its Content-Length, and counted as it streams in when it has none."""

    def send(client, body: bytes):
        content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
        return client.post("/predict", content=content, headers={"content-type": "application/json"})

    with ingress_api(max_body_bytes=LIMIT) as (client, plane):
        exact = send(client, body_of(LIMIT))
        assert exact.status_code == 200, exact.text
        over = send(client, body_of(LIMIT + 1))
        assert over.status_code == 413 and over.json()["limit"] == LIMIT
    assert plane.inferred == ["ok"]
