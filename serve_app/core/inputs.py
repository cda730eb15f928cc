"""The input kinds tasks are made of (``serve_app.core.tasks``): how a request's inputs are decoded and
bounded, in the ingress, before any work that grows with them, into what a model runtime takes.

A task names its kind of input; the ingress's data plane hands every request's inputs to
``InputDecoder.decode`` with that kind, which checks the list's length and lets the kind decode each item.
The kinds shipped here: ``TEXT`` (strings) and ``IMAGE`` (encoded image bytes). A task module may define a
kind of its own: a subclass of ``InputKind`` whose ``decode`` bounds its input before it does any work
that grows with it, and runs that work off the event loop.

Text is taken as it is, up to ``max_text_chars`` characters. Images arrive in one of four forms:

* a data URI: ``data:image/png;base64,....``
* bare base64 of the encoded file;
* a file path (the seed's form). A relative path is taken from the project root, and the file must lie
  under the configured image root (symlinks are resolved first), so no other file on the machine can be
  read;
* an http(s) URL, only when ``url_fetch.enabled`` is set, and then only with an allowed scheme and host,
  within a time and a size limit; redirects are not followed.

The ingress checks each image's header here (an allowed format, its pixel count, and for the formats the
worker decodes whole, its pixels per byte of file) without decoding its pixels, so that a bad image is
refused before it reaches a worker replica; the worker decodes it, once. A decompression bomb is cheap to
send and costly to decode: a lossless WebP of 6324 x 6324 pixels fits in 1,588 bytes and costs 0.57 s and
210 MB to decode. Pillow shrinks a JPEG while it decodes it (``draft``), but a PNG, WebP, GIF or BMP is
decoded whole, so such an image may hold at most ``max_pixels_per_byte`` pixels per byte: a photo holds a
few, an RGB PNG cannot hold more than about 344 (deflate compresses at most 1032:1), a bomb thousands.
Every check is bounded by the input's size, and the work that grows with it (base64, file reads, header
parsing) runs in a thread, off the event loop. Error messages name the input, never a server path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from PIL import Image

from serve_app.core.config import UrlFetchArgs
from serve_app.core.errors import BadImage, ForbiddenPath, ImageOverLimit, InputOverLimit, InvalidInput
from serve_app.core.images import (
    BMP_RLE,
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    JPEG_FORMATS,
    MAX_JPEG_SCANS,
    MAX_SLOW_DECODED_PIXELS,
    SHRUNK_WHILE_DECODED,
    TooManySegments,
    decoder_error,
    jpeg_scans,
    open_image,
    rle_bytes_at_most,
)
from serve_app.core.paths import resolve_client_path, resolve_project_path

_DATA_URI = re.compile(r"data:(?:[\w.+-]+/[\w.+-]+)?(?:;base64)?,")  # matched on a bounded prefix only
# Linear on input without whitespace: "=" is not in the class, so nothing backtracks.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,15}://")
MAX_PATH_CHARS = 1024
_ECHO_CHARS = 80  # how much of an input an error message quotes


def _quote(item: str) -> str:
    return repr(item if len(item) <= _ECHO_CHARS else item[:_ECHO_CHARS] + "...")


@dataclass(frozen=True)
class InputLimits:
    """The limits every input kind bounds a request by (``AppArgs``: max_list_items, max_text_chars, ...)."""

    image_root: Path
    max_image_bytes: int
    max_image_pixels: int
    max_items: int
    url_fetch: UrlFetchArgs = field(default_factory=UrlFetchArgs)
    max_text_chars: int = 20_000
    max_request_pixels: int = 0
    max_request_bytes: int = 0
    max_pixels_per_byte: int = 1024


def item_where(i: int) -> str:
    """How error messages name a request's input ``i``, whatever the protocol."""
    return f"input_data[{i}]"


class InputKind(ABC):
    """A kind of input a task takes: its name (the v2 input tensor's, and the native API's
    ``input_modality``), what clients send, and how one request's items are decoded and bounded."""

    name: ClassVar[str]
    datatype: ClassVar[str] = "BYTES"
    accepts: ClassVar[str] = ""
    """What a client sends, in words (for docs and error messages)."""

    @abstractmethod
    async def decode(self, items: Sequence[str | bytes], limits: InputLimits) -> list[Any]:
        """The items as the task's runtimes take them. The list's length is checked already; each item must be
        bounded before work that grows with it, and such work runs off the event loop."""


