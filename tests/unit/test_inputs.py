import asyncio
import base64
import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from serve_app.core.errors import BadImage, ForbiddenPath, InvalidInput
from serve_app.core.inputs import IMAGE, TEXT, InputDecoder
from tests.helpers import png_claiming

SAMPLE = "samples/images/image.jpg"


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


class _Sync:
    """Runs the async decoder to completion, for tests."""

    def __init__(self, decoder: InputDecoder) -> None:
        self._decoder = decoder

    def decode(self, *args):
        return asyncio.run(self._decoder.decode(*args))


@pytest.fixture
def decoder() -> _Sync:
    return _Sync(
        InputDecoder(image_root="samples/images", max_image_bytes=1 << 20, max_image_pixels=100_000, max_items=4)
    )


def test_text_passes_through_as_a_list(decoder):
    assert decoder.decode(TEXT, "hello") == ["hello"]
    assert decoder.decode(TEXT, ["a", "b"]) == ["a", "b"]


def test_an_empty_text_is_refused_whichever_protocol_sent_it(decoder):
    """The native API's schema refuses ``""``; v2 sends its text here as a JSON string or as binary bytes."""
    for empty in ("", b""):
        with pytest.raises(InvalidInput, match=r"input_data\[1\]: an empty text") as e:
            decoder.decode(TEXT, ["a", empty])
        assert e.value.status_code == 422
    assert decoder.decode(TEXT, [" ", b"x"]) == [" ", "x"]  # one character is a text


def test_image_from_path_base64_and_data_uri_give_the_same_bytes(decoder, tmp_path):
    from serve_app.core.paths import PROJECT_ROOT

    raw = (PROJECT_ROOT / SAMPLE).read_bytes()
    b64 = base64.b64encode(raw).decode()
    assert decoder.decode(IMAGE, SAMPLE) == [raw]
    assert decoder.decode(IMAGE, str(PROJECT_ROOT / SAMPLE)) == [raw]
    assert decoder.decode(IMAGE, b64) == [raw]
    assert decoder.decode(IMAGE, f"data:image/jpeg;base64,{b64}") == [raw]


@pytest.mark.parametrize("path", ["samples/images/../../pyproject.png", "/etc/passwd.png", "../secret.jpg"])
def test_paths_outside_the_image_root_are_forbidden(decoder, path):
    with pytest.raises(ForbiddenPath):
        decoder.decode(IMAGE, path)


@pytest.mark.parametrize("path", ["~root/x.jpg", "~no-such-user-here/x.jpg", "~/x.jpg"])
def test_a_tilde_in_a_path_is_a_name_not_a_home_so_no_answer_tells_which_accounts_exist(decoder, path):
    """Expanded, ``~root`` would be a home outside the image root (403) and an unknown user's a path that
    cannot be resolved (422): two answers that tell the accounts apart. Taken as written, each is a file
    that is not there."""
    with pytest.raises(InvalidInput, match="no image file at") as e:
        decoder.decode(IMAGE, f"samples/images/{path}")
    assert e.value.status_code == 422
    with pytest.raises(ForbiddenPath):  # a folder under the project root, outside the image root, whoever it names
        decoder.decode(IMAGE, path)


