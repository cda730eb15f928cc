"""The limits at their exact values, through the running 'limits' app (max_body_bytes 64 KiB, max_image_pixels
at its default of 25 M): a body of exactly the limit and an image of exactly the limit are answered, and one
byte or one pixel more is refused (docs/errors-and-limits.md). tests/unit/test_exact_limits.py has the same
without Ray."""

import json

import pytest
from PIL import Image

from serve_app.core.config import AppArgs

pytestmark = pytest.mark.integration

MAX_BODY_BYTES = 64 * 1024  # the 'limits' app's (tests/integration/conftest.py)
MAX_IMAGE_PIXELS = AppArgs.model_fields["max_image_pixels"].default  # which the 'limits' app keeps


def body_of(size: int) -> bytes:
    """A valid predict body of exactly ``size`` bytes: JSON, padded with spaces."""
    body = json.dumps({"model_id": "alpha", "input_data": "exactly at the limit"}).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_answered_and_one_byte_more_is_413(authed, limits_url, chunked):
    def send(body: bytes):
        content = iter([body[:40_000], body[40_000:]]) if chunked else body
        return authed.post(f"{limits_url}/predict", content=content, headers={"content-type": "application/json"})

    exact = send(body_of(MAX_BODY_BYTES))
    assert exact.status_code == 200, exact.text
    assert exact.json()["predictions"][0]["label"].startswith("alpha-")
    over = send(body_of(MAX_BODY_BYTES + 1))
    assert over.status_code == 413 and over.json()["limit"] == MAX_BODY_BYTES, over.text


@pytest.fixture(scope="module")
def images(limits_env):
    """In the app's image root: a JPEG of exactly the pixel limit (5000 x 5000), and a PNG of one pixel more
    (5101 x 4901: 25,000,001 is 5101 x 13 x 13 x 29), each a real image within the byte limit."""
    root = limits_env["root"]
    assert (MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS + 1) == (5000 * 5000, 5101 * 4901)
    Image.new("RGB", (5000, 5000), (40, 90, 160)).save(root / "exact.jpg", quality=60)
    Image.new("L", (5101, 4901), 7).save(root / "one-more.png")
    return root / "exact.jpg", root / "one-more.png"


def test_an_image_of_exactly_max_image_pixels_is_answered_and_one_pixel_more_is_400(authed, limits_url, images):
    exact, one_more = images
    r = authed.post(f"{limits_url}/predict", json={"model_id": "pixels", "input_data": str(exact)})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("pixels-")
    r = authed.post(f"{limits_url}/predict", json={"model_id": "pixels", "input_data": str(one_more)})
    assert r.status_code == 400 and r.json()["error"] == "bad_image", r.text
    assert r.json()["message"] == f"input_data[0]: 5101x4901 pixels is more than the limit of {MAX_IMAGE_PIXELS}"