class TextInput(InputKind):
    """UTF-8 text, at least one character and at most ``max_text_chars`` an item (bytes from v2's binary form
    are decoded)."""

    name = "text"
    accepts = "a string or a list of strings"

    async def decode(self, items: Sequence[str | bytes], limits: InputLimits) -> list[str]:
        return [self._text(i, item, limits.max_text_chars) for i, item in enumerate(items)]  # bounded: prefix, length

    def _text(self, i: int, item: str | bytes, max_chars: int) -> str:
        where = item_where(i)
        if isinstance(item, bytes):
            if len(item) > 4 * max_chars:  # no UTF-8 text of the limit's length is longer
                raise self._too_long(where, len(item), max_chars, "bytes of UTF-8")
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{where}: text must be UTF-8", field="input_data") from None
        if len(item) > max_chars:
            raise self._too_long(where, len(item), max_chars)
        if not item:  # as the native API's schema refuses "": no protocol sends a model an empty text
            raise InvalidInput(f"{where}: an empty text (send at least one character)", field="input_data")
        if item.startswith("data:") and _DATA_URI.match(item[:256]):
            raise InvalidInput(
                f"{where}: this model takes text, and was sent a data URI (an image or file)", field="input_data"
            )
        return item

    @staticmethod
    def _too_long(where: str, length: int, max_chars: int, unit: str = "characters") -> InputOverLimit:
        return InputOverLimit(
            f"{where}: a text of {length} {unit} is longer than the limit of {max_chars} characters",
            field="input_data",
        )


