"""``sysu30k embed``: features of a user's own images with any checkpoint the evaluator reads.

Inputs are folders (every image below them), globs, single images, or tar shards (webdataset layout:
``KEY.jpg`` members, e.g. ``DST/shards/*.tar``). Images are decoded with Pillow, resized whole to the
checkpoint's size (bicubic, as the official evaluator), then embedded as ``sysu30k eval`` does (flip
sum, L2). Keys: a shard member's key; a file named like a SYSU-30k test image (``<id>_c<cam>_<k>.jpg``)
gets its stem, as ``sysu30k shard`` names it, and its pid and camera, so the file scores with
``eval --query-features/--gallery-features`` directly or joined with a split; any other file gets its
path below the input folder (``a/b.jpg`` → ``a_b``) and no labels. A ``.onnx`` file written by ``sysu30k
export`` is a model too: it runs on onnxruntime's CPU provider at its own input size and normalisation, and
gives the same file.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..ingest.keys import make_key
from ..ingest.layout import TEST_NAME
from ..loader.decode_pil import decode
from ..loader.loader import Batch
from ..loader.transforms import TransformSpec
from ..release.constants import DISTRACTOR_FOLDER, DISTRACTOR_PID
from .config import EvalOptions
from .features import FeatureWriter, iter_features

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_MAGIC = b"\xff\xd8\xff"


def _stem_key(path: str, rel: str) -> tuple[str, int, int]:
    """(key, pid, camid) of an image file: SYSU-30k test names keep their stem and labels; others their
    relative path, unlabelled (-1)."""
    name = os.path.basename(path)
    m = TEST_NAME.match(name)
    if m:
        pid = DISTRACTOR_PID if m["id"] == DISTRACTOR_FOLDER else int(m["id"])
        return make_key((os.path.splitext(name)[0],), path), pid, int(m["cam"])
    return make_key(tuple(os.path.splitext(rel)[0].split("/")), path), -1, -1


def sources(inputs: list[str]) -> Iterator[tuple[str, bytes, int, int]]:
    """(key, encoded image bytes, pid, camid) of every image the inputs name, in a stable order."""
    import webdataset as wds

    for spec in inputs:
        if spec.endswith(".tar") and os.path.isfile(spec):
            for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):   # raw bytes: never decoded
                data = next((sample[k] for k in ("jpg", "jpeg", "png") if k in sample), None)
                if data is None:
                    raise UserError(f"{spec}: member {sample['__key__']} has no jpg/png image")
                yield sample["__key__"], data, -1, -1
            continue
        if os.path.isdir(spec):
            root = spec
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            root = None
            files = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
            files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise UserError(f"{spec}: no image files there")
        for f in files:
            rel = os.path.relpath(f, root) if root else os.path.basename(f)
            key, pid, cam = _stem_key(f, rel.replace(os.sep, "/"))
            with open(f, "rb") as fh:
                yield key, fh.read(), pid, cam


def _batches(inputs: list[str], spec: TransformSpec, batch_size: int, flip: bool) -> Iterator[Batch]:
    """Decoded, resized uint8 batches of the inputs (an image that does not decode is a UserError)."""
    def emit(rows):
        images = torch.from_numpy(np.stack([r[1] for r in rows])).permute(0, 3, 1, 2)
        n = len(rows)
        return Batch(images=images, keys=[r[0] for r in rows], valid=torch.ones(n, dtype=torch.bool),
                     folder=torch.full((n,), -1), pid=torch.tensor([r[2] for r in rows]),
                     camid=torch.tensor([r[3] for r in rows]), flipped=images.flip(3) if flip else None)

    rows = []
    for key, data, pid, cam in sources(inputs):
        try:
            if data[:3] == JPEG_MAGIC:                 # the loaders' decoder, to the pixel
                arr = decode(data, spec)
            else:
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB").resize((spec.width, spec.height), Image.Resampling.BICUBIC))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"{key}: not a readable image ({exc})") from None
        rows.append((key, arr, pid, cam))
        if len(rows) == batch_size:
            yield emit(rows)
            rows = []
    if rows:
        yield emit(rows)


def embed_images(inputs: list[str], checkpoint: str, out: str, opts: EvalOptions = EvalOptions()) -> dict:
    """Write the features of ``inputs`` to the Parquet file ``out`` (the ``features`` table) with the
    extraction settings of ``opts`` (feature, batch, device, size, flip, normalize); returns
    ``{"images", "dim", "format", "feature", "labelled"}``."""
    from ..io.device import resolve_device
    from ..model.formats import load_network

    flip, normalize = opts.flip, opts.normalize
    onnx = str(checkpoint).lower().endswith(".onnx")
    if onnx:
        fmt, feature, spec, features = _onnx_features(inputs, checkpoint, opts)
    else:
        loaded = load_network(checkpoint, opts.feature)
        dev = resolve_device(opts.device)
        fmt, feature = loaded.format, loaded.feature
        spec = TransformSpec(height=opts.height or loaded.size[0], width=opts.width or loaded.size[1], train=False)
        features = iter_features(loaded.network.to(dev), _batches(inputs, spec, opts.batch, flip), dev, flip,
                                 normalize)
    seen: set[str] = set()
    labelled: bool | None = None
    dim = 0
    meta = {"checkpoint": str(checkpoint), "checkpoint_format": fmt, "feature": feature,
            "size": f"{spec.height}x{spec.width}", "flip": flip, "normalize": normalize}
    with FeatureWriter(out, metadata=meta) as writer:
        for feats, keys, pids, cams in features:
            dup = next((k for k in keys if k in seen), None) or (keys[0] if len(set(keys)) < len(keys) else None)
            if dup is not None:
                raise UserError(f"two images have the key {dup}: give inputs whose file names differ")
            seen.update(keys)
            known = pids != -1
            if (known.any() and not known.all()) or labelled not in (None, bool(known.all())):
                raise UserError("some images are named like SYSU-30k test images (<id>_c<cam>_<k>.jpg) and others "
                                "are not: embed them into separate files")
            labelled = bool(known.all())
            writer.write(keys, pids if labelled else None, cams if labelled else None, feats)
            dim = feats.shape[1]
        if not seen:
            raise UserError("no images in the inputs")
    return {"images": len(seen), "dim": dim, "format": fmt, "feature": feature, "labelled": bool(labelled),
            "onnx": onnx}


def _onnx_features(inputs: list[str], path: str, opts: EvalOptions) -> tuple[str, str, TransformSpec, Iterator]:
    """(source format, feature, transform, feature batches) of the ``.onnx`` model at ``path``: every option
    the model cannot honour is a UserError, none is dropped."""
    from ..model.onnxmodel import load_onnx

    model = load_onnx(path)
    exported = f"{path} was exported with"
    refusals = [
        (opts.feature not in ("auto", model.feature),
         f"--feature {opts.feature}: {exported} the {model.feature} feature"),
        (opts.height not in (None, model.size[0]), f"--height {opts.height}: {exported} height {model.size[0]}"),
        (opts.width not in (None, model.size[1]), f"--width {opts.width}: {exported} width {model.size[1]}"),
        (model.flip and not opts.flip, f"--no-flip: {exported} the flip sum in its graph"),
        (model.normalize and not opts.normalize, f"--no-normalize: {exported} the L2 normalisation in its graph"),
        (opts.device not in ("auto", "cpu"), f"--device {opts.device}: an .onnx model runs on onnxruntime's CPU "
                                             "provider (give --device cpu or none)")]
    refused = next((why for hit, why in refusals if hit), None)
    if refused:
        raise UserError(refused + ("" if refused.startswith("--device") else
                                   " (export the checkpoint again with it, or embed with the checkpoint)"))
    spec = TransformSpec(height=model.size[0], width=model.size[1], train=False)

    def run() -> Iterator[tuple[torch.Tensor, list[str], np.ndarray, np.ndarray]]:
        for batch in _batches(inputs, spec, opts.batch, flip=False):
            yield (torch.from_numpy(model.features(batch.images.numpy())), batch.keys, batch.pid.numpy(),
                   batch.camid.numpy())
    return model.format, model.feature, spec, run()
