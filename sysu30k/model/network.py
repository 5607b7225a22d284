"""The ReID network: a torchvision ResNet backbone, global pooling, and one of two heads.

``bnneck`` (train-weak): pooled feature → (projection) → BN neck → classifier. In training mode
``forward`` returns everything the losses need: the pooled feature (for the weak triplet), the
classifier logits (unary and pairwise terms) and the appearance descriptor, the global average of the
first residual stage (the pairwise term's a_i, SYSU30K.md §4.4). In eval mode it returns the BN-neck
embedding, the feature the evaluator compares.

``ssg`` (train-ssg, SSG.md §1 and §2.1): the last feature map is pooled whole (``feat``, f_g) and by
upper and lower half (``up``, ``low``); ``emb`` = ReLU(BN(FC(f_g))); the classifier (source stage only)
reads Dropout(0.1)(emb). In eval mode it returns cat(f_g, f_up, f_low), SSG's 6144-d test feature.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..io.compat import import_torchvision
from .config import ARCHS, HEADS, ModelConfig


class ReIDNet(nn.Module):
    """Backbone → GAP → (projection to ``embedding``) → BN neck → classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise UserError(f"--arch must be one of {', '.join(ARCHS)}")
        if cfg.head not in HEADS:
            raise UserError(f"model head must be one of {', '.join(HEADS)}")
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
        self.head = cfg.head
        if cfg.head == "ssg":
            self.embed = nn.Sequential(nn.Linear(width, cfg.embedding, bias=False), nn.BatchNorm1d(cfg.embedding),
                                       nn.ReLU(inplace=True))
            nn.init.normal_(self.embed[0].weight, std=0.001)
            self.dropout = nn.Dropout(0.1)
            self.classifier = nn.Linear(cfg.embedding, max(1, cfg.num_classes))
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
            return
        self.project = nn.Linear(width, cfg.embedding, bias=False) if cfg.embedding != width else nn.Identity()
        self.neck = nn.BatchNorm1d(cfg.embedding)
        self.neck.bias.requires_grad_(False)           # the BNNeck of common ReID baselines
        self.classifier = nn.Linear(cfg.embedding, cfg.num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.head == "ssg":
            return self._forward_ssg(x)
        early = self.layer1(self.stem(x))
        pooled = self.project(torch.flatten(nn.functional.adaptive_avg_pool2d(
            self.layer4(self.layer3(self.layer2(early))), 1), 1))
        emb = self.neck(pooled)
        if not self.training:
            return emb
        return {"feat": pooled, "logits": self.classifier(emb),
                "appearance": torch.flatten(nn.functional.adaptive_avg_pool2d(early, 1), 1)}

    def feature(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """One feature for the evaluator (eval mode): ``neck`` (bnneck head: the BN-neck embedding), ``ssg``
        (ssg head: its 6144-d test feature), ``pool`` (the pooled last stage, before any projection) or
        ``logits`` (the classifier's output)."""
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        pooled = fmap.mean((2, 3))
        if kind == "pool":
            return pooled
        if self.head == "ssg":
            if kind == "logits":
                return self.classifier(self.embed(pooled))
            half = fmap.shape[2] // 2
            return torch.cat([pooled, fmap[:, :, :half].mean((2, 3)), fmap[:, :, half:].mean((2, 3))], 1)
        emb = self.neck(self.project(pooled))
        return self.classifier(emb) if kind == "logits" else emb

    def _forward_ssg(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        half = fmap.shape[2] // 2
        g, up, low = (fmap.mean((2, 3)), fmap[:, :, :half].mean((2, 3)), fmap[:, :, half:].mean((2, 3)))
        if not self.training:
            return torch.cat([g, up, low], 1)
        emb = self.embed(g)
        return {"feat": g, "up": up, "low": low, "emb": emb, "logits": self.classifier(self.dropout(emb))}


def build_model(config: dict | ModelConfig) -> ReIDNet:
    """The network described by ``config`` (a ModelConfig or its dict, as stored in checkpoints)."""
    return ReIDNet(config if isinstance(config, ModelConfig) else ModelConfig(**config))
