"""Validation and conversion of single images: every bad-input kind and every non-RGB kind."""

import io

import imagefiles as f
import numpy as np
import pytest
from PIL import Image, ImageOps

from sysu30k.ingest.config import ImageOptions
from sysu30k.ingest.imageproc import Rejected, prepare, target_size

FULL = ImageOptions()
HEADER = ImageOptions(verify="header")


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("opts", [FULL, HEADER], ids=["full", "header"])
def test_rgb_jpeg_passes_through_byte_identical(opts):
    data = f.rgb_jpeg()
    out = prepare(data, opts)
    assert out.data == data and (out.width, out.height) == (48, 96)


@pytest.mark.parametrize("opts", [FULL, HEADER], ids=["full", "header"])
@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not-an-image"),
    (f.truncated_jpeg(), "truncated"),
    (f.bomb_jpeg(), "decompression-bomb"),
], ids=["zero-byte", "non-image", "truncated", "bomb"])
def test_bad_inputs_are_rejected_with_reason(data, reason, opts):
    with pytest.raises(Rejected) as info:
        prepare(data, opts)
    assert info.value.reason == reason
    assert info.value.detail


def test_pixel_limit_is_configurable():
    with pytest.raises(Rejected, match="decompression-bomb"):
        prepare(f.rgb_jpeg(48, 96), ImageOptions(max_pixels=48 * 96 - 1))
    assert prepare(f.rgb_jpeg(48, 96), ImageOptions(max_pixels=48 * 96)).width == 48


@pytest.mark.parametrize("opts", [FULL, HEADER], ids=["full", "header"])
@pytest.mark.parametrize("make", [f.cmyk_jpeg, f.grey_jpeg, f.png_bytes], ids=["cmyk", "grey", "png-as-jpg"])
def test_non_rgb_inputs_become_rgb_jpeg(make, opts):
    out = prepare(make(), opts)
    im = decode(out.data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 96) == (out.width, out.height)
    reference = np.asarray(f.pattern().convert("RGB"), dtype=float)
    if make is f.grey_jpeg:
        reference = np.asarray(f.pattern().convert("L").convert("RGB"), dtype=float)
    assert np.abs(np.asarray(im, dtype=float) - reference).mean() < 12


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied(orientation):
    data = f.exif_rotated_jpeg(orientation)
    out = prepare(data, FULL)
    im = decode(out.data)
    expected = ImageOps.exif_transpose(decode(data))
    assert im.size == expected.size == (out.width, out.height)
    assert im.getexif().get(0x0112) is None
    assert np.abs(np.asarray(im, float) - np.asarray(expected, float)).mean() < 6


def test_resize_scales_long_side_and_never_upscales():
    big = f.rgb_jpeg(144, 288)
    out = prepare(big, ImageOptions(resize=144))
    assert (out.width, out.height) == (72, 144) == decode(out.data).size
    small = f.rgb_jpeg(40, 80)
    assert prepare(small, ImageOptions(resize=144)).data == small
    odd = prepare(f.rgb_jpeg(100, 290), ImageOptions(resize=144))
    assert (odd.width, odd.height) == target_size(100, 290, 144) == (50, 144)


def test_resize_content_matches_a_plain_resize():
    big = f.rgb_jpeg(144, 288)
    out = decode(prepare(big, ImageOptions(resize=144, quality=95)).data)
    plain = decode(big).resize((72, 144), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(out, float) - np.asarray(plain, float)).mean() < 6


def test_resize_of_rotated_image_uses_displayed_height():
    out = prepare(f.exif_rotated_jpeg(6), ImageOptions(resize=48))
    assert (out.width, out.height) == (24, 48)


def test_header_mode_skips_decoding_but_full_mode_decodes():
    data = bytearray(f.rgb_jpeg(seed=5))
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 21] = b"\xff" * 16           # a Huffman table that cannot be valid
    data = bytes(data)
    with pytest.raises(Rejected) as info:
        prepare(data, FULL)
    assert info.value.reason == "corrupt"
    assert prepare(data, HEADER).data == data


def test_marker_scan_takes_only_plain_rgb_jpegs():
    from sysu30k.ingest.imageproc import plain_jpeg_size

    assert plain_jpeg_size(f.rgb_jpeg(48, 96)) == (48, 96)
    progressive = f.encode(f.pattern(40, 80), quality=90, progressive=True)
    assert plain_jpeg_size(progressive) == (40, 80)
    assert prepare(progressive, FULL).data == progressive
    for other in (f.cmyk_jpeg(), f.grey_jpeg(), f.png_bytes(), f.exif_rotated_jpeg(1), b"", b"\xff\xd8",
                  f.rgb_jpeg()[:30]):
        assert plain_jpeg_size(other) is None


def _without_segment(data: bytes, marker: bytes) -> bytes:
    """``data`` with its first ``marker`` segment cut out."""
    at = data.index(marker)
    return data[:at] + data[at + 2 + int.from_bytes(data[at + 2:at + 4], "big"):]


def test_rgb_coded_jpegs_resize_to_the_right_picture():
    """JPEGs whose 3 components are R, G, B (an Adobe marker saying so, or only the component ids) take
    the plain fast path like YCbCr ones and still resize to the source's picture."""
    from sysu30k.ingest.imageproc import plain_jpeg_size

    src = f.pattern(100, 288, seed=3)
    adobe = f.encode(src, quality=95, keep_rgb=True)
    ids_only = _without_segment(adobe, b"\xff\xee")
    assert b"Adobe" not in ids_only
    for data in (adobe, ids_only, f.encode(src, quality=95)):
        assert target_size(*plain_jpeg_size(data), 144) == (50, 144)
        out = prepare(data, ImageOptions(resize=144))
        assert (out.width, out.height) == (50, 144)
        got = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), dtype=float)
        want = np.asarray(src.resize((50, 144), Image.Resampling.BOX), dtype=float)
        assert np.abs(got - want).mean() < 3


def test_exif_orientation_1_is_still_packed_unchanged():
    data = f.exif_rotated_jpeg(1)
    assert prepare(data, FULL).data == data


@pytest.mark.parametrize("data", [
    f.rgb_jpeg(144, 288),                                               # draft 1/2, no resize left
    f.encode(f.pattern(100, 290, seed=2), quality=90, progressive=True),  # draft 1/2, then bicubic
    f.encode(f.pattern(700, 1500, seed=4), quality=80, subsampling=0),    # draft 1/8, 4:4:4
], ids=["baseline-2x", "progressive-odd", "444-8x"])
def test_plain_jpegs_resize_to_the_same_bytes_as_through_image_open(data):
    """The plain-JPEG fast path (no header parse in Python) decodes exactly as Image.open + draft + load."""
    from sysu30k.ingest.imageproc import _convert, _open, plain_jpeg_size

    opts = ImageOptions(resize=144)
    target = target_size(*plain_jpeg_size(data), 144)
    assert prepare(data, opts) == _convert(_open(data, opts.max_pixels), 1, target, opts)
