"""The ReID network: a torchvision ResNet backbone, global pooling, a BN neck, an embedding, a classifier.

In training mode ``forward`` returns everything the losses need: the pooled feature (for the weak
triplet), the classifier logits (unary and pairwise terms) and the appearance descriptor, the global
average of the first residual stage (the pairwise term's a_i, SYSU30K.md §4.4). In eval mode it returns
the BN-neck embedding, the feature the evaluator compares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .compat import import_torchvision
from .errors import UserError

ARCHS = ("resnet50", "resnet18")


@dataclass(frozen=True)
class ModelConfig:
    """What to build; stored in every checkpoint so it can be rebuilt without the command line."""

    arch: str = "resnet50"
    num_classes: int = 28_310
    embedding: int = 2048
    pretrained: str | None = None          # a local torchvision state_dict file (ImageNet weights)

    def to_dict(self) -> dict:
        return asdict(self)


class ReIDNet(nn.Module):
    """Backbone → GAP → (projection to ``embedding``) → BN neck → classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise UserError(f"--arch must be one of {', '.join(ARCHS)}")
        tv = import_torchvision()
        backbone = getattr(tv.models, cfg.arch)(weights=None)
        if cfg.pretrained:
            try:
                state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError) as exc:
                raise UserError(f"cannot load ImageNet weights from {cfg.pretrained}: {exc}") from None
            missing, unexpected = backbone.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("fc.")] or unexpected:
                raise UserError(f"{cfg.pretrained} is not a torchvision {cfg.arch} state_dict")
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (backbone.layer1, backbone.layer2, backbone.layer3,
                                                              backbone.layer4)
        width = backbone.fc.in_features
        self.project = nn.Linear(width, cfg.embedding, bias=False) if cfg.embedding != width else nn.Identity()
        self.neck = nn.BatchNorm1d(cfg.embedding)
        self.neck.bias.requires_grad_(False)           # the BNNeck of common ReID baselines
        self.classifier = nn.Linear(cfg.embedding, cfg.num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        early = self.layer1(self.stem(x))
        pooled = self.project(torch.flatten(nn.functional.adaptive_avg_pool2d(
            self.layer4(self.layer3(self.layer2(early))), 1), 1))
        emb = self.neck(pooled)
        if not self.training:
            return emb
        return {"feat": pooled, "logits": self.classifier(emb),
                "appearance": torch.flatten(nn.functional.adaptive_avg_pool2d(early, 1), 1)}


def build_model(config: dict | ModelConfig) -> ReIDNet:
    """The network described by ``config`` (a ModelConfig or its dict, as stored in checkpoints)."""
    return ReIDNet(config if isinstance(config, ModelConfig) else ModelConfig(**config))
