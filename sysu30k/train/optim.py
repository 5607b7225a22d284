"""The one optimiser builder of both trainers: parameter groups (backbone vs new layers) and the variant.

``sgd`` is momentum SGD, Nesterov or plain; ``adam`` is Adam, AMSGrad or plain. Each trainer states its
method's default variant in its own config (DGL as released: Nesterov SGD or AMSGrad Adam; SSG as
released: plain), so the same flag never means two things.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import UserError
from .config import OPTIMIZERS

HEAD_MODULES = ("project", "neck", "classifier", "embed")     # new layers (not the ImageNet backbone)


def param_groups(model: torch.nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Backbone parameters at ``lr``, the new layers (:data:`HEAD_MODULES`) at ``lr × head_lr_mult``."""
    head = [p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES and p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return [{"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


class OptimizerSettings(Protocol):
    """What the builder reads from a trainer's config (``TrainConfig`` and ``SSGConfig`` both have it)."""

    optimizer: str
    lr: float
    head_lr_mult: float
    weight_decay: float
    momentum: float
    nesterov: bool
    amsgrad: bool


def build_optimizer(model: torch.nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimiser ``s.optimizer`` over :func:`param_groups` of ``model``; ``nesterov`` applies to sgd,
    ``amsgrad`` to adam."""
    groups = param_groups(model, s.lr, s.head_lr_mult)
    if s.optimizer == "sgd":
        if s.nesterov and s.momentum <= 0:
            raise UserError("--nesterov needs a --momentum above 0")
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, lr=s.lr, weight_decay=s.weight_decay, amsgrad=s.amsgrad)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
