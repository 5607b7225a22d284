"""The DALI decoder: one graph, GPU (``mixed`` nvJPEG decoding) when CUDA is present, the CPU otherwise.

It receives the batch's JPEG bytes and the augmentation parameters drawn by the sampler through
``external_source``, and applies the same operations as the Pillow path in the same order: decode,
resize to H×W, pad-and-crop (a slice whose anchor may lie in the padding), horizontal flip, erasing with
the ImageNet mean. Output: uint8 [N,H,W,3] on the GPU, or on the CPU without one.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from . import decode_pil
from .transforms import MEAN_U8, AugParams, TransformSpec, place

_PLACEHOLDER = None


def _placeholder() -> np.ndarray:
    """A tiny valid JPEG fed in place of missing or damaged bytes (its slot is already invalid)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16)).save(buf, format="JPEG")
        _PLACEHOLDER = np.frombuffer(buf.getvalue(), np.uint8)
    return _PLACEHOLDER


class DaliDecoder:
    """Decodes and augments whole batches with DALI."""

    def __init__(self, spec: TransformSpec, max_batch: int, threads: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        self.spec = spec
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        interp = types.INTERP_LINEAR if spec.train else types.INTERP_CUBIC

        @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=self.device.index if self.gpu else None,
                      prefetch_queue_depth=1)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            anchor = fn.external_source(name="anchor", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            e_anchor = fn.external_source(name="erase_anchor", dtype=types.FLOAT)
            e_shape = fn.external_source(name="erase_shape", dtype=types.FLOAT)
            img = fn.decoders.image(jpegs, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            img = fn.resize(img, resize_x=spec.width, resize_y=spec.height, interp_type=interp, antialias=True)
            img = fn.slice(img, anchor, np.array([spec.height, spec.width], np.int32), axis_names="HW",
                           out_of_bounds_policy="pad", fill_values=0)
            img = fn.flip(img, horizontal=flip)
            return fn.erase(img, anchor=e_anchor, shape=e_shape, axis_names="HW", fill_value=list(MEAN_U8))

        self.pipe = graph()
        self.pipe.build()

    def decode(self, datas: list[bytes | None], params: AugParams, keys: list[str]) -> tuple[torch.Tensor, list[str]]:
        """[N,3,H,W] uint8 (channels-last memory) and the keys that failed to decode."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n, spec = len(datas), self.spec
        erase = params.erase[:n]
        self.pipe.feed_input("jpegs", [np.frombuffer(d, np.uint8) if d is not None else _placeholder()
                                       for d in datas])
        self.pipe.feed_input("anchor", [np.array([y - spec.pad, x - spec.pad], np.int32)
                                        for y, x in zip(params.crop_y[:n], params.crop_x[:n])])
        self.pipe.feed_input("flip", [np.array(int(f), np.int32) for f in params.flip[:n]])
        self.pipe.feed_input("erase_anchor", [e[:2].astype(np.float32) for e in erase])
        self.pipe.feed_input("erase_shape", [e[2:].astype(np.float32) for e in erase])
        try:
            (out,) = self.pipe.run()
        except RuntimeError:
            return self._fallback(datas, params, keys)
        images = torch.empty((n, spec.height, spec.width, 3), dtype=torch.uint8, device=self.device)
        feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream() if self.gpu else None)
        return images.permute(0, 3, 1, 2), []

    def _fallback(self, datas: list[bytes | None], params: AugParams, keys: list[str]):
        """A batch DALI refused (an undecodable member): decode it image by image, skipping failures."""
        images = np.zeros((len(datas), self.spec.height, self.spec.width, 3), np.uint8)
        failed = []
        for i, data in enumerate(datas):
            try:
                if data is not None:
                    place(images[i], decode_pil.decode(data, self.spec), i, params, self.spec)
            except Exception:  # skipped and reported, never fatal
                failed.append(keys[i])
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2), failed