class ImageInput(InputKind):
    """Encoded images (JPEG, PNG, WebP, GIF, BMP): a path under the image root, base64, a data URI, a URL
    when url_fetch allows it, or raw bytes (v2's binary form). Each image's header is checked here (its
    format, its pixels against the limits); its pixels are decoded once, in the worker."""

    name = "image"
    accepts = "a path under the image root, base64 of the encoded image, a data URI, or a list of these"

    async def decode(self, items: Sequence[str | bytes], limits: InputLimits) -> list[bytes]:
        urls = {i: item for i, item in enumerate(items) if isinstance(item, str) and _URL.match(item)}
        fetched = await _fetch_all(urls, limits) if urls else {}
        return await asyncio.to_thread(self._images, items, fetched, limits)

    def _images(self, items: Sequence[str | bytes], fetched: dict[int, bytes], limits: InputLimits) -> list[bytes]:
        images, total_bytes, total_pixels = [], 0, 0
        for i, item in enumerate(items):
            where = item_where(i)
            data = fetched[i] if i in fetched else self._image_bytes(where, item, limits)
            total_bytes += len(data)
            if total_bytes > limits.max_request_bytes:
                raise InputOverLimit(
                    f"{where}: the images of this request add up to more than {limits.max_request_bytes} bytes",
                    field="input_data",
                )
            total_pixels += self._check_image(where, data, limits)
            if total_pixels > limits.max_request_pixels:
                raise InputOverLimit(
                    f"{where}: the images of this request have more than {limits.max_request_pixels} pixels together",
                    field="input_data",
                )
            images.append(data)
        return images

    def _image_bytes(self, where: str, item: str | bytes, limits: InputLimits) -> bytes:
        if isinstance(item, bytes):
            _check_size(where, len(item), limits)
            return item
        if item.startswith("data:"):
            header, comma, payload = item.partition(",")
            if not comma or not header[5:].endswith(";base64"):
                raise InvalidInput(
                    f"{where}: a data URI must be base64-encoded (data:image/png;base64,...)", field="input_data"
                )
            return self._b64(where, payload, limits)
        if self._looks_like_path(item):
            return self._read_path(where, item, limits)
        compact = "".join(item.split())  # linear, whatever the whitespace
        if len(compact) >= 16 and _BASE64.fullmatch(compact):
            return self._b64(where, compact, limits)
        raise InvalidInput(
            f"{where}: this model takes an image: a path to an image file "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}), base64 of the image, or a data URI",
            field="input_data",
        )

    @staticmethod
    def _looks_like_path(item: str) -> bool:
        return len(item) <= MAX_PATH_CHARS and "\n" not in item and Path(item[-16:]).suffix.lower() in IMAGE_SUFFIXES

    @staticmethod
    def _b64(where: str, text: str, limits: InputLimits) -> bytes:
        _check_size(where, len(text) * 3 // 4, limits)
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"{where}: not valid base64") from None

    @staticmethod
    def _read_path(where: str, item: str, limits: InputLimits) -> bytes:
        if "\0" in item:
            raise InvalidInput(f"{where}: a path cannot contain a NUL character", field="input_data")
        try:
            path = resolve_client_path(item).resolve()
            if not path.is_relative_to(limits.image_root):
                raise ForbiddenPath(f"{where}: image paths must lie under the image root (image_root)")
            if not path.is_file():
                raise InvalidInput(f"{where}: no image file at {_quote(item)}", field="input_data")
            _check_size(where, path.stat().st_size, limits)
            return path.read_bytes()
        except (OSError, RuntimeError) as e:  # too long a name, a loop of links, no permission: the client's bad path
            # (On Python 3.11 Path.resolve raises RuntimeError for a loop of links; its text names server paths,
            # so it is not echoed.)
            reason = e.strerror if isinstance(e, OSError) else "the path cannot be resolved"
            raise InvalidInput(
                f"{where}: no readable image file at {_quote(item)} ({reason})", field="input_data"
            ) from None

    @staticmethod
    def _check_image(where: str, data: bytes, limits: InputLimits) -> int:
        """The header only (the pixels are decoded once, by the worker): an allowed format within the
        pixel limit. Returns its pixel count."""
        try:
            with open_image(data) as img:
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise ImageOverLimit(
                        f"{where}: {width}x{height} pixels is more than the limit of {limits.max_image_pixels}"
                    )
                if img.format not in SHRUNK_WHILE_DECODED and width * height > limits.max_pixels_per_byte * len(data):
                    raise ImageOverLimit(
                        f"{where}: {width}x{height} pixels in {len(data)} bytes is more than "
                        f"{limits.max_pixels_per_byte} pixels a byte (max_pixels_per_byte): a decompression bomb"
                    )
                if img.format in JPEG_FORMATS and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
                    raise ImageOverLimit(
                        f"{where}: a JPEG of {scans} scans is more than the limit of {MAX_JPEG_SCANS} (each scan "
                        "is decoded over the whole image): a decompression bomb"
                    )
                rle = img.format == "BMP" and img.info.get("compression") in BMP_RLE
                if rle and width * height > MAX_SLOW_DECODED_PIXELS:
                    raise ImageOverLimit(
                        f"{where}: a BMP compressed with RLE of {width}x{height} pixels is more than the limit of "
                        f"{MAX_SLOW_DECODED_PIXELS} pixels for it (it decodes slowly): send it as PNG"
                    )
                if rle and len(data) > (most := rle_bytes_at_most(width, height)):
                    raise ImageOverLimit(
                        f"{where}: a BMP compressed with RLE of {width}x{height} pixels in {len(data)} bytes, more "
                        f"than the {most} its pixels take however they are encoded (it decodes slowly): send it as PNG"
                    )
                img.verify()  # the file's structure, where the format allows it (PNG chunks), no decoding
                return width * height
        except BadImage:
            raise
        except TooManySegments as e:
            raise ImageOverLimit(f"{where}: {e}") from None
        except Image.DecompressionBombError:  # Pillow's own limit, above this app's: its header claims more
            raise ImageOverLimit(
                f"{where}: the image is more than the limit of {limits.max_image_pixels} pixels"
            ) from None
        except Exception as e:  # whatever the decoder raises on bad bytes is the client's bad image
            raise BadImage(
                f"{where}: not a readable image of an allowed format ({', '.join(IMAGE_FORMATS)}): {decoder_error(e)}"
            ) from None


def _check_size(where: str, size: int, limits: InputLimits) -> None:
    if size > limits.max_image_bytes:
        raise InputOverLimit(f"{where}: the image is larger than {limits.max_image_bytes} bytes", field="input_data")


