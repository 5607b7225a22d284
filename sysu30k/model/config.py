"""What a network is made of (:class:`ModelConfig`), declared once; stored in every checkpoint. Light to
import (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import click

from ..options import opt

ARCHS = ("resnet50", "resnet18")
HEADS = ("bnneck", "ssg")
FEATURES = ("auto", "logits", "pool", "neck")   # what a network hands the evaluator (sysu30k.model.formats)
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