def test_symlink_out_of_the_root_is_forbidden(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    (root / "link.png").symlink_to(outside)
    (root / "inside.png").write_bytes(_png())
    dec = _Sync(InputDecoder(image_root=root, max_image_bytes=1 << 20, max_image_pixels=100_000, max_items=4))
    assert dec.decode(IMAGE, str(root / "inside.png")) == [_png()]
    with pytest.raises(ForbiddenPath):
        dec.decode(IMAGE, str(root / "link.png"))


def test_a_loop_of_links_under_the_root_is_a_bad_path_not_a_crash(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop.png").symlink_to(root / "loop.png")
    dec = _Sync(InputDecoder(image_root=root, max_image_bytes=1 << 20, max_image_pixels=100_000, max_items=4))
    with pytest.raises(InvalidInput, match=r"no (readable )?image file at") as e:  # Python 3.13 resolves it
        dec.decode(IMAGE, str(root / "loop.png"))
    assert e.value.status_code == 422


def test_text_sent_to_an_image_model_is_invalid_input(decoder):
    with pytest.raises(InvalidInput) as e:
        decoder.decode(IMAGE, "This movie was great!")
    assert e.value.status_code == 422


def test_image_sent_to_a_text_model_is_invalid_input(decoder):
    with pytest.raises(InvalidInput):
        decoder.decode(TEXT, "data:image/png;base64," + base64.b64encode(_png()).decode())


def test_bytes_that_are_not_an_image_are_a_bad_image(decoder):
    with pytest.raises(BadImage) as e:
        decoder.decode(IMAGE, base64.b64encode(b"definitely not an image at all").decode())
    assert e.value.status_code == 400
    with pytest.raises(BadImage):
        decoder.decode(IMAGE, "data:image/png;base64," + base64.b64encode(_png()[:40]).decode())


def test_missing_file_is_invalid_input(decoder):
    with pytest.raises(InvalidInput, match="no image file"):
        decoder.decode(IMAGE, "samples/images/nope.jpg")


def test_raw_bytes_are_taken_as_they_are(decoder):
    assert decoder.decode(IMAGE, [_png()]) == [_png()]
    assert decoder.decode(TEXT, ["héllo".encode()]) == ["héllo"]
    with pytest.raises(InvalidInput, match="UTF-8"):
        decoder.decode(TEXT, [b"\xff\xfe"])


def _url_decoder(host: str) -> _Sync:
    from serve_app.core.config import UrlFetchArgs

    fetch = UrlFetchArgs(enabled=True, allowed_schemes=["https"], allowed_hosts=[host])
    return _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4, fetch))


def test_urls_are_refused_unless_enabled_and_allowed():
    off = _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4))
    with pytest.raises(ForbiddenPath, match="disabled"):
        off.decode(IMAGE, "https://example.com/cat.jpg")
    on = _url_decoder("images.example.com")
    with pytest.raises(ForbiddenPath, match="scheme"):
        on.decode(IMAGE, "http://images.example.com/cat.jpg")
    with pytest.raises(ForbiddenPath, match="allowed_hosts"):
        on.decode(IMAGE, "https://evil.example.com/cat.jpg")


@pytest.fixture
def image_host():
    """An HTTP server on the loopback that answers every GET with the same PNG after ``delay`` seconds, and
    counts the requests it got."""
    import http.server
    import threading
    import time

    class Host(http.server.ThreadingHTTPServer):
        body, delay, requests = _png((64, 64)), 0.0, 0

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.requests += 1
            time.sleep(self.server.delay)
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.body)))
            self.end_headers()
            self.wfile.write(self.server.body)

        def log_message(self, *args):
            pass

    server = Host(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _fetching_decoder(timeout_s: float, max_request_bytes: int = 1 << 20) -> _Sync:
    from serve_app.core.config import UrlFetchArgs

    fetch = UrlFetchArgs(enabled=True, allowed_schemes=["http"], allowed_hosts=["127.0.0.1"], timeout_s=timeout_s)
    return _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4, fetch, max_request_bytes=max_request_bytes))


def test_the_urls_of_one_request_share_one_timeout_and_one_byte_budget(image_host):
    url = f"http://127.0.0.1:{image_host.server_port}/cat.png"
    assert _fetching_decoder(5.0).decode(IMAGE, [url, url]) == [image_host.body] * 2
    # Four URLs that take 0.4 s each, within a timeout of 1 s for them all (each alone would be within it).
    image_host.delay, image_host.requests = 0.4, 0
    with pytest.raises(BadImage, match=r"fetching the request's URLs took longer than 1s"):
        _fetching_decoder(1.0).decode(IMAGE, [url] * 4)
    assert image_host.requests < 4
    # Refused while the second arrives: the third is never fetched.
    image_host.delay, image_host.requests = 0.0, 0
    budget = int(1.5 * len(image_host.body))
    with pytest.raises(InvalidInput, match=r"input_data\[1\]: the images of this request add up to more than"):
        _fetching_decoder(5.0, max_request_bytes=budget).decode(IMAGE, [url] * 3)
    assert image_host.requests == 2


def test_odd_paths_and_urls_are_client_errors_not_crashes():
    dec = _url_decoder("h.example")
    with pytest.raises(InvalidInput, match="NUL"):
        dec.decode(IMAGE, "samples/images/x\0.png")
    with pytest.raises(InvalidInput, match="not a valid URL"):
        dec.decode(IMAGE, "https://[::1")


def test_raw_bytes_over_the_byte_limit_are_refused():
    dec = _Sync(InputDecoder("samples/images", 100, 100_000, 4))
    with pytest.raises(InvalidInput, match="larger than 100 bytes"):
        dec.decode(IMAGE, [_png((64, 64)) + b"\0" * 200])