# -- URLs -------------------------------------------------------------------------------------------------


def _check_url(where: str, url: str, limits: InputLimits) -> None:
    """ForbiddenPath (403) unless fetching is on and the URL's scheme and host are allowed."""
    cfg = limits.url_fetch
    if not cfg.enabled:
        raise ForbiddenPath(f"{where}: fetching image URLs is disabled (url_fetch.enabled)")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise InvalidInput(f"{where}: not a valid URL", field="input_data") from None
    if parts.scheme.lower() not in {s.lower() for s in cfg.allowed_schemes}:
        raise ForbiddenPath(f"{where}: URL scheme {parts.scheme!r} is not allowed")
    if host not in {h.lower() for h in cfg.allowed_hosts}:
        raise ForbiddenPath(f"{where}: host {_quote(parts.hostname or '')} is not in url_fetch.allowed_hosts")


async def _fetch_all(urls: dict[int, str], limits: InputLimits) -> dict[int, bytes]:
    """A request's image URLs (by input index), each checked before any is fetched, then fetched one after
    another within one ``url_fetch.timeout_s`` for them all, and within the request's byte budget
    (``max_request_bytes``) counted as their bytes arrive: neither grows with the number of URLs."""
    import httpx  # the ingress's only: not imported where task modules are (the worker replicas)

    for i, url in urls.items():
        _check_url(item_where(i), url, limits)
    cfg, fetched, got = limits.url_fetch, {}, 0
    i = next(iter(urls))
    try:
        async with httpx.AsyncClient(timeout=cfg.timeout_s, follow_redirects=False) as client:
            async with asyncio.timeout(cfg.timeout_s):  # every fetch of the request, not each read
                for i, url in urls.items():  # i names the input in the errors below
                    fetched[i] = await _download(client, item_where(i), url, limits, got)
                    got += len(fetched[i])
    except (TimeoutError, httpx.TimeoutException):
        raise BadImage(f"{item_where(i)}: fetching the request's URLs took longer than {cfg.timeout_s:g}s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise BadImage(f"{item_where(i)}: fetching the URL failed: {type(e).__name__}") from None
    return fetched


async def _download(client: Any, where: str, url: str, limits: InputLimits, before: int) -> bytes:
    """One URL's bytes; ``before``: the bytes the request's earlier URLs brought."""
    async with client.stream("GET", url) as r:
        if r.status_code != 200:
            raise BadImage(f"{where}: fetching the URL gave HTTP {r.status_code}")
        chunks, size = [], 0
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            _check_size(where, size, limits)
            if before + size > limits.max_request_bytes:
                raise InputOverLimit(
                    f"{where}: the images of this request add up to more than {limits.max_request_bytes} bytes",
                    field="input_data",
                )
            chunks.append(chunk)
    return b"".join(chunks)


TEXT = TextInput()
IMAGE = ImageInput()


class InputDecoder:
    """Decodes one request's inputs for a task's input kind, within the app's limits."""

    def __init__(
        self,
        image_root: str | Path,
        max_image_bytes: int,
        max_image_pixels: int,
        max_items: int,
        url_fetch: UrlFetchArgs | None = None,
        max_text_chars: int = 20_000,
        max_request_pixels: int | None = None,
        max_request_bytes: int | None = None,
        max_pixels_per_byte: int = 1024,
    ) -> None:
        self.limits = InputLimits(
            image_root=resolve_project_path(image_root).resolve(),
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            max_items=max_items,
            url_fetch=url_fetch or UrlFetchArgs(),
            max_text_chars=max_text_chars,
            max_request_pixels=max_request_pixels or max_items * max_image_pixels,
            max_request_bytes=max_request_bytes or max_items * max_image_bytes,
            max_pixels_per_byte=max_pixels_per_byte,
        )

    async def decode(self, kind: InputKind, inputs: str | Sequence[str | bytes]) -> list[Any]:
        """Strings in any of the kind's forms; raw bytes (the v2 binary tensor form) are taken as they are."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if len(inputs) > self.limits.max_items:
            raise InputOverLimit(
                f"input_data: a list of {len(inputs)} inputs is longer than the limit of {self.limits.max_items}",
                field="input_data",
            )
        return await kind.decode(inputs, self.limits)
