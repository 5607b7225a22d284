"""Builders for the odd inputs the packer must handle: each returns the bytes of one file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(w: int = 48, h: int = 96, seed: int = 0) -> Image.Image:
    """A smooth RGB pattern, with a bright top-left corner so orientation can be checked."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, rng.integers(0, 255))], -1).astype(np.uint8)
    arr[: h // 4, : w // 4] = 255
    return Image.fromarray(arr)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_jpeg(w: int = 48, h: int = 96, seed: int = 0) -> bytes:
    return encode(pattern(w, h, seed), quality=90)


def cmyk_jpeg() -> bytes:
    return encode(pattern().convert("CMYK"), quality=90)


def grey_jpeg() -> bytes:
    return encode(pattern().convert("L"), quality=90)


def png_bytes() -> bytes:
    return encode(pattern(), "PNG")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 96x48 (WxH) stored image whose EXIF says: rotate to show it upright (48x96 for 6/8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pattern().transpose(Image.Transpose.ROTATE_90), quality=90, exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    data = rgb_jpeg(seed=3)
    return data[: len(data) * 6 // 10]


def bomb_jpeg() -> bytes:
    """A valid small JPEG whose frame header claims 65535x65535 pixels."""
    data = bytearray(rgb_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = b"\xff\xff\xff\xff"   # height, width (big-endian u16 each)
    return bytes(data)
