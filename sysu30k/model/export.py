"""``sysu30k export``: a checkpoint's network as an ONNX model that computes what ``embed`` computes.

The graph takes ImageNet-normalised RGB float32 images [batch, 3, H, W] (dynamic batch, fixed H × W) and
returns, like :func:`sysu30k.evaluation.features.iter_features`, the L2-normalised sum of the chosen
feature of each image and of its horizontal flip. It is made by torch's ``torch.export``-based exporter
(``dynamo=True``, translated by onnxscript; the TorchScript exporter is deprecated in this torch) at opset
18 by default, with the metadata of :mod:`sysu30k.model.onnxmodel`, and written atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..loader.transforms import MEAN, STD, normalize_
from .config import ExportOptions
from .formats import load_network
from .onnxmodel import INPUT, OUTPUT, load_onnx, metadata

log = logging.getLogger("sysu30k")
TOLERANCE = 1e-4          # the largest deviation from PyTorch an exported feature may show without a warning


class EmbedGraph(nn.Module):
    """``L2(f(x) + f(flip(x)))`` of a feature network ``f``, with the image and its flip in one batch."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        both = self.network(torch.cat([images, images.flip(3)])).flatten(1)
        return nn.functional.normalize(both[:n] + both[n:], dim=1)


def export_onnx(checkpoint: str | Path, out: str | Path, opts: ExportOptions = ExportOptions()) -> dict:
    """Write the network of ``checkpoint`` (any format :func:`load_network` reads) with ``opts.feature`` to
    the ONNX file ``out``; returns what was written (``max_deviation``: onnxruntime against PyTorch on two
    random images, when ``opts.verify``)."""
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: the file name must end in .onnx (embed tells an ONNX model by it)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder")
    if out.exists() and not opts.overwrite:
        raise UserError(f"{out} exists: give --overwrite to replace it")
    loaded = load_network(checkpoint, opts.feature)
    size = (opts.height or loaded.size[0], opts.width or loaded.size[1])
    graph = EmbedGraph(loaded.network).eval()
    start = time.perf_counter()
    with warnings.catch_warnings():              # torch.export's deprecation notes about its own internals
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (torch.zeros(2, 3, *size),), input_names=[INPUT], output_names=[OUTPUT],
                                    opset_version=opts.opset, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    opset = program.model.opset_imports.get("")
    if opset != opts.opset:
        raise UserError(f"--opset {opts.opset}: the exporter wrote opset {opset}")
    program.model.metadata_props.update(metadata(loaded.format, loaded.feature, size, MEAN, STD, flip=True,
                                                 normalize=True, source=Path(checkpoint).name,
                                                 exporter=f"torch {torch.__version__} (dynamo)"))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        deviation = _deviation(graph, tmp, size) if opts.verify else None
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if deviation is not None and deviation > TOLERANCE:
        log.warning("%s: onnxruntime's features deviate from PyTorch's by up to %.2g", out, deviation)
    return {"out": str(out), "format": loaded.format, "feature": loaded.feature,
            "dim": int(program.model.graph.outputs[0].shape[1]), "input": INPUT, "output": OUTPUT,
            "height": size[0], "width": size[1], "opset": opset, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - start, 2), "max_deviation": deviation}


def _deviation(graph: EmbedGraph, path: str, size: tuple[int, int], batch: int = 2) -> float:
    """Largest absolute difference between the file's features (onnxruntime, through :func:`load_onnx`) and
    PyTorch's as the evaluator makes them (``f(x) + f(flip(x))``, then L2), on random uint8 images."""
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = normalize_(torch.empty(images.shape), images)
    with torch.inference_mode():
        ref = nn.functional.normalize(graph.network(x).float() + graph.network(x.flip(3)).float(), dim=1)
    got = load_onnx(path).features(images.numpy())
    return float((torch.from_numpy(got) - ref).abs().max())
