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


def _scan_start(data: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the SOS segment)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def stray_marker(data: bytes) -> bytes:
    """A restart marker dropped into the middle of the entropy-coded data: Pillow decodes on, silently."""
    mid = (_scan_start(data) + len(data)) // 2
    return data[:mid] + b"\xff\xd0" + data[mid + 2:]


def cut_out(data: bytes) -> bytes:
    """A chunk of entropy-coded data missing, the end marker kept."""
    start = _scan_start(data)
    return data[:start + 40] + data[start + 240:]


@pytest.mark.parametrize("make", [lambda: f.rgb_jpeg(96, 192, seed=3), f.grey_jpeg, f.cmyk_jpeg,
                                  lambda: f.exif_rotated_jpeg(1), lambda: f.exif_rotated_jpeg(6)],
                         ids=["plain", "grey", "cmyk", "exif-upright", "exif-rotated"])
@pytest.mark.parametrize("damage", [stray_marker, cut_out], ids=["stray-marker", "cut-out"])
def test_full_verification_rejects_what_libjpeg_warns_about(make, damage):
    """`--verify full` means decoded without a libjpeg warning; Pillow alone decodes these into grey."""
    bad = damage(make())
    decode(bad)                                                    # Pillow: no error
    with pytest.raises(Rejected) as exc:
        prepare(bad, FULL)
    assert exc.value.reason in ("corrupt", "truncated") and "JPEG" in exc.value.detail
    with pytest.raises(Rejected):
        prepare(bad, ImageOptions(resize=40))                      # resized, full verification too
    assert prepare(make(), FULL).data                              # undamaged: packed


def test_header_verification_stays_the_faster_weaker_check():
    bad = stray_marker(f.rgb_jpeg(96, 192, seed=3))
    assert prepare(bad, HEADER).data == bad                        # documented: damage inside the data passes


def test_a_header_claiming_far_more_pixels_than_its_bytes_is_corrupt():
    data = bytearray(f.rgb_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (8000).to_bytes(2, "big") + (8000).to_bytes(2, "big")    # 64 M pixels in ~2 KB
    with pytest.raises(Rejected, match="claims 8000x8000 pixels, far more than"):
        prepare(bytes(data), FULL)


def test_resized_pixels_are_pillows_draft_decode():
    """The resize path decodes through simplejpeg now; its pixels are Pillow's draft decode, so the packed
    bytes are what Image.open + draft + resize + save gives."""
    data = f.rgb_jpeg(144, 288, seed=5)
    out = prepare(data, ImageOptions(resize=100))
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", target_size(144, 288, 100))
    want = io.BytesIO()
    im.convert("RGB").resize(target_size(144, 288, 100), Image.Resampling.BICUBIC).save(want, "JPEG", quality=95)
    assert out.data == want.getvalue()
