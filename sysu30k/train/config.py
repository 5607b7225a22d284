"""The options of the trainers, declared once: how to run (:class:`RunOptions`, both trainers) and what
``train-weak`` trains (:class:`TrainConfig` with its :class:`LossWeights`). Light to import (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..io.device import device_field
from ..loader.config import decoder_field
from ..model.config import ModelConfig
from ..options import Listed, check, opt, storage_option_field

METHODS = ("dgl", "unary", "folder")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class RunOptions:
    """How to run (not part of the result): decoder, workers, device, logging, validation batch."""

    decoder: str = decoder_field()
    workers: int = opt(2, "DataLoader worker processes per GPU/process (0: in this process).", min=0)
    device: str | None = device_field("cpu, cuda or cuda:N; auto: this rank's GPU when there is one, else the CPU.")
    log_every: int = opt(10, "Steps between JSONL step records.", min=1)
    eval_batch: int = opt(128, "Batch size of the per-epoch validation.", min=1)
    keep_every: int = opt(0, "Also keep checkpoints/epoch-NNN.pt every N epochs (last.pt is rewritten every epoch).",
                          min=0)
    tensorboard: bool = opt(True, "Also write the scalars of metrics.jsonl as TensorBoard event files in "
                            "RUN/tensorboard/ (tensorboard --logdir RUN).")
    show_progress: bool = opt(True, cli=False)
    storage_options: dict = storage_option_field("For datasets in object storage (repeatable; JSON values allowed).")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms: total = unary + pairwise·L_p + triplet·L_wt (the demo's 1·CE + 2·L_p, 2·L_wt)."""

    pairwise: float = opt(2.0, "Weight of the pairwise term.", min=0, flag="--pairwise-weight")
    triplet: float = opt(2.0, "Weight of the weak triplet term.", min=0, flag="--triplet-weight")
    sigma: float = opt(1.0, "Bandwidth of the pairwise appearance kernel; 0 = the batch median of squared distances.",
                       min=0)
    margin: float = opt(1.2, "Weak triplet margin.", min=0)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; stored in checkpoints and compared on resume."""

    method: str = opt("dgl", "dgl: unary + pairwise + weak triplet; unary: the released SYSU-30k recipe; folder: "
                      "baseline.", choices=METHODS)
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = opt(8, "Epochs (0: save the initialised model, e.g. as an untrained baseline).", min=0)
    bags: int = opt(12, "Bags per batch (windows of 1, 3, 5 folders mixed).", min=1)
    per_bag: int = opt(15, "Images per bag.", min=1)
    height: int = opt(256, "Input height.", min=8)
    width: int = opt(128, "Input width.", min=8)
    optimizer: str = opt("sgd", "sgd (momentum; Nesterov unless --no-nesterov, as released) or adam (AMSGrad unless "
                         "--no-amsgrad, as released).", choices=OPTIMIZERS)
    lr: float = opt(0.01, "Backbone learning rate.", min=0, min_open=True)
    head_lr_mult: float = opt(10.0, "Learning-rate factor of neck and classifier.", min=0, min_open=True)
    momentum: float = opt(0.9, "SGD momentum.", min=0, max=1, max_open=True)
    weight_decay: float = opt(5e-4, "Weight decay.", min=0)
    lr_steps: tuple[int, ...] = opt((), "Epochs at which the learning rate is multiplied by --lr-gamma, e.g. 40,70.",
                                    type=Listed(int, "EPOCHS"))
    lr_gamma: float = opt(0.1, "Learning-rate factor at each of --lr-steps.", min=0, min_open=True)
    pad: int | None = opt(None, "Random-crop padding in pixels.", min=0, default_note="10 × width / 128")
    erase_p: float = opt(0.5, "Random-erasing probability.", min=0, max=1)
    warmup_epochs: int = opt(0, "dgl/unary: pseudo-labels are the images' folders for the first N epochs, so the "
                             "in-bag argmax starts from a classifier that already names people (useful without "
                             "ImageNet weights).", min=0)
    weights: LossWeights = field(default_factory=LossWeights)
    resample: bool = opt(False, "Exact bag windows with repeated images, instead of exactly-once epochs.")
    seed: int = opt(0, "Seed of the initialisation, the sampler and the augmentation.", min=0)
    nesterov: bool = opt(True, "sgd: Nesterov momentum (the released recipe).")
    amsgrad: bool = opt(True, "adam: the AMSGrad variant (the released DGL recipe).")

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d