def test_the_images_of_one_request_share_a_byte_budget():
    one = _png((64, 64))
    dec = _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4, max_request_bytes=2 * len(one) + 1))
    assert dec.decode(IMAGE, [one, one]) == [one, one]
    with pytest.raises(InvalidInput, match=r"input_data\[2\]: the images of this request add up to more than"):
        dec.decode(IMAGE, [one, one, one])


def test_the_images_of_one_request_share_a_pixel_budget():
    one = _png((100, 100))
    dec = _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4, max_request_pixels=25_000))
    assert len(dec.decode(IMAGE, [one, one])) == 2
    with pytest.raises(InvalidInput, match="more than 25000 pixels together"):
        dec.decode(IMAGE, [one, one, one])


def test_text_over_the_character_limit_is_refused_before_it_is_decoded():
    dec = _Sync(InputDecoder("samples/images", 1 << 20, 100_000, 4, max_text_chars=10))
    assert dec.decode(TEXT, ["x" * 10]) == ["x" * 10]
    with pytest.raises(InvalidInput, match="a text of 11 characters is longer than the limit of 10"):
        dec.decode(TEXT, ["x" * 11])
    with pytest.raises(InvalidInput, match="a text of 41 bytes of UTF-8 is longer than the limit of 10 characters"):
        dec.decode(TEXT, [b"x" * 41])  # bytes: refused by their size before decoding, counted as bytes


@pytest.mark.parametrize(
    "modality, data, match",
    [
        (TEXT, ["x"] * 5, "limit of 4"),
        (IMAGE, [b"\0" * ((1 << 20) + 1)], "larger than 1048576 bytes"),
        (IMAGE, [_png((400, 400))], "more than the limit of 100000"),
        # Over Pillow's own cap: its DecompressionBombError is the same limit's error.
        (IMAGE, [png_claiming(100_000, 100_000)], "more than the limit of 100000 pixels"),
    ],
)
def test_every_limit_is_a_limit_error_of_its_old_type(decoder, modality, data, match):
    from serve_app.core.errors import LimitExceeded

    with pytest.raises(LimitExceeded, match=match) as e:
        decoder.decode(modality, data)
    assert isinstance(e.value, InvalidInput if "bytes" in match or "limit of 4" in match else BadImage)


def test_a_decoders_message_reaches_the_client_without_object_addresses(decoder):
    with pytest.raises(BadImage) as e:
        decoder.decode(IMAGE, base64.b64encode(b"definitely not an image at all").decode())
    assert "UnidentifiedImageError: cannot identify image file" in e.value.message
    assert "0x" not in e.value.message and "BytesIO" not in e.value.message


def _saved(image: Image.Image, format: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **options)
    return buf.getvalue()


def test_an_image_decoded_whole_with_too_many_pixels_a_byte_is_a_bomb_but_a_jpeg_is_not():
    d = _Sync(
        InputDecoder(
            image_root="samples/images",
            max_image_bytes=1 << 20,
            max_image_pixels=25_000_000,
            max_items=4,
            max_pixels_per_byte=1024,
        )
    )
    flat = Image.new("RGB", (2000, 2000), (10, 200, 30))
    bomb = _saved(flat, "WEBP", lossless=True)  # 4 megapixels in a few hundred bytes
    with pytest.raises(BadImage, match=r"2000x2000 pixels in \d+ bytes is more than 1024 pixels a byte") as e:
        d.decode(IMAGE, [base64.b64encode(bomb).decode()])
    assert e.value.status_code == 400
    # A flat RGB PNG is at most about 344 pixels a byte (deflate's 1032:1), a flat JPEG shrinks while decoded.
    for data in (_saved(flat, "PNG"), _saved(flat, "JPEG", quality=60)):
        assert d.decode(IMAGE, [base64.b64encode(data).decode()]) == [data]


def _jpeg_of_scans(extra: int, format: str = "JPEG") -> bytes:
    """A progressive JPEG (grey, libjpeg's 6 scans) with its first scan written ``extra`` more times; ``MPO``:
    one with a multi-picture header and a second picture, as cameras write (Pillow names it MPO)."""
    grey = Image.new("L", (64, 64), 128)
    more = {"save_all": True, "append_images": [grey]} if format == "MPO" else {}
    data = _saved(grey, format, progressive=True, **more)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    first = data[starts[0] : starts[1]]
    return data[: starts[1]] + first * extra + data[starts[1] :]


