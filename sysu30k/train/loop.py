"""The training loop shared by ``train-weak`` and ``train-ssg``: epochs, checkpoints, resume, logs, validation.

One process per GPU (``torchrun --nproc-per-node N`` gives DDP) or one CPU process. An epoch ends with
``last.pt`` (model, optimiser, schedule, loader position, RNG and the method's own ``extra`` state), a
validation on the ``val`` split when ``sysu30k split --val-folders`` made one (``best.pt`` is kept by it,
never by the test split) and a JSONL record in ``metrics.jsonl``, whose numbers also go to TensorBoard
event files in ``tensorboard/`` (:mod:`.events`). SIGTERM saves a mid-epoch checkpoint and exits with 143;
rerunning the same command resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..io.device import any_rank, distributed, resolve_device, wait_for_rank0
from ..io.progress import progress
from ..model import checkpoint
from .config import RunOptions
from .events import FOLDER, EventLog

log = logging.getLogger("sysu30k")
EXIT_ON_SIGTERM = 143

LossFn = Callable[[Callable, object], dict]                   # (forward, batch on device) -> terms with "total"


def start_process(run: RunOptions) -> tuple[int, int, torch.device]:
    """(rank, world, device) of this process: the process group when torchrun launched us, and the
    device ``run`` names, else this rank's GPU when there is one, else the CPU."""
    rank, world, local_rank = distributed(run.device)
    device = resolve_device(run.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def parallel(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``model`` wrapped in DDP when there are several ranks, else itself."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


@dataclass(kw_only=True)
class Session:
    """One run's moving parts, built with keywords by both trainers. ``config`` (a dict) identifies the run:
    resuming with other settings is refused; ``legacy`` holds the config keys added after a format was
    first written, with the value the older code used, so older checkpoints still resume. ``extra`` is
    the method's own state, saved in every checkpoint (SSG: iteration, labels). ``net`` is ``model``
    wrapped for DDP when there are several ranks."""

    out: Path
    dst_url: str
    fmt: str
    config: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    run: RunOptions
    height: int
    width: int
    rank: int = 0
    world: int = 1
    legacy: dict = field(default_factory=dict)
    step: int = 0
    best: float | None = None          # best.pt's val rank-1
    best_map: float | None = None      # and its official mAP (the tie-break)
    extra: dict = field(default_factory=dict)
    net: torch.nn.Module = field(init=False)
    events: EventLog | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.net = parallel(self.model, self.device, self.world)

    def save(self, path: Path, loader, epoch: int) -> None:
        """A checkpoint of everything needed to continue (written atomically)."""
        checkpoint.save(path, {
            "format": self.fmt, "config": self.config, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "loader": loader.state_dict(), "epoch": epoch, "step": self.step, "best_rank1": self.best,
            "best_mAP": self.best_map,
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "extra": self.extra})

    def resume(self) -> dict | None:
        """Restore ``out/last.pt`` into model, optimiser, schedule, step, best and extra; returns the
        checkpoint's loader state (None when there is nothing to resume)."""
        path = self.out / "last.pt"
        if not path.exists():
            return None
        state = checkpoint.load(path)
        if {**self.legacy, **state.get("config", {})} != self.config:
            raise UserError(f"{self.out} holds a run with other settings; choose another --out or pass --overwrite")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng") or []             # absent in checkpoints of older versions
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda_rng and len(cuda_rng) == gpus:
            torch.cuda.set_rng_state_all(cuda_rng)
        elif cuda_rng:
            log.warning("%s holds the random state of %d GPU(s) and this process sees %d: GPU random draws after "
                        "the resume differ from an uninterrupted run", path, len(cuda_rng), gpus)
        self.step, self.best, self.extra = int(state["step"]), state["best_rank1"], state.get("extra", {})
        self.best_map = state.get("best_mAP")              # absent in checkpoints of older versions
        log.info("resuming %s: epoch %d, batch %d", path, state["loader"]["epoch"] + 1, state["loader"]["consumed"])
        return state["loader"]

    def start(self) -> None:
        """Create the run folder, record the settings and open the TensorBoard log (rank 0; call after
        :meth:`resume`: steps after the resumed one are hidden from earlier event files)."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config, indent=1))
            if self.run.tensorboard:
                self.events = EventLog(self.out / FOLDER, self.step + 1 if self.step else None)

    def append(self, record: dict) -> None:
        """One JSON line in ``metrics.jsonl`` and its scalars in TensorBoard (rank 0; NaN is null, no scalar)."""
        if self.rank == 0:
            record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None:
                self.events.write(record)

    def flush(self) -> None:
        """Put the TensorBoard events logged so far on disk."""
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard log (the trainers' last act, also on SIGTERM and errors)."""
        if self.events is not None:
            self.events.close()


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.set = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.set = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def run_epochs(s: Session, loader, first: int, last: int, loss_fn: LossFn, total: int,
               validate: Callable[[int], bool] = lambda epoch: True, record_extra: Callable[[], dict] = dict) -> dict:
    """Train epochs ``first``..``last - 1`` (of ``total``) with ``loss_fn``; returns the last epoch's record.

    ``loader`` continues from its own position (a resumed mid-epoch state is kept). ``validate(epoch)``
    says whether this epoch ends with a validation; ``record_extra()`` adds fields to each record.
    """
    stop = _StopFlag()
    record: dict = {}
    try:
        for epoch in range(first, last):
            if loader.epoch != epoch or loader.consumed == 0:
                loader.set_epoch(epoch)
            s.net.train()
            sums: dict[str, float] = {}
            seen, t0 = 0, time.perf_counter()
            shown = s.run.show_progress and s.rank == 0
            with progress(len(loader), f"epoch {epoch + 1}/{total}", "batch", shown) as bar:
                bar.update(loader.consumed)
                for batch in loader:
                    terms = optimize(s, batch, loss_fn)
                    s.step += 1
                    seen += int(batch.valid.sum()) * s.world
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update(1)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                                        **{k: f"{v:.3f}" for k, v in terms.items()})
                    if s.step % s.run.log_every == 0:
                        s.append({"event": "step", "epoch": epoch, "step": s.step, "lr": s.schedule.get_last_lr()[0],
                                  "images_per_s": seen / (time.perf_counter() - t0), **terms})
                    if any_rank(stop.set):             # a signal to any rank stops all at this same batch
                        if s.rank == 0:
                            s.save(s.out / "last.pt", loader, epoch)
                            log.warning("SIGTERM: saved %s at epoch %d, batch %d; rerun the same command to "
                                        "resume", s.out / "last.pt", epoch + 1, loader.consumed)
                        wait_for_rank0()                 # no rank exits (and has torchrun stop rank 0) mid-save
                        raise SystemExit(EXIT_ON_SIGTERM)
            s.schedule.step()
            batches = max(1, loader.consumed)
            record = {"event": "epoch", "epoch": epoch, "step": s.step,
                      "images_per_s": seen / (time.perf_counter() - t0),
                      "train_images": sum(len(c) for c in loader.catalog), "excluded_folders": len(loader.excluded),
                      **{f"train_{k}": v / batches for k, v in sums.items()}, "damaged": len(loader.damaged),
                      **record_extra()}
            if s.rank == 0:
                val = _validate(s) if validate(epoch) else None
                record.update({f"val_{k}": v for k, v in (val or {}).items()})
                improved = _better(val, s.best, s.best_map)
                if improved:
                    s.best, s.best_map = val["rank1"], val.get("mAP_official")
                loader.set_epoch(epoch + 1)
                s.save(s.out / "last.pt", loader, epoch + 1)
                if s.run.keep_every and (epoch + 1) % s.run.keep_every == 0:
                    s.save(s.out / "checkpoints" / f"epoch-{epoch + 1:03d}.pt", loader, epoch + 1)
                if improved or (s.best is None and val is None and epoch == total - 1):
                    s.save(s.out / "best.pt", loader, epoch + 1)
                s.append(record)
                s.flush()
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                               if isinstance(v, float)))
            else:
                loader.set_epoch(epoch + 1)
            wait_for_rank0()
    finally:
        stop.restore()
    return record


