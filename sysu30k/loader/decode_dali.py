"""The DALI decoder: one graph, GPU (``mixed`` nvJPEG decoding) when the batches are for a GPU, the same
graph on the CPU (``device_id=None``) otherwise, running ``depth`` batches ahead of its consumer.

It receives each batch's JPEG bytes and the augmentation parameters drawn by the sampler through
``external_source``, and applies the same operations as the Pillow path in the same order: decode
(``mixed`` with the CPU decoder's chroma upsampling, ``jpeg_fancy_upsampling``), resize to H×W,
pad-and-crop (a slice whose anchor may lie in the padding), horizontal flip, erasing with the ImageNet
mean. Output: uint8 [N,3,H,W] (channels-last memory) on the batches' device.

Pipelining: :meth:`DaliDecoder.stream` feeds ``depth`` batches, schedules them, and after handing out each
result feeds and schedules the next, so DALI's threads (and the GPU) decode while the consumer trains.
A batch DALI cannot decode leaves the pipeline object unusable (DALI issue #2380): the pipeline is then
rebuilt (counted in :attr:`DaliDecoder.rebuilds`), that batch is decoded image by image with Pillow
(failures reported) and the batches that were in flight are fed to the new pipeline.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from . import decode_pil
from .transforms import MEAN_U8, TransformSpec, place

log = logging.getLogger("sysu30k")

DEPTH = 2              # batches decoded ahead of the consumer
THREADS = 4            # DALI CPU threads (the ``mixed`` decoder's host stage, resize, slicing on the CPU graph)
_PLACEHOLDER = None


def _placeholder() -> np.ndarray:
    """A tiny valid JPEG fed in place of missing bytes (its slot is already invalid)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16)).save(buf, format="JPEG")
        _PLACEHOLDER = np.frombuffer(buf.getvalue(), np.uint8)
    return _PLACEHOLDER