def _rle_bmp(side: int, idle_runs: int = 0) -> bytes:
    """A grey BMP of ``side`` x ``side`` pixels compressed with RLE4 (Pillow writes none): each row runs of
    255 pixels of one value; after the first row, ``idle_runs`` runs that the row's end cuts to nothing."""
    import struct

    row = b"".join(bytes([min(255, side - x), 0x5A]) for x in range(0, side, 255))
    body = row + b"\xff\x5a" * idle_runs + b"\x00\x00" + (row + b"\x00\x00") * (side - 1)
    palette = b"".join(bytes([i * 16, i * 16, i * 16, 0]) for i in range(16))
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 4, 2, len(body), 2835, 2835, 16, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + header + palette + body


def test_a_jpeg_of_more_scans_than_the_limit_is_a_bomb_and_a_progressive_one_is_not(decoder):
    """Each scan of a progressive JPEG is decoded over the whole image: a file of many small scans is cheap to
    send and costs seconds to decode (draft does not shrink that), so a JPEG has at most 100 scans."""
    progressive = _jpeg_of_scans(0)
    assert progressive.count(b"\xff\xda") == 6
    assert decoder.decode(IMAGE, [base64.b64encode(progressive).decode()]) == [progressive]
    assert decoder.decode(IMAGE, [base64.b64encode(_jpeg_of_scans(94)).decode()]) != []  # 100 scans
    with pytest.raises(BadImage, match="a JPEG of 101 scans is more than the limit of 100") as e:
        decoder.decode(IMAGE, [base64.b64encode(_jpeg_of_scans(95)).decode()])
    assert e.value.status_code == 400
    # A JPEG with a multi-picture header is one too: its scans count the same (both pictures': 12 of them).
    camera = _jpeg_of_scans(0, "MPO")
    assert Image.open(io.BytesIO(camera)).format == "MPO" and camera.count(b"\xff\xda") == 12
    assert decoder.decode(IMAGE, [base64.b64encode(camera).decode()]) == [camera]
    with pytest.raises(BadImage, match="a JPEG of 101 scans is more than the limit of 100"):
        decoder.decode(IMAGE, [base64.b64encode(_jpeg_of_scans(89, "MPO")).decode()])


def test_a_bmp_compressed_with_rle_which_decodes_in_python_has_at_most_a_million_pixels():
    decoder = _Sync(
        InputDecoder(image_root="samples/images", max_image_bytes=1 << 20, max_image_pixels=25_000_000, max_items=4)
    )
    small, large = _rle_bmp(1000), _rle_bmp(1001)  # about 100 pixels a byte: within max_pixels_per_byte
    assert decoder.decode(IMAGE, [base64.b64encode(small).decode()]) == [small]
    with pytest.raises(BadImage, match="a BMP compressed with RLE of 1001x1001 pixels is more than the limit"):
        decoder.decode(IMAGE, [base64.b64encode(large).decode()])
    # Pillow reads RLE two bytes at a time, in Python, and a run past a row's end draws nothing: at most the bytes
    # of a pixel a run (2), a row's end and a move (4 a row) and the headers (4,096): 506,096 for 500 x 500.
    stuffed = _rle_bmp(500, idle_runs=300_000)  # 600 KB of nothing
    with pytest.raises(BadImage, match=r"of 500x500 pixels in 6\d{5} bytes, more than the 506096 its pixels take"):
        decoder.decode(IMAGE, [base64.b64encode(stuffed).decode()])
    within = _rle_bmp(500, idle_runs=1_000)
    assert decoder.decode(IMAGE, [base64.b64encode(within).decode()]) == [within]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_in_chunks(size: int, empty: int = 0) -> bytes:
    """A PNG of 1000 x 1000 noise with its pixels in IDAT chunks of ``size`` bytes, after ``empty`` empty chunks
    of a kind Pillow does not know."""
    data = _image_bytes(Image.effect_noise((1000, 1000), 64), "PNG")
    pos, idat, head = 8, b"", []
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body, pos = data[pos + 8 : pos + 8 + length], pos + 12 + length
        if kind == b"IDAT":
            idat += body
        elif kind != b"IEND":
            head.append(_chunk(kind, body))
    pixels = [_chunk(b"IDAT", idat[i : i + size]) for i in range(0, len(idat), size)]
    return data[:8] + b"".join(head) + _chunk(b"zzZz", b"") * empty + b"".join(pixels) + _chunk(b"IEND", b"")


