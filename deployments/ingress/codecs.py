"""Turn ``input_data`` into what a model runtime takes: strings for text, encoded image bytes for images.

Images arrive in one of four forms:

* a data URI: ``data:image/png;base64,....``
* bare base64 of the encoded file;
* a file path (the seed's form). A relative path is taken from the project
  root, and the file must lie under the configured image root (symlinks are
  resolved first), so no other file on the machine can be read;
* an http(s) URL, only when ``url_fetch.enabled`` is set, and then only with
  an allowed scheme and host, within a time and a size limit.

The ingress checks each image's header here (a readable image, its size within
the limits) without decoding its pixels, so that a bad image is refused before
it reaches a worker replica; the worker decodes it, once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from serve_app.core.config import UrlFetchArgs
from serve_app.core.errors import BadImage, ForbiddenPath, ImageOverLimit, InputOverLimit, InvalidInput
from serve_app.core.paths import resolve_project_path
from serve_app.core.registry import Modality

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class InputDecoder:
    def __init__(
        self,
        image_root: str | Path,
        max_image_bytes: int,
        max_image_pixels: int,
        max_items: int,
        url_fetch: UrlFetchArgs | None = None,
    ) -> None:
        self.image_root = resolve_project_path(image_root).resolve()
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_items = max_items
        self.url_fetch = url_fetch or UrlFetchArgs()

    async def decode(self, modality: Modality, input_data: str | list[str | bytes]) -> list[str] | list[bytes]:
        """Strings in any of the forms above; raw bytes (the v2 binary tensor form) are taken as they are."""
        items = [input_data] if isinstance(input_data, str) else list(input_data)
        if len(items) > self.max_items:
            raise InputOverLimit(
                f"input_data: a list of {len(items)} inputs is longer than the limit of {self.max_items}",
                field="input_data",
            )
        if modality is Modality.TEXT:
            return [self._text(i, item) for i, item in enumerate(items)]
        return [await self._image(i, item) for i, item in enumerate(items)]

    @staticmethod
    def _where(i: int) -> str:
        return f"input_data[{i}]"

    def _text(self, i: int, item: str | bytes) -> str:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{self._where(i)}: text must be UTF-8", field="input_data") from None
        if item.startswith("data:") and _DATA_URI.match(item[:256]):
            raise InvalidInput(
                f"{self._where(i)}: this model takes text, and was sent a data URI (an image or file)",
                field="input_data",
            )
        return item

    async def _image(self, i: int, item: str | bytes) -> bytes:
        where = self._where(i)
        if isinstance(item, bytes):
            self._check_size(where, len(item))
            await asyncio.to_thread(self._check_image, where, item)
            return item
        m = _DATA_URI.match(item) if item.startswith("data:") else None
        if _URL.match(item):
            data = await self._fetch(where, item)
        elif m:
            if not m.group("b64"):
                raise InvalidInput(
                    f"{where}: a data URI must be base64-encoded (data:image/png;base64,...)", field="input_data"
                )
            data = self._b64(where, m.group("data"))
        elif self._looks_like_path(item):
            data = await asyncio.to_thread(self._read_path, where, item)
        elif len(item) >= 16 and _BASE64.match(item):
            data = self._b64(where, item)
        else:
            raise InvalidInput(
                f"{where}: this model takes an image: a path to an image file "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), base64 of the image, or a data URI",
                field="input_data",
            )
        # Decoding an image is CPU work: keep it off the ingress event loop.
        await asyncio.to_thread(self._check_image, where, data)
        return data

    def _check_size(self, where: str, size: int) -> None:
        if size > self.max_image_bytes:
            raise InputOverLimit(f"{where}: the image is larger than {self.max_image_bytes} bytes", field="input_data")

    @staticmethod
    def _looks_like_path(item: str) -> bool:
        return len(item) < 4096 and "\n" not in item and Path(item).suffix.lower() in IMAGE_SUFFIXES

    def _b64(self, where: str, text: str) -> bytes:
        self._check_size(where, len(text) * 3 // 4)
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"{where}: not valid base64") from None

    def _read_path(self, where: str, item: str) -> bytes:
        if "\0" in item:
            raise InvalidInput(f"{where}: a path cannot contain a NUL character", field="input_data")
        path = resolve_project_path(item).resolve()
        if not path.is_relative_to(self.image_root):
            raise ForbiddenPath(f"{where}: image paths must lie under the image root {self.image_root}")
        if not path.is_file():
            raise InvalidInput(f"{where}: no image file at {item!r}", field="input_data")
        self._check_size(where, path.stat().st_size)
        return path.read_bytes()

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
            raise ForbiddenPath(f"{where}: host {parts.hostname!r} is not in url_fetch.allowed_hosts")
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

    def _check_image(self, where: str, data: bytes) -> None:
        """The header only: the pixels are decoded once, by the worker (a truncated image fails there)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > self.max_image_pixels:
                    raise ImageOverLimit(
                        f"{where}: {width}x{height} pixels is more than the limit of {self.max_image_pixels}"
                    )
                img.verify()  # the file's structure, where the format allows it (PNG chunks), no decoding
        except BadImage:
            raise
        except Image.DecompressionBombError as e:  # Pillow's own cap (twice its MAX_IMAGE_PIXELS) came first
            raise ImageOverLimit(f"{where}: more pixels than the limit of {self.max_image_pixels} ({e})") from None
        except Exception as e:  # whatever the decoder raises on bad bytes is the client's bad image
            raise BadImage(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