def optimize(s: Session, batch, loss_fn: LossFn) -> dict[str, float]:
    """One optimiser step: move the batch, forward (bf16 autocast on CUDA) inside ``loss_fn``, backward."""
    b = batch.to(s.device, torch.float32)
    terms = loss_fn(lambda x: forward(s.net, x, s.device), b)
    loss = terms["total"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)}: lower --lr")
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}


def forward(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The network's training outputs in float32 (channels-last and bf16 autocast on CUDA)."""
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(images)
    return {k: v.float() for k, v in out.items()}


def _better(val: dict | None, rank1: float | None, mAP: float | None) -> bool:
    """best.pt's rule: the highest val rank-1; on a tie the higher official mAP; on a tie of both the earlier
    epoch. A NaN (non-finite features, unreadable val images) never wins."""
    if val is None or not math.isfinite(val["rank1"]):
        return False
    if rank1 is None:
        return True
    if val["rank1"] != rank1:
        return val["rank1"] > rank1
    new = val.get("mAP_official", math.nan)
    return math.isfinite(new) and (mAP is None or not math.isfinite(mAP) or new > mAP)


def _validate(s: Session) -> dict | None:
    """Rank-1 and both mAPs on the val split, or None when DST has no val split; rank-1 NaN when the model's
    features are not finite or val images cannot be read (such an epoch is recorded, never becomes best.pt)."""
    from ..evaluation.run import IncompleteSplit, evaluate_split
    from ..evaluation.scoring import NonFiniteFeatures

    s.model.eval()
    try:
        return evaluate_split(s.model, s.dst_url, "val", s.device, s.height, s.width, s.run.eval_batch,
                              s.run.workers, s.run.storage_options, decoder=s.run.decoder)
    except (NonFiniteFeatures, IncompleteSplit) as exc:      # no number rather than a wrong one; training goes on
        log.warning("validation: %s; this epoch cannot become best.pt", exc)
        return {"rank1": math.nan}
    finally:
        s.model.train()
