"""``sysu30k train-weak``: weakly supervised training on bag-structured batches.

One process per GPU (``torchrun --nproc-per-node N`` gives DDP) or one CPU process. Every epoch ends
with a checkpoint, a validation on the ``val`` split when ``sysu30k split --val-folders`` made one (the
best checkpoint is kept by it, never by the test split) and a JSONL record. SIGTERM saves a mid-epoch
checkpoint and stops; rerunning the same command resumes exactly where it stopped: model, optimiser,
schedule, loader position and RNG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.distributed as dist

from . import checkpoint, manifests
from .errors import UserError
from .loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec
from .losses import METHODS, LossWeights, method_loss
from .model import ModelConfig, build_model
from .progress import progress
from .storage import Storage

log = logging.getLogger("sysu30k")
EXIT_ON_SIGTERM = 143


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; stored in checkpoints and compared on resume."""

    method: str = "dgl"
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 8
    bags: int = 12
    per_bag: int = 15
    height: int = 256
    width: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    weights: LossWeights = field(default_factory=LossWeights)
    resample: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d


@dataclass(frozen=True)
class RunOptions:
    """How to run (not part of the result): decoder, workers, device, logging, validation batch."""

    decoder: str = "auto"
    workers: int = 2
    device: str | None = None
    log_every: int = 10
    eval_batch: int = 128
    keep_every: int = 0                  # also archive checkpoints/epoch-NNN.pt every N epochs (0: never)
    show_progress: bool = True
    storage_options: dict = field(default_factory=dict)


