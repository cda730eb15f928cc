"""Which images the app takes, and how they are opened: the same rules in the ingress (header checks)
and in the worker (the one decode)."""

from __future__ import annotations

import io
import re
import struct

from PIL import Image, PngImagePlugin

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


def rle_bytes_at_most(width: int, height: int) -> int:
    """The most bytes a BMP compressed with RLE may have for its pixels, encoded as badly as an encoder may: each
    pixel a run of its own (2 bytes), each row's end and a move (4 bytes a row), its headers, a palette of 256
    colours and the file's end (4,096). Pillow decodes RLE two bytes at a time, in Python, and a run cut to nothing
    at a row's end draws nothing: 2.6 million of them in 5 MB cost 2.1 s for an image of a million pixels."""
    return 2 * width * height + 4 * height + 4096


RAW_PROFILE_EXIF = "Raw profile type exif"
"""The text of a PNG where ImageMagick writes its EXIF (hex, after three lines), which Pillow's ``getexif`` reads
when the image has no other."""


MAX_SEGMENTS = 2_000
"""Most pieces of an image's structure that Pillow reads one at a time in Python, holding the GIL: a JPEG's
markers before its first scan, a PNG's chunks, a GIF's blocks and sub-blocks before its first picture. A
file of a million empty ones stays within every byte and pixel limit and costs seconds of the ingress's CPU
(an 8 x 8 JPEG after 1.3 million empty comments: 5.2 MB, 1.5 to 1.9 s). Encoders write tens of them before
the pixels: a PNG of 8 MiB in libpng's 8 KB chunks has about 1,000."""

MAX_JPEG_JUNK = 4_096
"""Most bytes between a JPEG's markers before its first scan that are not part of one (fill bytes, junk),
each of which Pillow skips by itself in Python."""

_NOT_FF = re.compile(rb"[^\xff]")

MAX_GIF_JUNK = MAX_JPEG_JUNK
"""Most bytes before a GIF's first picture that are neither a block nor a picture: Pillow skips each by itself in
Python (5 MB of them: 0.4 s)."""
_GIF_NEXT = re.compile(rb"[!,;]")

# What else Pillow reads item by item, in Python, in a JPEG's segments before its first scan: a frame header's
# components (3 bytes each), the quantization tables (65 or 129 bytes each), Photoshop's image resources (APP13,
# 12 bytes each at least), the entries of the EXIF data's first directory (12 bytes each). One segment holds 64 KB,
# and nothing else bounds how many of them a file has: 79 frame headers of 64 KB (5 MB) cost 0.47 s and 150 MB to
# open, 79 segments of quantization tables 0.27 s, of Photoshop resources 0.24 s, an EXIF directory of 65,535
# entries 0.19 s. Encoders write one frame header of at most 4 components, at most 4 tables, one Photoshop block
# (IPTC, a thumbnail) and tens of EXIF entries.
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE})
MAX_JPEG_FRAME_BYTES = 2 + 6 + 3 * 4
"""The largest JPEG frame header (its length field included): 4 components, the most Pillow reads (CMYK)."""
MAX_JPEG_TABLE_BYTES = 16 * (1 + 2 * 64)
"""The most bytes of quantization tables before a JPEG's first scan: 16 tables of 16-bit values."""
MAX_JPEG_PHOTOSHOP_BYTES = 128 * 1024
"""The most bytes of Photoshop blocks (APP13 ``Photoshop 3.0``) before a JPEG's first scan: two full segments."""
MAX_EXIF_ENTRIES = MAX_SEGMENTS
"""The most entries of the first directory of an image's EXIF data, which Pillow reads one by one (for a JPEG's
resolution, and for its orientation)."""
MAX_EXIF_BYTES = 64 * 1024
"""The most bytes of a JPEG's EXIF data: one APP1 segment's, as the EXIF standard has it. Pillow joins every EXIF
segment, and reads each value of the tags it looks at (a resolution of 600,000 numbers in 5 MB: 1.4 s)."""
_EXIF_READ = frozenset({0x0112, 0x011A, 0x011B, 0x0128})
"""The EXIF tags whose values Pillow (a JPEG's resolution, at open) and the worker (the orientation) read, each
value one by one: orientation, resolution across and down, the resolution's unit. Each has one value."""
_JPEG_NO_LENGTH = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
"""The markers Pillow reads no length after (``JpegImagePlugin.MARKER``: no handler); it reads the next bytes as
a marker. Those under ``0xC0`` it refuses (but the fill byte FF and the escaped FF 00)."""


