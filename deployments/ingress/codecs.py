"""Turn a request's inputs into what a model runtime takes: strings for text, encoded image bytes for images.

Text is taken as it is, up to ``max_text_chars`` characters. Images arrive in one of four forms:

* a data URI: ``data:image/png;base64,....``
* bare base64 of the encoded file;
* a file path (the seed's form). A relative path is taken from the project root, and the file must lie
  under the configured image root (symlinks are resolved first), so no other file on the machine can be
  read;
* an http(s) URL, only when ``url_fetch.enabled`` is set, and then only with an allowed scheme and host,
  within a time and a size limit; redirects are not followed.

The ingress checks each image's header here (an allowed format, its pixel count) without decoding its
pixels, so that a bad image is refused before it reaches a worker replica; the worker decodes it, once.
Every check is bounded by the input's size, and the work that grows with it (base64, file reads, header
parsing) runs in a thread, off the event loop. Error messages name the input, never a server path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from serve_app.core.config import UrlFetchArgs
from serve_app.core.errors import BadImage, ForbiddenPath, ImageOverLimit, InputOverLimit, InvalidInput
from serve_app.core.images import IMAGE_FORMATS, IMAGE_SUFFIXES, open_image
from serve_app.core.paths import resolve_project_path
from serve_app.core.registry import Modality

_DATA_URI = re.compile(r"data:(?:[\w.+-]+/[\w.+-]+)?(?:;base64)?,")  # matched on a bounded prefix only
# Linear on input without whitespace: "=" is not in the class, so nothing backtracks.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,15}://")
MAX_PATH_CHARS = 1024
_ECHO_CHARS = 80  # how much of an input an error message quotes


def _quote(item: str) -> str:
    return repr(item if len(item) <= _ECHO_CHARS else item[:_ECHO_CHARS] + "...")


class InputDecoder:
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
    ) -> None:
        self.image_root = resolve_project_path(image_root).resolve()
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_items = max_items
        self.url_fetch = url_fetch or UrlFetchArgs()
        self.max_text_chars = max_text_chars
        self.max_request_pixels = max_request_pixels or max_items * max_image_pixels
        self.max_request_bytes = max_request_bytes or max_items * max_image_bytes

    async def decode(self, modality: Modality, inputs: str | Sequence[str | bytes]) -> list[str] | list[bytes]:
        """Strings in any of the forms above; raw bytes (the v2 binary tensor form) are taken as they are."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if len(inputs) > self.max_items:
            raise InputOverLimit(
                f"input_data: a list of {len(inputs)} inputs is longer than the limit of {self.max_items}",
                field="input_data",
            )
        if modality is Modality.TEXT:
            return [self._text(i, item) for i, item in enumerate(inputs)]  # bounded: prefix and length checks
        fetched = {
            i: await self._fetch(self._where(i), item)
            for i, item in enumerate(inputs)
            if isinstance(item, str) and _URL.match(item)
        }
        return await asyncio.to_thread(self._images, inputs, fetched)

    @staticmethod
    def _where(i: int) -> str:
        return f"input_data[{i}]"

    # -- text -----------------------------------------------------------------------------------------

    def _text(self, i: int, item: str | bytes) -> str:
        where = self._where(i)
        if isinstance(item, bytes):
            if len(item) > 4 * self.max_text_chars:  # no UTF-8 text of the limit's length is longer
                raise self._too_long(where, len(item))
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{where}: text must be UTF-8", field="input_data") from None
        if len(item) > self.max_text_chars:
            raise self._too_long(where, len(item))
        if item.startswith("data:") and _DATA_URI.match(item[:256]):
            raise InvalidInput(
                f"{where}: this model takes text, and was sent a data URI (an image or file)", field="input_data"
            )
        return item

    def _too_long(self, where: str, length: int) -> InputOverLimit:
        return InputOverLimit(
            f"{where}: a text of {length} characters is longer than the limit of {self.max_text_chars}",
            field="input_data",
        )

    # -- images (in a thread) -------------------------------------------------------------------------

    def _images(self, inputs: Sequence[str | bytes], fetched: dict[int, bytes]) -> list[bytes]:
        images, total_bytes, total_pixels = [], 0, 0
        for i, item in enumerate(inputs):
            where = self._where(i)
            data = fetched[i] if i in fetched else self._image_bytes(where, item)
            total_bytes += len(data)
            if total_bytes > self.max_request_bytes:
                raise InputOverLimit(
                    f"{where}: the images of this request add up to more than {self.max_request_bytes} bytes",
                    field="input_data",
                )
            total_pixels += self._check_image(where, data)
            if total_pixels > self.max_request_pixels:
                raise InputOverLimit(
                    f"{where}: the images of this request have more than {self.max_request_pixels} pixels together",
                    field="input_data",
                )
            images.append(data)
        return images

    def _image_bytes(self, where: str, item: str | bytes) -> bytes:
        if isinstance(item, bytes):
            self._check_size(where, len(item))
            return item
        if item.startswith("data:"):
            header, comma, payload = item.partition(",")
            if not comma or not header[5:].endswith(";base64"):
                raise InvalidInput(
                    f"{where}: a data URI must be base64-encoded (data:image/png;base64,...)", field="input_data"
                )
            return self._b64(where, payload)
        if self._looks_like_path(item):
            return self._read_path(where, item)
        compact = "".join(item.split())  # linear, whatever the whitespace
        if len(compact) >= 16 and _BASE64.fullmatch(compact):
            return self._b64(where, compact)
        raise InvalidInput(
            f"{where}: this model takes an image: a path to an image file "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}), base64 of the image, or a data URI",
            field="input_data",
        )

    def _check_size(self, where: str, size: int) -> None:
        if size > self.max_image_bytes:
            raise InputOverLimit(f"{where}: the image is larger than {self.max_image_bytes} bytes", field="input_data")

    @staticmethod
    def _looks_like_path(item: str) -> bool:
        return len(item) <= MAX_PATH_CHARS and "\n" not in item and Path(item[-16:]).suffix.lower() in IMAGE_SUFFIXES

    def _b64(self, where: str, text: str) -> bytes:
        self._check_size(where, len(text) * 3 // 4)
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"{where}: not valid base64") from None

    def _read_path(self, where: str, item: str) -> bytes:
        if "\0" in item:
            raise InvalidInput(f"{where}: a path cannot contain a NUL character", field="input_data")
        try:
            path = resolve_project_path(item).resolve()
            if not path.is_relative_to(self.image_root):
                raise ForbiddenPath(f"{where}: image paths must lie under the image root (image_root)")
            if not path.is_file():
                raise InvalidInput(f"{where}: no image file at {_quote(item)}", field="input_data")
            self._check_size(where, path.stat().st_size)
            return path.read_bytes()
        except OSError as e:  # too long a name, a loop of links, no permission: the client's bad path
            raise InvalidInput(
                f"{where}: no readable image file at {_quote(item)} ({e.strerror})", field="input_data"
            ) from None

    def _check_image(self, where: str, data: bytes) -> int:
        """The header only (the pixels are decoded once, by the worker): an allowed format within the
        pixel limit. Returns its pixel count."""
        try:
            with open_image(data) as img:
                width, height = img.size
                if width * height > self.max_image_pixels:
                    raise ImageOverLimit(
                        f"{where}: {width}x{height} pixels is more than the limit of {self.max_image_pixels}"
                    )
                img.verify()  # the file's structure, where the format allows it (PNG chunks), no decoding
                return width * height
        except BadImage:
            raise
        except Image.DecompressionBombError:  # Pillow's own limit, above this app's: its header claims more
            raise ImageOverLimit(
                f"{where}: the image is more than the limit of {self.max_image_pixels} pixels"
            ) from None
        except Exception as e:  # whatever the decoder raises on bad bytes is the client's bad image
            raise BadImage(
                f"{where}: not a readable image of an allowed format ({', '.join(IMAGE_FORMATS)}): "
                f"{type(e).__name__}: {e}"
            ) from None

    # -- URLs -----------------------------------------------------------------------------------------

    async def _fetch(self, where: str, url: str) -> bytes:
        cfg = self.url_fetch
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
        try:
            # The timeout bounds the whole fetch, not each read.
            return await asyncio.wait_for(self._download(where, url), timeout=cfg.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise BadImage(f"{where}: fetching the URL took longer than {cfg.timeout_s:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise BadImage(f"{where}: fetching the URL failed: {type(e).__name__}") from None

    async def _download(self, where: str, url: str) -> bytes:
        async with (
            httpx.AsyncClient(timeout=self.url_fetch.timeout_s, follow_redirects=False) as client,
            client.stream("GET", url) as r,
        ):
            if r.status_code != 200:
                raise BadImage(f"{where}: fetching the URL gave HTTP {r.status_code}")
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                self._check_size(where, size)
                chunks.append(chunk)
        return b"".join(chunks)
