"""The DALI path on the real CPU graph (``device_id=None``): it decodes ahead of its consumer, recovers from a
batch it cannot decode by rebuilding its pipeline (counted) instead of handing every later batch to Pillow,
resumes mid-epoch, serves the evaluation loader too; and the decoder choice follows the batches' device."""

import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pack_synth
from PIL import Image

from sysu30k.loader import BagSpec, EvalLoader, LoaderOptions, TrainLoader, TransformSpec
from sysu30k.loader.decode_dali import DaliDecoder
from sysu30k.loader.loader import resolve_decoder
from sysu30k.loader.transforms import draw_params

SPEC = BagSpec(bags=6, per_bag=5)
SMALL = TransformSpec(height=64, width=32, pad=4)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    return pack_synth(root / "raw", root / "dst", 24, workers=2, folders=24, images_per_folder=10, test_ids=6,
                      distractors=10, height=144, seed=11)


def jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (72, 144), (shade, 100, 255 - shade)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def raw_batches(count: int, n: int = 4, bad: int | None = None) -> list[dict]:
    """Raw batches as the workers send them: JPEG bytes, augmentation parameters, keys."""
    out = []
    rng = np.random.default_rng(0)
    for b in range(count):
        datas = [jpeg(10 * b + i) for i in range(n)]
        if b == bad:
            datas[1] = b"\xff\xd8\xff\xe0" + b"garbage" * 40
        out.append({"datas": datas, "params": draw_params(n, SMALL, rng), "keys": [f"b{b}i{i}" for i in range(n)]})
    return out


class Counting:
    """An iterator over raw batches that records how many the decoder pulled."""

    def __init__(self, raws):
        self.raws, self.pulled = list(raws), 0

    def __iter__(self):
        for r in self.raws:
            self.pulled += 1
            yield r


@pytest.mark.parametrize("depth", [2, 3])
def test_the_pipeline_decodes_ahead_of_its_consumer(depth):
    source = Counting(raw_batches(6))
    dec = DaliDecoder(SMALL, 4, "cpu", threads=2, depth=depth)
    stream = dec.stream(source)
    raw, images, failed = next(stream)
    assert raw is source.raws[0] and failed == [] and images.shape == (4, 3, 64, 32)
    assert source.pulled == depth + 1             # depth batches in flight, and the next one fed after the first
    rest = list(stream)
    assert [r for r, _, _ in rest] == source.raws[1:] and dec.decoded == 6 and dec.rebuilds == 0


def test_a_stream_shorter_than_the_prefetch_depth():
    dec = DaliDecoder(SMALL, 4, "cpu", threads=2, depth=3)
    got = list(dec.stream(raw_batches(1)))
    assert len(got) == 1 and got[0][1].shape == (4, 3, 64, 32) and dec.decoded == 1
    assert list(dec.stream([])) == []


def test_an_undecodable_batch_rebuilds_the_pipeline_and_later_batches_stay_on_dali():
    raws = raw_batches(6, bad=2)
    dec = DaliDecoder(SMALL, 4, "cpu", threads=2, depth=2)
    got = list(dec.stream(raws))
    assert [r for r, _, _ in got] == raws                                  # every batch, in order, once
    assert [f for _, _, f in got] == [[], [], ["b2i1"], [], [], []]
    assert dec.rebuilds == 1 and dec.decoded == 5                         # not Pillow for every later batch
    clean = list(DaliDecoder(SMALL, 4, "cpu", threads=2).stream(raw_batches(6)))
    for b in (3, 4, 5):                                                   # after the rebuild: DALI's own pixels
        assert torch.equal(got[b][1], clean[b][1])
    fallback = got[2][1]
    assert int(fallback[1].max()) == 0 and int(fallback[0].max()) > 0     # the bad image is black, the rest decoded


def test_an_abandoned_stream_does_not_leak_into_the_next():
    dec = DaliDecoder(SMALL, 4, "cpu", threads=2)
    first = dec.stream(raw_batches(5))
    next(first)
    first.close()
    again = list(dec.stream(raw_batches(3)))
    assert len(again) == 3 and all(f == [] for _, _, f in again)