def _image_bytes(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def test_an_image_of_more_pieces_than_pillow_should_read_one_by_one_is_refused_before_it_reads_them():
    """Pillow reads a JPEG's markers before its first scan, a PNG's chunks and a GIF's blocks before its first
    picture one at a time in Python: a file of a million empty ones fits every byte and pixel limit and costs
    seconds of the ingress's CPU. At most 2,000 of them; a PNG of 8 MiB in libpng's 8 KB chunks has about
    1,000, and its encoders write tens before the pixels."""
    decoder = _Sync(
        InputDecoder(image_root="samples/images", max_image_bytes=8 << 20, max_image_pixels=25_000_000, max_items=4)
    )
    jpeg = _image_bytes(Image.new("RGB", (8, 8)), "JPEG")
    gif = _image_bytes(Image.new("P", (8, 8)), "GIF")
    first_picture = gif.index(b",")

    def sent(data: bytes) -> list[bytes]:
        return decoder.decode(IMAGE, [base64.b64encode(data).decode()])

    png = _png_in_chunks(600)  # about 1,600 small chunks, as an encoder may write them
    assert png.count(b"IDAT") > 1500 and sent(png) == [png]
    many = {
        "a JPEG's markers before its first scan": jpeg[:2] + b"\xff\xfe\x00\x02" * 300_000 + jpeg[2:],
        "a PNG's chunks": _png_in_chunks(1 << 16, empty=300_000),
        "a GIF's blocks before its first picture": gif[:first_picture]
        + b"!\xfe"
        + b"\x01a" * 300_000
        + b"\x00"
        + gif[first_picture:],
    }
    for what, data in many.items():
        with pytest.raises(BadImage, match=f"{what} number more than the limit of 2000") as e:
            sent(data)
        assert e.value.status_code == 400
    # Chunks Pillow decompresses as it reads them: at most 16, unpacking to at most 1 MiB of text together.
    png8 = _image_bytes(Image.new("RGB", (8, 8)), "PNG")
    pixels_at = png8.index(b"IDAT") - 4
    unpacks = zlib.compress(b"A" * ((1 << 20) - 1), 9)  # 1 KB that unpacks to 1 MiB

    def with_text(n: int) -> bytes:
        return (
            png8[:pixels_at]
            + b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % k + unpacks) for k in range(n))
            + png8[pixels_at:]
        )

    with pytest.raises(BadImage, match="compressed text and profile chunks number more than the limit of 16"):
        sent(with_text(17))
    with pytest.raises(BadImage, match="Too much memory used in text chunks"):
        sent(with_text(2))
    text = PngImagePlugin.PngInfo()
    text.add_itxt("XML:com.adobe.xmp", "x" * 50_000, zip=True)
    profiled = _image_bytes(Image.new("RGB", (8, 8)), "PNG", pnginfo=text, icc_profile=b"\0" * 300_000)
    assert sent(profiled) == [profiled]
    junk = jpeg[:2] + b"\xff" * 5000 + jpeg[2:]  # fill bytes, which Pillow skips one at a time as well
    with pytest.raises(BadImage, match="a JPEG of more than 4096 bytes outside its markers before its first scan"):
        sent(junk)
    assert sent(jpeg[:2] + b"\xff" * 4000 + jpeg[2:]) != []


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _tiff(entries: int, *extra: bytes) -> bytes:
    """EXIF data: a TIFF header, then a first directory of ``entries`` tags of their own (and ``extra`` ones)."""
    tags = [struct.pack("<HHL4s", 0x1000 + k, 2, 4, b"cam\0") for k in range(entries)]
    return b"II*\x00" + struct.pack("<IH", 8, entries + len(extra)) + b"".join([*extra, *tags]) + b"\0\0\0\0"


def _exif(entries: int, prefix: bytes = b"Exif\0\0") -> bytes:
    """APP1 segments of at most 64 KB each, as Pillow joins them, whose first directory has ``entries``."""
    payload, chunk = _tiff(entries), 65533 - 6
    return b"".join(_segment(0xFFE1, prefix + payload[i : i + chunk]) for i in range(0, len(payload), chunk))