MAX_PNG_COMPRESSED_CHUNKS = 16
"""Most chunks of a PNG that Pillow decompresses as it reads them (``zTXt``, ``iTXt``, ``iCCP``): each may
unpack to ``MAX_PNG_TEXT_BYTES``, a thousand times its size. Encoders write a few (one colour profile, some
text)."""

MAX_PNG_TEXT_BYTES = 1 << 20
"""Most bytes a PNG's text chunks may unpack to, all together, and one compressed chunk alone (Pillow's
``MAX_TEXT_MEMORY``, 64 MiB by default, and ``MAX_TEXT_CHUNK``): 64 chunks of 1 KB each unpacking to 1 MiB
cost 64 MiB and 0.2 s of CPU an image, in the ingress's header check and again in the worker's decode, and the
worker kept the text with the pixels."""

PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_BYTES
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES

_PNG_COMPRESSED = frozenset({b"zTXt", b"iTXt", b"iCCP"})


class TooManySegments(ValueError):
    """An image of more pieces than ``MAX_SEGMENTS`` (or junk than ``MAX_JPEG_JUNK``) where Pillow reads them
    one at a time: refused before Pillow reads it."""


def check_segments(data: bytes) -> None:
    """``TooManySegments`` if ``data`` is a JPEG, PNG or GIF of more pieces than Pillow should read one by one.
    The walk stops at the limit, so it costs at most ``MAX_SEGMENTS`` steps of Python whatever the size; a file
    it cannot follow (truncated, or not of these formats) is left to Pillow to refuse."""
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)


def _over(pieces: int, what: str) -> None:
    if pieces > MAX_SEGMENTS:
        raise TooManySegments(f"{what} number more than the limit of {MAX_SEGMENTS} (each is read on its own)")


def _check_jpeg(data: bytes) -> None:
    """Markers up to the first scan (FF DA), where the C decoder takes over; the bytes between them that are
    not part of one (junk, fill bytes, an escaped FF 00) are skipped here in C, and counted; the segments whose
    items Pillow reads one by one are bounded (``_JpegSegments``)."""
    pos, markers, junk, segments = 2, 0, 0, _JpegSegments()
    while pos + 1 < len(data):
        found = data.find(b"\xff", pos)  # junk up to the next FF
        code_at = _NOT_FF.search(data, found) if found != -1 else None  # past the fill bytes
        if code_at is None:
            return
        junk += code_at.start() - 1 - pos
        pos = code_at.start() - 1  # the marker's FF
        code = data[pos + 1]
        if code == 0x00:
            junk += 2
            pos += 2
        if junk > MAX_JPEG_JUNK:
            raise TooManySegments(
                f"a JPEG of more than {MAX_JPEG_JUNK} bytes outside its markers before its first scan"
            )
        if code == 0x00:
            continue
        markers += 1
        _over(markers, "a JPEG's markers before its first scan")
        if code == 0xDA:  # start of scan
            break
        if code < 0xC0:  # no marker: Pillow refuses the file
            return
        if code in _JPEG_NO_LENGTH:
            pos += 2
        elif pos + 4 <= len(data):
            length = struct.unpack_from(">H", data, pos + 2)[0]
            segments.add(code, data, pos + 4, length)
            pos += 2 + length
        else:
            break
    check_exif(segments.exif)


class _JpegSegments:
    """The segments of a JPEG, before its first scan, whose items Pillow reads one at a time in Python."""

    def __init__(self) -> None:
        self.tables = self.photoshop = 0
        self.exif = b""

    def add(self, code: int, data: bytes, start: int, length: int) -> None:
        """One segment: ``length`` (its length field, which counts itself) bytes of ``data`` less 2, at ``start``
        (Pillow reads a length under 2 as none)."""
        size = max(0, length - 2)
        if code in _JPEG_FRAMES and length > MAX_JPEG_FRAME_BYTES:
            raise TooManySegments(
                f"a JPEG frame header of {length} bytes: a frame of at most 4 components has {MAX_JPEG_FRAME_BYTES}"
            )
        if code == 0xDB:
            self.tables += size
            if self.tables > MAX_JPEG_TABLE_BYTES:
                raise TooManySegments(
                    f"a JPEG of more than {MAX_JPEG_TABLE_BYTES} bytes of quantization tables before its first scan"
                )
        elif code == 0xED and data.startswith(b"Photoshop 3.0\x00", start):
            self.photoshop += size
            if self.photoshop > MAX_JPEG_PHOTOSHOP_BYTES:
                raise TooManySegments(
                    f"a JPEG of more than {MAX_JPEG_PHOTOSHOP_BYTES} bytes of Photoshop blocks before its first scan"
                )
        elif code == 0xE1 and data.startswith(b"Exif\x00\x00", start):
            # Pillow joins them: the first whole, the others after their "Exif\0\0"
            self.exif += data[start + (6 if self.exif else 0) : start + size]
            if len(self.exif) > MAX_EXIF_BYTES:
                check_exif(self.exif)  # refuses it, saying so