def num_classes(dst: Storage) -> int:
    """The classifier's size: the largest training folder id (class = folder - 1)."""
    folder = dst.read_table(manifests.relpath("images"), columns=["folder"],
                            filters=[("subset", "=", "train")])["folder"]
    if len(folder) == 0:
        raise UserError(f"{dst.url} has no training images")
    return int(pc.max(folder).as_py())


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    head = [p for n, p in model.named_parameters() if n.split(".")[0] in ("project", "neck", "classifier")
            and p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr_mult}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    raise UserError("--optimizer must be sgd or adam")


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.set = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.set = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _distributed() -> tuple[int, int, int]:
    """(rank, world, local rank), starting the process group when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(dst_url: str, out_dir: str, cfg: TrainConfig, run: RunOptions = RunOptions(),
          targets: dict[str, int] | None = None) -> dict:
    """Train on DST into ``out_dir`` (resuming what is there); returns the last epoch's record.

    ``targets`` maps sample keys to classes and overrides the weak labels (an oracle for benchmarks).
    """
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}")
    rank, world, local_rank = _distributed()
    device = torch.device(run.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dst = Storage(dst_url, run.storage_options)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes(dst)))
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    loader = TrainLoader(dst_url, BagSpec(cfg.bags, cfg.per_bag, resample=cfg.resample),
                         TransformSpec(height=cfg.height, width=cfg.width),
                         LoaderOptions(decoder=run.decoder, workers=run.workers, rank=rank, world=world,
                                       seed=cfg.seed, storage_options=run.storage_options))
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if world > 1 else model
    optimizer = _optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_steps), cfg.lr_gamma)
    start_epoch, step, best = _resume(out, cfg, model, optimizer, schedule, loader)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        log.info("training %s on %d images (%d classes), %d batches/epoch, %s, %s decoder",
                 cfg.method, sum(len(s) for s in loader.catalog), cfg.model.num_classes, len(loader), device,
                 loader.decoder)
    if cfg.epochs == 0 and rank == 0:                  # the initialised model, e.g. as an untrained baseline
        _save(out / "last.pt", cfg, model, optimizer, schedule, loader, 0, 0, None)
        _save(out / "best.pt", cfg, model, optimizer, schedule, loader, 0, 0, None)
    stop = _StopFlag()
    record: dict = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if loader.epoch != epoch or loader.consumed == 0:
                loader.set_epoch(epoch)
            net.train()
            sums: dict[str, float] = {}
            seen, t0 = 0, time.perf_counter()
            with progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", "batch",
                          run.show_progress and rank == 0) as bar:
                bar.update(loader.consumed)
                for batch in loader:
                    terms = _step(net, optimizer, batch, cfg, device, targets)
                    step += 1
                    n_valid = int(batch.valid.sum())
                    seen += n_valid * world
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update(1)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                                        **{k: f"{v:.3f}" for k, v in terms.items()})
                    if rank == 0 and step % run.log_every == 0:
                        _append(out, {"event": "step", "epoch": epoch, "step": step, "lr": schedule.get_last_lr()[0],
                                      "images_per_s": seen / (time.perf_counter() - t0), **terms})
                    if stop.set:
                        if rank == 0:
                            _save(out / "last.pt", cfg, model, optimizer, schedule, loader, epoch, step, best)
                            log.warning("SIGTERM: saved %s at epoch %d, batch %d; rerun the same command to "
                                        "resume", out / "last.pt", epoch + 1, loader.consumed)
                        raise SystemExit(EXIT_ON_SIGTERM)
            schedule.step()
            batches = max(1, loader.consumed)
            record = {"event": "epoch", "epoch": epoch, "step": step, "images_per_s": seen / (time.perf_counter() - t0),
                      "train_images": sum(len(s) for s in loader.catalog), "excluded_folders": len(loader.excluded),
                      **{f"train_{k}": v / batches for k, v in sums.items()}, "damaged": len(loader.damaged)}
            if rank == 0:
                val = _validate(model, dst_url, device, cfg, run)
                record.update({f"val_{k}": v for k, v in (val or {}).items()})
                improved = val is not None and (best is None or val["rank1"] > best)
                best = val["rank1"] if improved else best
                loader.set_epoch(epoch + 1)
                _save(out / "last.pt", cfg, model, optimizer, schedule, loader, epoch + 1, step, best)
                if run.keep_every and (epoch + 1) % run.keep_every == 0:
                    _save(out / "checkpoints" / f"epoch-{epoch + 1:03d}.pt", cfg, model, optimizer, schedule,
                          loader, epoch + 1, step, best)
                if improved or (val is None and epoch == cfg.epochs - 1):
                    _save(out / "best.pt", cfg, model, optimizer, schedule, loader, epoch + 1, step, best)
                _append(out, record)
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                               if isinstance(v, float)))
            if world > 1:
                dist.barrier()
    finally:
        stop.restore()
    return record


def _step(net, optimizer, batch, cfg: TrainConfig, device, targets) -> dict[str, float]:
    b = batch.to(device, torch.float32)
    if device.type == "cuda":
        b.images = b.images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(b.images)
    if not bool(b.valid.any()):                         # a padding batch: keep DDP in step, learn nothing
        loss = sum(v.float().sum() for v in out.values()) * 0.0
        terms = {"total": loss}
    else:
        override = None
        if targets is not None:
            override = torch.tensor([targets.get(k, -100) for k in b.keys], device=device)
        out = {k: v.float() for k, v in out.items()}
        terms = method_loss(cfg.method, out, b.bag_labels, b.bag, b.folder, b.valid, cfg.weights, override)
        loss = terms["total"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)}: lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}


def _save(path: Path, cfg: TrainConfig, model, optimizer, schedule, loader: TrainLoader, epoch: int, step: int,
          best: float | None) -> None:
    checkpoint.save(path, {
        "format": "sysu30k-train-weak/1", "config": cfg.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "loader": loader.state_dict(),
        "epoch": epoch, "step": step, "best_rank1": best, "rng": torch.get_rng_state(),
    })


def _resume(out: Path, cfg: TrainConfig, model, optimizer, schedule, loader: TrainLoader):
    """(start epoch, step, best val rank-1) from ``out/last.pt`` when there is one."""
    path = out / "last.pt"
    if not path.exists():
        return 0, 0, None
    state = checkpoint.load(path)
    if state.get("config") != cfg.to_dict():
        raise UserError(f"{out} holds a run with other settings; choose another --out or pass --overwrite")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"])
    log.info("resuming %s: epoch %d, batch %d", path, state["loader"]["epoch"] + 1, state["loader"]["consumed"])
    return int(state["loader"]["epoch"]), int(state["step"]), state["best_rank1"]


def _append(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                            for k, v in record.items()}) + "\n")


def _validate(model, dst_url: str, device, cfg: TrainConfig, run: RunOptions) -> dict | None:
    """Rank-1 and both mAPs on the val split, or None when DST has no val split."""
    from .evaluation.run import evaluate_split

    model.eval()
    try:
        return evaluate_split(model, dst_url, "val", device, cfg.height, cfg.width, run.eval_batch, run.workers,
                              run.storage_options)
    finally:
        model.train()