class DaliDecoder:
    """Decodes and augments whole batches with DALI, ``depth`` batches ahead (module docstring)."""

    def __init__(self, spec: TransformSpec, max_batch: int, device: torch.device | str = "cpu",
                 threads: int = THREADS, depth: int = DEPTH):
        self.spec, self.max_batch, self.threads, self.depth = spec, max_batch, threads, max(1, depth)
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rebuilds = 0                  # pipelines rebuilt after a batch DALI could not decode
        self.decoded = 0                   # batches DALI decoded
        self.pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        spec = self.spec
        interp = types.INTERP_LINEAR if spec.train else types.INTERP_CUBIC

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=self.device.index if self.gpu else None, prefetch_queue_depth=self.depth)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            anchor = fn.external_source(name="anchor", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            e_anchor = fn.external_source(name="erase_anchor", dtype=types.FLOAT)
            e_shape = fn.external_source(name="erase_shape", dtype=types.FLOAT)
            img = fn.decoders.image(jpegs, device="mixed" if self.gpu else "cpu", output_type=types.RGB,
                                    jpeg_fancy_upsampling=True)
            img = fn.resize(img, resize_x=spec.width, resize_y=spec.height, interp_type=interp, antialias=True)
            img = fn.slice(img, anchor, np.array([spec.height, spec.width], np.int32), axis_names="HW",
                           out_of_bounds_policy="pad", fill_values=0)
            img = fn.flip(img, horizontal=flip)
            return fn.erase(img, anchor=e_anchor, shape=e_shape, axis_names="HW", fill_value=list(MEAN_U8))

        pipe = graph()
        pipe.build()
        return pipe

    def _feed(self, raw: dict) -> None:
        """One batch's inputs (``datas``, ``params``) into the pipeline's external sources."""
        datas, params, spec = raw["datas"], raw["params"], self.spec
        n = len(datas)
        erase = params.erase[:n]
        self.pipe.feed_input("jpegs", [np.frombuffer(d, np.uint8) if d is not None else _placeholder()
                                       for d in datas])
        self.pipe.feed_input("anchor", [np.array([y - spec.pad, x - spec.pad], np.int32)
                                        for y, x in zip(params.crop_y[:n], params.crop_x[:n])])
        self.pipe.feed_input("flip", [np.array(int(f), np.int32) for f in params.flip[:n]])
        self.pipe.feed_input("erase_anchor", [e[:2].astype(np.float32) for e in erase])
        self.pipe.feed_input("erase_shape", [e[2:].astype(np.float32) for e in erase])

    def _start(self, pending: deque, backlog: list[dict], source: Iterator[dict]) -> None:
        """A fresh pipeline fed with ``backlog`` then the source, ``depth`` batches (its first run prefetches
        that many; a shorter stream is padded with repeats whose results are dropped). None when nothing is left."""
        while len(pending) < self.depth:
            raw = backlog.pop(0) if backlog else next(source, None)
            if raw is None:
                break
            pending.append(raw)
        if not pending:
            return
        self.pipe = self._build()
        for raw in pending:
            self._feed(raw)
        real = pending[0]
        while len(pending) < self.depth:
            self._feed(real)
            pending.append(None)
        self.pipe.schedule_run()

    def stream(self, raws: Iterable[dict]) -> Iterator[tuple[dict, torch.Tensor, list[str]]]:
        """(raw batch, images [N,3,H,W] uint8 on the device, keys that failed to decode) for each raw batch
        (a dict with ``datas``, ``params`` and ``keys``), in order, decoding up to ``depth`` batches ahead."""
        source = iter(raws)
        pending: deque = deque()           # batches fed and not yet handed out, oldest first (None: padding)
        backlog: list[dict] = []           # batches to feed again after a rebuild
        self._start(pending, backlog, source)
        try:
            while pending:
                raw = pending.popleft()
                try:
                    (out,) = self.pipe.outputs()
                except RuntimeError as exc:            # an undecodable member: the pipeline object is dead
                    self.rebuilds += 1
                    log.warning("DALI could not decode a batch (%s): rebuilding the pipeline (%d so far), that "
                                "batch decoded with Pillow", str(exc).splitlines()[0][:120], self.rebuilds)
                    backlog = [r for r in pending if r is not None] + backlog
                    pending.clear()
                    if raw is not None:
                        yield (raw, *self._fallback(raw))
                    self._start(pending, backlog, source)
                    continue
                if raw is None:
                    continue
                images = self._copy(out, len(raw["datas"]))
                self.decoded += 1
                nxt = backlog.pop(0) if backlog else next(source, None)
                if nxt is not None:
                    self._feed(nxt)
                    pending.append(nxt)
                    self.pipe.schedule_run()
                yield raw, images, []
        finally:
            self.pipe = None                   # each stream builds its own (scheduled work dies with it)

    def _copy(self, out, n: int) -> torch.Tensor:
        """DALI's output as a torch tensor of our own (DALI reuses its buffers): on a GPU copied on a side
        stream that the current stream then waits for, so training never reads a half-written batch."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        spec = self.spec
        images = torch.empty((n, spec.height, spec.width, 3), dtype=torch.uint8, device=self.device)
        if self.gpu:
            side = torch.cuda.Stream(self.device)
            feed_ndarray(out.as_tensor(), images, cuda_stream=side)
            side.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            feed_ndarray(out.as_tensor(), images)
        return images.permute(0, 3, 1, 2)

    def _fallback(self, raw: dict) -> tuple[torch.Tensor, list[str]]:
        """A batch DALI refused: decoded image by image with Pillow, skipping (and returning) the failures."""
        datas, params, keys = raw["datas"], raw["params"], raw["keys"]
        images = np.zeros((len(datas), self.spec.height, self.spec.width, 3), np.uint8)
        failed = []
        for i, data in enumerate(datas):
            try:
                if data is not None:
                    place(images[i], decode_pil.decode(data, self.spec), i, params, self.spec)
            except Exception:  # skipped and reported, never fatal
                failed.append(keys[i])
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2), failed
