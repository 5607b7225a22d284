"""What a network is made of (:class:`ModelConfig`), declared once and stored in every checkpoint, and how
``sysu30k export`` writes one as ONNX (:class:`ExportOptions`). Light to import (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import click

from ..options import check, opt

ARCHS = ("resnet50", "resnet18")
HEADS = ("bnneck", "ssg")
FEATURES = ("auto", "logits", "pool", "neck")   # what a network hands the evaluator (sysu30k.model.formats)
OPSETS = (18, 25)   # ONNX opsets torch's exporter writes natively (no version converter); onnxruntime 1.32 runs all
FORMATS = {                                      # checkpoint files sysu30k reads, by the name metrics.json gives
    "sysu30k": "a checkpoint of sysu30k train-weak or train-ssg",
    "official": "the official SYSU-30k layout (a state dict of ft_net: model.* ResNet-50 keys and "
                "classifier.classifier.0.*, with or without nn.DataParallel's module. prefix), e.g. net_6.pth",
    "torchvision": "a torchvision ResNet-50 state dict (e.g. the ImageNet weights, an untrained baseline)",
}


@dataclass(frozen=True)
class ModelConfig:
    """What to build; stored in every checkpoint so it can be rebuilt without the command line."""

    arch: str = opt("resnet50", "Backbone.", choices=ARCHS)
    num_classes: int = opt(28_310, cli=False)
    embedding: int = opt(2048, "Embedding size (train-weak: the BN-neck feature; train-ssg: the FC embedding).", min=1)
    pretrained: str | None = opt(None, "ImageNet weights: a torchvision state_dict file (random initialisation "
                                 "without it).", type=click.Path(exists=True, dir_okay=False), metavar="FILE")
    head: str = opt("bnneck", cli=False)   # bnneck (train-weak) or ssg (train-ssg: global + part features)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExportOptions:
    """How ``sysu30k export`` writes a checkpoint's network as ONNX (:func:`sysu30k.model.export.export_onnx`)."""

    feature: str = opt("auto", "The feature the graph outputs: logits, pool, neck or auto (as for eval and embed).",
                       choices=FEATURES)
    opset: int = opt(OPSETS[0], "ONNX opset of the graph.", min=OPSETS[0], max=OPSETS[1])
    height: int | None = opt(None, "Input height of the graph.", min=8, default_note="the checkpoint's eval height")
    width: int | None = opt(None, "Input width of the graph.", min=8, default_note="the checkpoint's eval width")
    overwrite: bool = opt(False, "Replace an existing --out file (atomically); without it an existing file is refused.")
    verify: bool = opt(True, "Run the written file with onnxruntime on two random inputs and report its largest "
                      "deviation from the PyTorch features.")

    def __post_init__(self) -> None:
        check(self)