def test_an_image_whose_segments_pillow_reads_item_by_item_is_refused_past_what_encoders_write():
    """Within one JPEG segment of 64 KB Pillow reads a frame header's components, quantization tables, Photoshop's
    resources and the EXIF directory's entries one by one in Python: 79 frame headers of 64 KB (5 MB) cost 0.47 s
    and 150 MB to open. Encoders write one frame header of at most 4 components, a few tables, a Photoshop block
    and tens of EXIF entries; a GIF's bytes that are no block, which Pillow skips one at a time, count as junk."""
    decoder = _Sync(
        InputDecoder(image_root="samples/images", max_image_bytes=8 << 20, max_image_pixels=25_000_000, max_items=4)
    )
    jpeg = _image_bytes(Image.new("RGB", (8, 8)), "JPEG")
    jfif = 4 + struct.unpack(">H", jpeg[4:6])[0]  # past its JFIF segment: Pillow takes the resolution from EXIF

    def sent(*segments: bytes, image: bytes = jpeg, at: int = 2) -> list[bytes]:
        data = image[:at] + b"".join(segments) + image[at:]
        return decoder.decode(IMAGE, [base64.b64encode(data).decode()])

    frame = _segment(0xFFC0, bytes([8, 0, 8, 0, 8, 3]) + b"\x01\x11\x00" * 3000)
    tables = _segment(0xFFDB, (b"\x00" + b"\x01" * 64) * 40)
    photoshop = _segment(0xFFED, b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0\0\0\0\0" * 5000)
    refused = {
        "a JPEG frame header of 9008 bytes: a frame of at most 4 components has 20": [frame],
        "a JPEG of more than 2064 bytes of quantization tables before its first scan": [tables],
        "a JPEG of more than 131072 bytes of Photoshop blocks before its first scan": [photoshop] * 3,
        "EXIF data of 3000 entries in its first directory, more than the limit of 2000": [_exif(3000)],
        # Pillow strips "Exif\0\0" twice, and joins every EXIF segment
        "EXIF data of 3000 entries in its first directory, more": [_exif(3000, prefix=b"Exif\0\0Exif\0\0")],
        "EXIF data of more than 65536 bytes": [_exif(6000)],
        # one resolution, read at open, of 8,000 numbers (a table of 8 bytes each): 41 ms for an image of 64 KB
        "EXIF tag 0x011A of 8000 values: it has one": [
            _segment(0xFFE1, b"Exif\0\0" + _tiff(0, struct.pack("<HHLL", 0x011A, 5, 8000, 26)) + b"\1" * 64000)
        ],
        # Pillow reads no length after FF F0 to FF FD, nor FF C8, and takes the next bytes as a marker
        "a JPEG of more than 2064 bytes of quantization tables": [b"\xff\xf0" + tables, b"\xff\xc8" + tables],
        "a JPEG frame header of 9008 bytes": [b"\xff\xfd" + frame],
    }
    for what, segments in refused.items():
        with pytest.raises(BadImage, match=what) as e:
            sent(*segments, image=jpeg[:2] + jpeg[jfif:])
        assert e.value.status_code == 400
    # What encoders write passes: tens of EXIF entries, a full Photoshop block, a camera's 2,000 entries at most.
    assert len(sent(_exif(2000), photoshop, photoshop, image=jpeg[:2] + jpeg[jfif:])) == 1
    assert len(sent(_segment(0xFFDB, (b"\x00" + b"\x01" * 64) * 4), _exif(30))) == 1
    # 29 tables, and the image's own 2: 2,015 bytes of 2,064; one more table is too many. A length under 2, which
    # Pillow reads as none, counts as none (not as less than none: 100 of them would have made room for 3 tables).
    tables_of_29, empty = _segment(0xFFDB, (b"\x00" + b"\x01" * 64) * 29), b"\xff\xdb\x00\x00"
    with pytest.raises(BadImage, match="quantization tables"):
        sent(empty * 100, tables_of_29, _segment(0xFFDB, (b"\x00" + b"\x01" * 64)))
    assert len(sent(empty * 100, tables_of_29)) == 1
    png = _image_bytes(Image.new("RGB", (8, 8)), "PNG")
    pixels_at = png.index(b"IDAT") - 4
    exif_chunk = _tiff(3000)
    with pytest.raises(BadImage, match="EXIF data of 3000 entries in its first directory"):
        sent(_chunk(b"eXIf", exif_chunk), image=png, at=pixels_at)
    gif = _image_bytes(Image.new("P", (8, 8)), "GIF")
    before_picture = gif.index(b",")
    with pytest.raises(BadImage, match="a GIF of more than 4096 bytes outside its blocks before its first picture"):
        sent(b"\x00" * 5000, image=gif, at=before_picture)
    assert len(sent(b"\x00" * 4000, image=gif, at=before_picture)) == 1