def test_decoder_choice_follows_the_batches_device():
    assert resolve_decoder("auto", "cpu") == "pil"
    assert resolve_decoder("auto", torch.device("cuda", 0)) == "dali"     # DALI is installed here
    assert resolve_decoder("dali", "cpu") == "dali" and resolve_decoder("pil", "cuda") == "pil"
    assert LoaderOptions(device="cpu").target() == torch.device("cpu")


def test_train_loader_on_dali_resumes_mid_epoch(packed):
    opts = LoaderOptions(normalize=False, decoder="dali", workers=2, seed=3, device="cpu")
    full = [(b.keys, b.images.clone()) for b in TrainLoader(str(packed), SPEC, SMALL, opts)]
    first = TrainLoader(str(packed), SPEC, SMALL, opts)
    it = iter(first)
    head = [next(it).keys for _ in range(2)]
    state = first.state_dict()
    assert state["consumed"] == 2                                      # batches decoded ahead are not counted
    resumed = TrainLoader(str(packed), SPEC, SMALL, opts)
    resumed.load_state_dict(state)
    tail = [(b.keys, b.images.clone()) for b in resumed]
    assert head + [k for k, _ in tail] == [k for k, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tail, full[2:]))


def test_auto_on_a_cpu_target_uses_pillow_and_normalises_in_the_workers(packed):
    loader = TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(workers=0, device="cpu"))
    assert loader.decoder == "pil" and loader.normalize and not loader.pin_memory
    assert next(iter(loader)).images.dtype == torch.float32


def test_pillow_batches_for_a_gpu_come_in_pinned_memory(packed, monkeypatch):
    # No GPU here: the target is declared CUDA and pin_memory (which needs a CUDA runtime) records its inputs.
    pinned = []
    monkeypatch.setattr(LoaderOptions, "target", lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    loader = TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(workers=0, decoder="pil"))
    assert loader.decoder == "pil" and loader.pin_memory and not loader.normalize      # a GPU normalises
    batches = [b.images for b in loader]
    assert len(pinned) == len(batches) == len(loader) and all(b.dtype == torch.uint8 for b in batches)
    assert all(p.data_ptr() == b.data_ptr() for p, b in zip(pinned, batches))         # what was pinned is the batch


def test_eval_loader_honours_the_dali_decoder(packed, tmp_path):
    spec = TransformSpec(height=64, width=32, train=False)
    pil = list(EvalLoader(str(packed), "gallery", 8, spec, LoaderOptions(workers=0, decoder="pil")))
    dali_loader = EvalLoader(str(packed), "gallery", 8, spec, LoaderOptions(workers=2, decoder="dali", device="cpu"))
    dali = list(dali_loader)
    assert dali_loader.decoder == "dali" and dali_loader.dali.decoded == len(dali)
    assert [b.keys for b in pil] == [b.keys for b in dali]
    for p, d in zip(pil, dali):
        assert torch.equal(d.flipped, d.images.flip(3)) and torch.equal(p.pid, d.pid)
        diff = (p.images.int() - d.images.int()).abs()
        assert float(diff.float().mean()) < 2 and int(diff.max()) <= 40     # bicubic in two libraries
    # a damaged gallery member fails its sha256 before DALI sees it: reported and invalid, no rebuild
    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    table = pq.read_table(dst / "manifests/images.parquet", filters=[("subset", "=", "gallery")])
    row = table.slice(3, 1).to_pylist()[0]
    with open(dst / "shards" / f"{row['shard']}.tar", "r+b") as f:
        f.seek(row["offset"] + row["size"] // 2)
        f.write(b"\x00\x11\x22\x33")
    loader = EvalLoader(str(dst), "gallery", 8, spec, LoaderOptions(workers=0, decoder="dali", device="cpu"))
    batches = list(loader)
    bad = [k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if not v]
    assert bad == [row["key"]] and loader.dali.rebuilds == 0 and loader.dali.decoded == len(batches)
