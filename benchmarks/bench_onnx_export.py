#!/usr/bin/env python
"""``sysu30k export`` at full size: how far onnxruntime's features lie from PyTorch's, and what it costs.

Random-weight checkpoints of the three kinds users export (random BatchNorm statistics, so no layer is an
identity): the official SYSU-30k layout (ResNet-50, 28,310 classes: the ``logits`` feature), a train-weak
ResNet-50 (BN-neck, 2048-d ``neck``) and a train-ssg ResNet-50 (6144-d ``ssg``), at the official 256 × 128.
Each is exported with :func:`export_onnx` (opset 18) and run with onnxruntime (CPUExecutionProvider) on
``--images`` random uint8 images, in batches of 1 and of ``--batch``, against the evaluator's PyTorch
feature (``f(x) + f(flip(x))``, L2; :mod:`sysu30k.evaluation.features`) of the same images. Prints one JSON
line per checkpoint: max absolute deviation (beside the largest feature value, for scale), export seconds,
file size, and the seconds of the batched pass in each runtime (one pass each: indicative only on a shared
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from sysu30k.evaluation.features import iter_features
from sysu30k.io.compat import import_torchvision
from sysu30k.loader.loader import Batch
from sysu30k.model.config import ExportOptions, ModelConfig
from sysu30k.model.export import export_onnx
from sysu30k.model.formats import load_network
from sysu30k.model.network import build_model
from sysu30k.model.onnxmodel import load_onnx


def _random_bn(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _checkpoints(root: str) -> dict[str, str]:
    torch.manual_seed(0)
    tv = import_torchvision()
    official = torch.nn.Module()
    official.model = _random_bn(tv.models.resnet50(weights=None))
    official.classifier = torch.nn.Module()
    official.classifier.classifier = torch.nn.Sequential(torch.nn.Linear(2048, 28_310))
    paths = {"official": os.path.join(root, "net_6.pth")}
    torch.save(torch.nn.DataParallel(official).state_dict(), paths["official"])
    for head in ("bnneck", "ssg"):
        cfg = ModelConfig(arch="resnet50", num_classes=1000, embedding=2048, head=head)
        paths[head] = os.path.join(root, f"{head}.pt")
        torch.save({"config": {"model": cfg.to_dict(), "height": 256, "width": 128},
                    "model": _random_bn(build_model(cfg)).state_dict()}, paths[head])
    return paths


def _batches(images: torch.Tensor, size: int):
    for a in range(0, len(images), size):
        x = images[a:a + size]
        n = len(x)
        yield Batch(images=x, keys=[str(i) for i in range(a, a + n)], valid=torch.ones(n, dtype=torch.bool),
                    folder=torch.full((n,), -1), pid=torch.full((n,), -1), camid=torch.full((n,), -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=17)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name, ckpt in _checkpoints(root).items():
            out = os.path.join(root, f"{name}.onnx")
            got = export_onnx(ckpt, out, ExportOptions(verify=False))
            images = torch.randint(0, 256, (args.images, 3, 256, 128), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1))
            net = load_network(ckpt).network
            t = time.perf_counter()
            ref = torch.cat([f for f, *_ in iter_features(net, _batches(images, args.batch), "cpu")]).numpy()
            torch_s = time.perf_counter() - t
            model = load_onnx(out)
            t = time.perf_counter()
            batched = np.concatenate([model.features(b.images.numpy()) for b in _batches(images, args.batch)])
            onnx_s = time.perf_counter() - t
            single = np.concatenate([model.features(b.images.numpy()) for b in _batches(images, 1)])
            print(json.dumps({"checkpoint": name, "feature": got["feature"], "dim": got["dim"], "opset": got["opset"],
                              "images": args.images, "max_abs_dev_batched": float(np.abs(batched - ref).max()),
                              "max_abs_dev_batch1": float(np.abs(single - ref).max()),
                              "max_abs_feature": float(np.abs(ref).max()),
                              "export_s": got["seconds"], "mb": round(got["bytes"] / 1e6, 1),
                              f"torch_s_batch{args.batch}": round(torch_s, 2),
                              f"onnxruntime_s_batch{args.batch}": round(onnx_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
