"""The Pillow worker's fast paths: reused batch buffers (a slot is reused only once nothing refers to its
batch), the one-copy augmentation (``place`` equals the plain pad → crop → flip → erase sequence), and
decoding at the manifest's size (the same pixels as parsing the header)."""

import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sysu30k.loader import decode_pil
from sysu30k.loader.slots import SlotPool
from sysu30k.loader.transforms import MEAN_U8, TransformSpec, draw_params, place


def test_a_slot_is_free_again_only_when_its_last_tensor_is_gone():
    pool = SlotPool(workers=2, per_worker=2, shape=(3, 4), dtype=torch.float32)
    assert [pool.acquire(1), pool.acquire(1), pool.acquire(1)] == [2, 3, None]   # worker 1's own slots
    assert pool.acquire(0) == 0
    batch = pool.hand_out(2)
    view = batch.permute(1, 0)[1:]                  # a derived view keeps the slot in use
    del batch
    gc.collect()
    assert pool.acquire(1) is None
    del view
    gc.collect()
    assert pool.acquire(1) == 2


def test_handed_out_batches_share_the_workers_memory():
    pool = SlotPool(workers=1, per_worker=1, shape=(2, 2), dtype=torch.uint8)
    slot = pool.acquire(0)
    pool.buffers[slot].fill_(7)
    assert torch.equal(pool.hand_out(slot), torch.full((2, 2), 7, dtype=torch.uint8))


def reference(img: np.ndarray, i: int, p, spec: TransformSpec) -> np.ndarray:
    """torchvision's order, literally: Pad(pad) with zeros, crop H×W at the drawn offset, flip, erase."""
    padded = np.pad(img, ((spec.pad, spec.pad), (spec.pad, spec.pad), (0, 0)))
    out = padded[p.crop_y[i]:p.crop_y[i] + spec.height, p.crop_x[i]:p.crop_x[i] + spec.width]
    if p.flip[i]:
        out = out[:, ::-1]
    out = out.copy()
    y, x, h, w = p.erase[i]
    out[y:y + h, x:x + w] = MEAN_U8
    return out


def test_place_equals_pad_crop_flip_erase():
    spec = TransformSpec(height=24, width=12, pad=4, erase_p=0.5)
    rng = np.random.default_rng(3)
    params = draw_params(200, spec, rng)
    assert params.flip.any() and (~params.flip).any() and (params.erase[:, 2] > 0).any()
    assert len({(y, x) for y, x in zip(params.crop_y, params.crop_x)}) > 40      # corners and edges included
    dst = np.full((24, 12, 3), 99, np.uint8)                                     # stale content must vanish
    for i in range(200):
        img = rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)
        place(dst, img, i, params, spec)
        np.testing.assert_array_equal(dst, reference(img, i, params, spec))


@pytest.mark.parametrize("target", [(144, 72), (256, 128), (64, 32)], ids=["native", "upscale", "draft"])
def test_decoding_at_the_manifest_size_equals_parsing_the_header(target):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (144, 72, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    spec = TransformSpec(height=target[0], width=target[1], train=True)
    parsed = decode_pil.decode(buf.getvalue(), spec)
    sized = decode_pil.decode(buf.getvalue(), spec, size=(72, 144))
    assert parsed.shape == sized.shape == (*target, 3)
    np.testing.assert_array_equal(parsed, sized)
