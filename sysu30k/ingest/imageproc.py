"""Validate one source image and turn it into the JPEG bytes that get packed.

A JPEG that is already upright RGB and needs no resizing is packed byte for byte; anything else
(CMYK, greyscale, palette, PNG bytes under a .jpg name, an EXIF rotation, a resize) is decoded once and
re-encoded as upright RGB JPEG. Bad input raises :class:`Rejected` with a short reason and the decoder's
words; the caller records it in the rejects manifest and carries on.
"""

from __future__ import annotations

import io
import struct
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ImageOptions

_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}            # EXIF orientations that rotate by 90 degrees
_JPEG_EOI = b"\xff\xd9"
_MAX_PIXELS_PER_BYTE = 8 * 32 * 64      # 1/32 bit per 8x8 block: Huffman coding needs at least 1 bit per block


class Rejected(Exception):
    """An input that cannot be packed: ``reason`` is a manifest reason code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Prepared(NamedTuple):
    """The bytes to pack and the size of the image they hold (a named tuple: one per packed image)."""

    data: bytes
    width: int
    height: int


def target_size(width: int, height: int, long_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the long side is ``long_side``; unchanged when it is already that small."""
    if long_side is None or max(width, height) <= long_side:
        return width, height
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}   # TEM and RSTn carry no length


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that decodes to upright RGB as it is (3 components, no EXIF),
    read from its markers alone; None for anything else, which then takes Pillow's full path."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:                       # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xE1 and data[pos + 4: pos + 8] == b"Exif":
            return None                          # may carry an orientation: let Pillow read it
        if marker in _SOF:
            if pos + 10 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (width, height) if data[pos + 9] == 3 and width and height else None
        if marker == 0xDA:                       # scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise Rejected("empty", "zero-byte file")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not-an-image", "no image format recognised") from None
    except Image.DecompressionBombError as exc:
        raise Rejected("decompression-bomb", str(exc)) from None
    except Exception as exc:  # a malformed header makes plugins raise anything from SyntaxError to struct.error
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Rejected("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise Rejected("decompression-bomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return im


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise Rejected("decompression-bomb", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise Rejected(reason, str(exc)) from None
    except Exception as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None


def _validate_scan(im: Image.Image, data: bytes) -> None:
    """Decode the whole image: a JPEG's entropy-coded stream at 1/8 scale (every coefficient is read and
    checked, only the full-resolution inverse DCT is skipped), strictly; other formats with Pillow."""
    if im.format == "JPEG":
        _strict_scan(data, im)
        return
    _load(im)


def _draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The DCT-domain reduction (8, 4, 2 or 1) Pillow's ``draft`` picks: the largest that stays >= target."""
    ratio = min(size[0] // target[0], size[1] // target[1])
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


def _decode_plain(data: bytes, size: tuple[int, int], scale: int, strict: bool = True) -> np.ndarray:
    """Decode a JPEG whose size and 3 components :func:`plain_jpeg_size` read, at 1/``scale`` in the DCT
    domain, to RGB (the pixels of Pillow's ``draft`` + ``load``, checked equal at every scale). ``strict``:
    any libjpeg warning (corrupt or missing entropy-coded data, which Pillow decodes silently into grey) is
    a reject; libjpeg-turbo through simplejpeg, which reports them (and scans 1/8 scale faster here)."""
    w, h = size
    try:
        return simplejpeg.decode_jpeg(data, min_height=-(-h // scale), min_width=-(-w // scale), strict=strict)
    except ValueError as exc:
        reason = "truncated" if "Premature end" in str(exc) else "corrupt"
        raise Rejected(reason, str(exc).splitlines()[0] if str(exc) else "undecodable") from None
    except Exception as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None


_COLORSPACE = {"L": "gray", "CMYK": "cmyk"}     # simplejpeg's output for a JPEG of this Pillow mode (else rgb)


def _strict_scan(data: bytes, im: Image.Image) -> None:
    """``--verify full`` of a JPEG Pillow opened: the whole entropy-coded stream decoded at 1/8 scale, every
    libjpeg warning a reject (Pillow would decode damaged data silently)."""
    w, h = im.size
    try:
        simplejpeg.decode_jpeg(data, colorspace=_COLORSPACE.get(im.mode, "rgb"), min_height=-(-h // 8),
                               min_width=-(-w // 8), strict=True)
    except ValueError as exc:
        reason = "truncated" if "Premature end" in str(exc) else "corrupt"
        raise Rejected(reason, str(exc).splitlines()[0] if str(exc) else "undecodable") from None


def _plausible(size: tuple[int, int], data: bytes) -> None:
    """A header that claims far more pixels than its bytes can code (under 1/32 bit per 8x8 block of a
    channel: even a uniform image needs more) is damaged; decoding it would allocate for nothing."""
    w, h = size
    if w * h > _MAX_PIXELS_PER_BYTE * max(1, len(data)):
        raise Rejected("corrupt", f"the header claims {w}x{h} pixels, far more than {len(data)} bytes can hold")


def _pass_through(data: bytes, im: Image.Image | None, size: tuple[int, int], opts: ImageOptions) -> Prepared:
    """Pack ``data`` unchanged once it is validated as ``opts.verify`` asks (``im`` is None for a plain
    JPEG, which is scanned without ``Image.open``)."""
    if opts.verify == "full":
        if im is None:
            _decode_plain(data, size, 8)
        else:
            _validate_scan(im, data)
    elif not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
        raise Rejected("truncated", "JPEG end-of-image marker missing")
    return Prepared(data, *size)


def prepare(data: bytes, opts: ImageOptions) -> Prepared:
    """Validate ``data`` and return what to pack; raise :class:`Rejected` for bad input."""
    size = plain_jpeg_size(data)
    if size is not None and size[0] * size[1] <= opts.max_pixels:
        _plausible(size, data)
        target = target_size(*size, opts.resize)
        if target == size:
            return _pass_through(data, None, size, opts)
        pixels = _decode_plain(data, size, _draft_scale(size, target), strict=opts.verify == "full")
        return _encode(Image.fromarray(pixels, "RGB"), target, opts)                          # only resized
    im = _open(data, opts.max_pixels)
    if im.format == "JPEG":
        _plausible(im.size, data)
    orientation = im.getexif().get(_ORIENTATION, 1) if im.format == "JPEG" else 1
    w, h = im.size
    shown = (h, w) if orientation in _SWAPS_AXES else (w, h)
    target = target_size(*shown, opts.resize)
    if im.format == "JPEG" and im.mode == "RGB" and orientation == 1 and target == shown:
        return _pass_through(data, im, (w, h), opts)
    if opts.verify == "full" and im.format == "JPEG":
        _strict_scan(data, im)
    return _convert(im, orientation, target, opts)


def _convert(im: Image.Image, orientation: int, target: tuple[int, int], opts: ImageOptions) -> Prepared:
    """Decode ``im`` and re-encode it as an upright RGB JPEG of size ``target``."""
    shown = im.size[::-1] if orientation in _SWAPS_AXES else im.size
    if target != shown and im.format == "JPEG":
        # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding; draft keeps the size >= the request
        im.draft("RGB", target if orientation not in _SWAPS_AXES else target[::-1])
    _load(im)
    try:
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        if im.mode != "RGB":
            im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "LA") else im.convert("RGB")
    except Exception as exc:  # conversion of an odd mode can fail in many ways: a reject, not a crash
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    return _encode(im, target, opts)


def _encode(im: Image.Image, target: tuple[int, int], opts: ImageOptions) -> Prepared:
    """Resize the decoded upright RGB ``im`` to ``target`` (bicubic) and encode it as JPEG."""
    try:
        if im.size != target:
            im = im.resize(target, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=opts.quality)
    except Exception as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    return Prepared(out.getvalue(), *im.size)
