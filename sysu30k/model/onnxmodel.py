"""The ONNX file ``sysu30k export`` writes: its metadata, declared here once for the writer and the reader,
and running it with onnxruntime on the CPU, as ``sysu30k embed`` does with a ``.onnx`` model.

The graph's input ``images`` is float32 [batch, 3, H, W], RGB, normalised with the metadata's mean and std
(ImageNet's); its output ``features`` is [batch, D]. The metadata (``metadata_props``, keys ``sysu30k.*``)
names the source checkpoint's format, the feature, H and W, the mean and std, and whether the flip sum and
the L2 normalisation are in the graph. onnxruntime is imported when a model is loaded, not before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

INPUT, OUTPUT = "images", "features"
PREFIX = "sysu30k."
KEYS = ("format", "feature", "height", "width", "mean", "std", "flip", "normalize")


def metadata(fmt: str, feature: str, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
             flip: bool, normalize: bool, **extra: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (``extra``: informative keys, e.g. the source file)."""
    values = {"format": fmt, "feature": feature, "height": size[0], "width": size[1],
              "mean": ",".join(map(repr, mean)), "std": ",".join(map(repr, std)),
              "flip": str(flip).lower(), "normalize": str(normalize).lower(), **extra}
    return {PREFIX + k: str(v) for k, v in values.items()}


@dataclass
class OnnxModel:
    """An exported model ready to run: what its metadata says, and its onnxruntime session."""

    path: str
    format: str                        # the source checkpoint's format (a key of FORMATS)
    feature: str                       # the feature the graph outputs (never auto)
    size: tuple[int, int]              # (height, width) of the graph's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool                         # the graph adds the horizontally flipped image's feature
    normalize: bool                    # the graph L2-normalises the feature
    session: Any

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 features [N, D] of uint8 images [N, 3, H, W], normalised here as the loader normalises
        them (``x / 255`` less the mean, over the std, per channel)."""
        scale = np.array([1 / (255 * s) for s in self.std], np.float32).reshape(3, 1, 1)
        bias = np.array([-m / s for m, s in zip(self.mean, self.std)], np.float32).reshape(3, 1, 1)
        x = np.ascontiguousarray(images, dtype=np.float32) * scale + bias
        return self.session.run([OUTPUT], {INPUT: x})[0]


def load_onnx(path: str | Path) -> OnnxModel:
    """The model ``sysu30k export`` wrote at ``path``, on onnxruntime's CPUExecutionProvider; a file that is
    not an ONNX model, or one without sysu30k's metadata, is a one-line UserError."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise UserError(f"no ONNX model at {path}")
    so = ort.SessionOptions()
    so.log_severity_level = 3                  # errors only: its warnings are about graph rewrites
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:                   # onnxruntime raises its own exception types for a bad file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path} is not an ONNX model onnxruntime can run: {reason}") from None
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in KEYS if PREFIX + k not in props]
    if missing:
        raise UserError(f"{path} is an ONNX model without sysu30k export's metadata (no {PREFIX}{missing[0]}): "
                        "embed needs its feature, input size and normalisation")
    meta = {k: props[PREFIX + k] for k in KEYS}
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    try:
        if inputs != [INPUT] or OUTPUT not in outputs:
            raise ValueError(f"inputs {inputs} and outputs {outputs}, not {INPUT} and {OUTPUT}")
        mean, std = (tuple(float(v) for v in meta[k].split(",")) for k in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need three channels")
        size = (int(meta["height"]), int(meta["width"]))
    except ValueError as exc:
        raise UserError(f"{path}: damaged sysu30k export metadata ({exc})") from None
    return OnnxModel(str(path), meta["format"], meta["feature"], size, mean, std, meta["flip"] == "true",
                     meta["normalize"] == "true", session)
