"""Checkpoint formats the evaluator reads, told apart by their keys, and the feature each network gives.

* ``sysu30k``: our own checkpoints (config + model state, :mod:`sysu30k.model.checkpoint`).
* ``official``: the released SYSU-30k model (RELEASE.md §2): ``ft_net(C)`` = torchvision ResNet-50,
  global average pooling, one ``Linear(2048, C)`` at ``classifier.classifier.0``; saved from
  ``nn.DataParallel`` (``module.`` prefix), the unused ImageNet ``model.fc`` still in it.
* ``torchvision``: a plain ResNet-50 state dict (ImageNet weights: an untrained baseline).

Features (``--feature``): ``logits`` (the classifier output; the official test feature), ``pool`` (the
2048-d average-pooled layer-4 output, the authors' self-supervised test feature), ``neck`` (our BN-neck
embedding) and ``auto`` (the official feature for an official checkpoint, the neck for ours, the pooled
feature for a torchvision one, SSG's 6144-d test feature for an SSG checkpoint). Every file is read with
``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io.compat import import_torchvision
from .checkpoint import load
from .config import FEATURES, FORMATS
from .network import ReIDNet, build_model

OFFICIAL_SIZE = (256, 128)          # the official test script's Resize((256, 128)), bicubic
OFFICIAL_HEAD = "classifier.classifier.0."


class ResNetFeatures(nn.Module):
    """A torchvision ResNet-50 (``backbone``) with a linear head on its pooled feature: the official
    ``ft_net`` classifier, or the ImageNet ``fc`` for a plain torchvision checkpoint."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        self.backbone = import_torchvision().models.resnet50(weights=None)
        self.head = nn.Linear(self.backbone.fc.in_features, num_classes) if num_classes else None

    def feature(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        m = self.backbone
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        pooled = torch.flatten(m.avgpool(x), 1)
        if kind == "pool":
            return pooled
        return (self.head or m.fc)(pooled)


class FeatureNet(nn.Module):
    """``forward(x)`` = the chosen feature of ``net`` (what the evaluator's extraction calls)."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.feature(x, self.kind)


@dataclass
class Loaded:
    """A checkpoint made ready for extraction."""

    format: str                       # a key of FORMATS
    feature: str                      # the resolved --feature (never auto)
    network: FeatureNet
    size: tuple[int, int]             # (height, width) to extract at unless the user says otherwise


def detect(state: dict) -> str | None:
    """The format of a loaded checkpoint dict (a key of FORMATS), or None."""
    if isinstance(state.get("config"), dict) and isinstance(state.get("model"), dict):
        return "sysu30k"
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return None
    keys = set(_unprefixed(state))
    if f"{OFFICIAL_HEAD}weight" in keys and any(k.startswith("model.") for k in keys):
        return "official"
    if {"conv1.weight", "fc.weight", "layer4.0.conv1.weight"} <= keys:
        return "torchvision"
    return None


def _unprefixed(state: dict) -> dict:
    """``state`` without nn.DataParallel's ``module.`` prefix (when every key carries it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _strict(net: nn.Module, state: dict, path, fmt: str) -> None:
    """Load ``state`` into ``net``, every key and shape matching, or one line saying what does not."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shaped:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{shaped[0]} is {tuple(state[shaped[0]].shape)}, not {tuple(own[shaped[0]].shape)}")
        raise UserError(f"{path} is a {fmt} checkpoint that does not fit a ResNet-50: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(shaped)} misshapen key(s), e.g. {what}")
    net.load_state_dict(state)


def _resolve(fmt: str, feature: str, net: nn.Module) -> str:
    if feature not in FEATURES:
        raise UserError(f"--feature must be one of {', '.join(FEATURES)}")
    has_neck = isinstance(net, ReIDNet) and net.head == "bnneck"
    if feature == "auto":
        return {"official": "logits", "torchvision": "pool"}.get(fmt, "neck" if has_neck else "ssg")
    if feature == "neck" and not has_neck:
        raise UserError(f"--feature neck: a {fmt} checkpoint has no BN-neck embedding (use auto, logits or pool)")
    return feature


def load_network(path: str | Path, feature: str = "auto") -> Loaded:
    """The network of the checkpoint at ``path``, in eval mode on the CPU, handing out ``feature``."""
    if str(path).lower().endswith(".onnx"):
        raise UserError(f"{path} is an ONNX model, not a checkpoint: only embed runs it (score its features with "
                        "eval --query-features/--gallery-features)")
    state = load(path)
    fmt = detect(state)
    if fmt is None:
        raise UserError(f"{path} is not a checkpoint sysu30k understands; it reads: "
                        + "; ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if fmt == "sysu30k":
        config = state["config"]
        try:
            net = build_model(config["model"])
            net.load_state_dict(state["model"])
        except (KeyError, TypeError, RuntimeError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path} is a damaged sysu30k checkpoint ({reason})") from None
        size = (config.get("height", OFFICIAL_SIZE[0]), config.get("width", OFFICIAL_SIZE[1]))
    elif fmt == "official":
        flat = _unprefixed(state)
        head = flat[f"{OFFICIAL_HEAD}weight"]
        net = ResNetFeatures(head.shape[0])
        mapped = {(f"head.{k[len(OFFICIAL_HEAD):]}" if k.startswith(OFFICIAL_HEAD) else f"backbone.{k[len('model.'):]}"
                   if k.startswith("model.") else k): v for k, v in flat.items()}
        _strict(net, mapped, path, fmt)
        size = OFFICIAL_SIZE
    else:
        net = ResNetFeatures(None)
        _strict(net, {f"backbone.{k}": v for k, v in _unprefixed(state).items()}, path, fmt)
        size = OFFICIAL_SIZE
    kind = _resolve(fmt, feature, net)
    return Loaded(fmt, kind, FeatureNet(net, kind).eval(), (int(size[0]), int(size[1])))