def check_exif(exif: bytes) -> None:
    """``TooManySegments`` if an image's EXIF data (Pillow's ``info["exif"]``: a JPEG's joined APP1 segments, a PNG's
    ``eXIf`` chunk, a WebP's ``EXIF``) is over ``MAX_EXIF_BYTES`` or its first directory (a TIFF header, then the
    directory at its offset) over ``MAX_EXIF_ENTRIES``, read in two lookups. Pillow strips one or two
    "Exif\0\0" before the header."""
    if len(exif) > MAX_EXIF_BYTES:
        raise TooManySegments(f"EXIF data of more than {MAX_EXIF_BYTES} bytes (a JPEG segment's)")
    tiff = re.sub(rb"^(Exif\x00\x00){1,2}", b"", exif)
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return
    offset = struct.unpack_from(order + "I", tiff, 4)[0]
    if offset + 2 > len(tiff):
        return
    entries = struct.unpack_from(order + "H", tiff, offset)[0]
    if entries > MAX_EXIF_ENTRIES:
        raise TooManySegments(
            f"EXIF data of {entries} entries in its first directory, more than the limit of {MAX_EXIF_ENTRIES} "
            "(each is read on its own)"
        )
    table = tiff[offset + 2 : offset + 2 + 12 * entries]
    for tag, _, count, _ in struct.iter_unpack(order + "HHLL", table[: len(table) - len(table) % 12]):
        if tag in _EXIF_READ and count > 1:
            raise TooManySegments(f"EXIF tag 0x{tag:04X} of {count} values: it has one")


def _check_png(data: bytes) -> None:
    """Every chunk: Pillow reads those before the pixels one by one, and the pixels' chunks each on its own."""
    pos, chunks, compressed = 8, 0, 0
    while pos + 8 <= len(data):
        chunks += 1
        _over(chunks, "a PNG's chunks")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        if kind == b"eXIf":  # Pillow keeps it, and the worker reads its orientation
            check_exif(data[pos + 8 : pos + 8 + length])
        compressed += kind in _PNG_COMPRESSED
        if compressed > MAX_PNG_COMPRESSED_CHUNKS:
            raise TooManySegments(
                f"a PNG's compressed text and profile chunks number more than the limit of "
                f"{MAX_PNG_COMPRESSED_CHUNKS} (each is decompressed)"
            )
        pos += 12 + length


def _check_gif(data: bytes) -> None:
    """The blocks and their sub-blocks before the first picture, which Pillow parses when it opens the file."""
    if len(data) < 13:
        return
    flags = data[10]
    pos, pieces, junk = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0, 0
    while pos < len(data) and data[pos] != 0x2C:  # up to the first picture (",")
        if data[pos] != 0x21:  # not an extension: the trailer (";"), or bytes Pillow skips one by one
            found = _GIF_NEXT.search(data, pos)
            junk += (found.start() if found else len(data)) - pos
            if junk > MAX_GIF_JUNK:
                raise TooManySegments(
                    f"a GIF of more than {MAX_GIF_JUNK} bytes outside its blocks before its first picture"
                )
            if found is None or data[found.start()] == 0x3B:
                return
            pos = found.start()
            continue
        pos += 2  # an extension: its label, then sub-blocks up to an empty one
        while pos < len(data):
            pieces += 1
            _over(pieces, "a GIF's blocks before its first picture")
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def jpeg_scans(data: bytes) -> int:
    """How many scans a JPEG holds: its start-of-scan markers (FF DA), which its compressed data cannot hold
    (a FF there is followed by 00), counted in C. A thumbnail in its EXIF counts too: an upper bound."""
    return data.count(b"\xff\xda")


def open_image(data: bytes) -> Image.Image:
    """A lazily opened image (its header read, its pixels not decoded), of an allowed format only, and of no
    more pieces than Pillow should read one by one (``check_segments``)."""
    check_segments(data)
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def decoder_error(e: Exception) -> str:
    """A decoder's error as a client may read it: its type and message, without object addresses (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x...>"), and bounded (``errors.error_text``)."""
    return error_text(e)
