"""The options of ``train-ssg``, declared once (light to import: no torch). The defaults are the
released code's adaptation settings; :data:`SOURCE_DEFAULTS` are the source stage's differences."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import click

from ...errors import UserError
from ...model.config import ModelConfig
from ...options import check, opt
from ..config import OPTIMIZERS

STAGES = ("source", "adapt")
MINING = ("semi", "hard")
SOURCE_DEFAULTS = {"groups": 16, "per_group": 8, "optimizer": "adam", "lr": 3e-4, "head_lr_mult": 3.0}


@dataclass(frozen=True)
class SSGConfig:
    """Everything that decides the trained weights (stored in checkpoints, compared on resume). The
    defaults are the released code's adaptation settings; :meth:`for_stage` gives each stage's."""

    stage: str = opt("adapt", "source: supervised on a labelled DST (folder = identity); adapt: SSG on an "
                     "unlabelled DST.", choices=STAGES)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(head="ssg", num_classes=1))
    height: int = opt(256, "Input height.", min=8)
    width: int = opt(128, "Input width.", min=8)
    epochs: int = opt(150, "source stage: epochs.", min=0)
    decay_from: int = opt(100, "source stage: epoch after which the lr decays to 0.001× (lr·0.001^((epoch − "
                          "decay_from)/(epochs − decay_from))).", min=0)
    iterations: int = opt(30, "adapt: clustering rounds.", min=1)
    epochs_per_iteration: int = opt(70, "adapt: epochs after each clustering.", min=1)
    groups: int = opt(32, "Identities (clusters) per batch, P.", min=1)
    per_group: int = opt(4, "Images per identity, K.", min=1)
    optimizer: str = opt("sgd", "sgd (plain momentum unless --nesterov, as released) or adam (plain unless "
                         "--amsgrad, as released).", choices=OPTIMIZERS)
    lr: float = opt(6e-5, "Backbone learning rate.", min=0, min_open=True)
    head_lr_mult: float = opt(1.0, "Learning-rate factor of the new layers.", min=0, min_open=True)
    momentum: float = opt(0.9, "SGD momentum.", min=0, max=1, max_open=True)
    weight_decay: float = opt(5e-4, "Weight decay.", min=0)
    margin: float = opt(0.5, "Triplet margin.", min=0)
    mining: str = opt("semi", "semi: the released code's block pairs; hard: batch-hard per view.", choices=MINING)
    k1: int = opt(20, "k-reciprocal neighbours.", min=1)
    k2: int = opt(6, "Query-expansion neighbours.", min=1)
    lam: float = opt(0.1, "Weight of the source term in the distance.", min=0, max=1, flag="--lambda")
    rho: float = opt(1.6e-3, "eps = mean of the smallest rho fraction of pairwise distances.", min=0, max=1,
                     min_open=True)
    min_samples: int = opt(4, "DBSCAN min_samples (the point included).", min=1)
    plus_from: int = opt(-1, "SSG++: add the one-label-per-cluster stream from this iteration (-1: off).", min=-1)
    init: str | None = opt(None, "adapt: the source-stage checkpoint to start from (its architecture is used).",
                           type=click.Path(exists=True, dir_okay=False))
    source: str | None = opt(None, "adapt: the packed source dataset whose features enter the distance (the λ term).",
                             metavar="SRC_DST")
    seed: int = opt(1, "Seed of the initialisation, the sampler and the augmentation.", min=0)
    nesterov: bool = opt(False, "sgd: Nesterov momentum (the released code uses plain momentum).")
    amsgrad: bool = opt(False, "adam: the AMSGrad variant (the released code uses plain Adam).")

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def for_stage(cls, stage: str, **overrides) -> SSGConfig:
        """The released settings of ``stage`` (source: :data:`SOURCE_DEFAULTS`), then ``overrides`` (None
        values are ignored)."""
        if stage not in STAGES:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}")
        base = dict(stage=stage, **(SOURCE_DEFAULTS if stage == "source" else {}))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.stage == "source" else self.iterations * self.epochs_per_iteration

    def to_dict(self) -> dict:
        return asdict(self)
