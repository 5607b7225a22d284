"""``sysu30k train-weak``: weakly supervised training on bag-structured batches.

The method (DGL, or the released unary recipe) lives in :mod:`.losses`; epochs, checkpoints, exact
resume after SIGTERM, DDP, logs and validation are the shared loop of :mod:`.loop`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pyarrow.compute as pc
import torch

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from ..loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec
from ..model.network import build_model
from .config import RunOptions, TrainConfig
from .loop import LossFn, Session, run_epochs, start_process
from .losses import method_loss
from .optim import build_optimizer

log = logging.getLogger("sysu30k")
FORMAT = "sysu30k-train-weak/1"
LEGACY = {"nesterov": True, "amsgrad": True}      # added later; checkpoints before then used these variants
__all__ = ["FORMAT", "RunOptions", "TrainConfig", "num_classes", "train"]


def num_classes(dst: Storage) -> int:
    """The classifier's size: the largest training folder id (class = folder - 1)."""
    folder = dst.read_table(manifests.relpath("images"), columns=["folder"],
                            filters=[("subset", "=", "train")])["folder"]
    if len(folder) == 0:
        raise UserError(f"{dst.url} has no training images")
    return int(pc.max(folder).as_py())


def train(dst_url: str, out_dir: str, cfg: TrainConfig, run: RunOptions = RunOptions(),
          targets: dict[str, int] | None = None) -> dict:
    """Train on DST into ``out_dir`` (resuming what is there); returns the last epoch's record.

    ``targets`` maps sample keys to classes and overrides the weak labels (an oracle for benchmarks).
    """
    rank, world, device = start_process(run)
    dst = Storage(dst_url, run.storage_options)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes(dst)))
    torch.manual_seed(cfg.seed)
    loader = TrainLoader(dst_url, BagSpec(cfg.bags, cfg.per_bag, resample=cfg.resample),
                         TransformSpec(height=cfg.height, width=cfg.width, pad=cfg.pad, erase_p=cfg.erase_p),
                         LoaderOptions(decoder=run.decoder, workers=run.workers, rank=rank, world=world,
                                       seed=cfg.seed, storage_options=run.storage_options, device=str(device)))
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    s = Session(out=out_dir, dst_url=dst_url, fmt=FORMAT, config=cfg.to_dict(), legacy=LEGACY, model=model,
                optimizer=optimizer, device=device, run=run, height=cfg.height, width=cfg.width, rank=rank, world=world,
                schedule=torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_steps), cfg.lr_gamma))
    state = s.resume()
    if state is not None:
        loader.load_state_dict(state)
    s.start()
    if rank == 0:
        log.info("training %s on %d images (%d classes), %d batches/epoch, %s, %s decoder",
                 cfg.method, sum(len(c) for c in loader.catalog), cfg.model.num_classes, len(loader), device,
                 loader.decoder)
    if cfg.epochs == 0 and rank == 0:                  # the initialised model, e.g. as an untrained baseline
        s.save(s.out / "last.pt", loader, 0)
        s.save(s.out / "best.pt", loader, 0)
    try:
        return run_epochs(s, loader, loader.epoch, cfg.epochs, _weak_loss(cfg, targets, loader), cfg.epochs)
    finally:
        s.close()


def _weak_loss(cfg: TrainConfig, targets: dict[str, int] | None, loader: TrainLoader) -> LossFn:
    """The loss of ``cfg.method`` on a bag-structured batch (``targets``: an oracle's classes by key).

    During the first ``cfg.warmup_epochs`` epochs (read from the loader's position, so a resumed run agrees)
    the pseudo-labels are the images' folders: a classifier that names no one yet would make the in-bag
    argmax a coin toss, and training on it reinforces the toss. The other terms run from the start."""
    def loss(forward, b) -> dict:
        out = forward(b.images)
        if not bool(b.valid.any()):                     # a padding batch: keep DDP in step, learn nothing
            return {"total": sum(v.sum() for v in out.values()) * 0.0}
        override = None
        if targets is not None:
            override = torch.tensor([targets.get(k, -100) for k in b.keys], device=b.images.device)
        return method_loss(cfg.method, out, b.bag_labels, b.bag, b.folder, b.valid, cfg.weights, override,
                           warm=loader.epoch < cfg.warmup_epochs)
    return loss
