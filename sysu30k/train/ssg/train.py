"""``sysu30k train-ssg``: Self-similarity Grouping (SSG.md) on the same shards, loader, loop and evaluator.

Stage ``source``: supervised training on a labelled source dataset (folder = identity), P×K identity
batches, cross-entropy + batch-hard triplet (§1). Stage ``adapt``: from a source checkpoint, repeat
{extract flip-summed global/upper/lower features of the unlabelled target → k-reciprocal Jaccard
distance with the source term per view → DBSCAN (eps fixed at iteration 0) → drop images that are
outliers in any view → train ``epochs_per_iteration`` epochs with the four triplet terms} (§2), with
SSG++'s second, one-label-per-cluster stream from ``plus_from`` on (§3, :mod:`.plus`). Checkpoints,
resume, logs and validation are the shared loop of :mod:`sysu30k.train.loop`; the clustering state of the
current iteration travels in each checkpoint, so a resumed run re-clusters nothing it had clustered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ...errors import UserError
from ...evaluation.features import extract_features
from ...io.storage import Storage
from ...loader import EvalLoader, GroupLoader, GroupSpec, LoaderOptions, TransformSpec
from ...loader.catalog import load_catalog
from ...model import checkpoint
from ...model.config import ModelConfig
from ...model.network import build_model
from ...split.holdout import excluded_folders
from ..config import RunOptions
from ..loop import Session, run_epochs, start_process
from ..optim import build_optimizer
from .config import SSGConfig
from .losses import source_loss, ssg_loss
from .quality import clustering_quality

log = logging.getLogger("sysu30k")
FORMAT = "sysu30k-train-ssg/1"
LEGACY = {"nesterov": False, "amsgrad": False}     # added later; checkpoints before then used these variants
VIEWS = ("g", "up", "low")


class ExpDecay:
    """lr factor 1 until ``start``, then 0.001^((epoch − start)/(end − start)) (the source schedule)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __call__(self, epoch: int) -> float:
        if epoch <= self.start or self.end <= self.start:
            return 1.0
        return 0.001 ** ((epoch - self.start) / (self.end - self.start))


def train(dst_url: str, out_dir: str, cfg: SSGConfig, run: RunOptions = RunOptions(),
          truth: dict[str, int] | None = None) -> dict:
    """Run ``cfg.stage`` on DST into ``out_dir`` (resuming what is there); returns the last epoch's record.

    ``truth`` (key → true identity, synthetic data) adds NMI/ARI to the clustering records and is the
    annotator SSG++ asks for one label per cluster.
    """
    if cfg.stage == "adapt" and not cfg.init:
        raise UserError("--stage adapt needs --init: a source-stage checkpoint (sysu30k train-ssg --stage source)")
    if cfg.plus_from >= 0 and truth is None:
        raise UserError("SSG++ (--plus-from) annotates one image per cluster: give the labels with --truth")
    rank, world, device = start_process(run)
    options = LoaderOptions(decoder=run.decoder, workers=run.workers, rank=rank, world=world, seed=cfg.seed,
                            storage_options=run.storage_options, device=str(device))
    excluded = frozenset(excluded_folders(dst_url, run.storage_options))
    transform = TransformSpec(height=cfg.height, width=cfg.width)
    torch.manual_seed(cfg.seed)
    source_weights = None
    if cfg.stage == "source":                           # folder = identity; class c = the c-th folder
        loader = GroupLoader(dst_url, None, GroupSpec(cfg.groups, cfg.per_group), transform, options, excluded)
        if len(loader) == 0:
            raise UserError(f"{dst_url} has fewer than {cfg.groups} identities with images: lower --groups")
        classes = np.unique(loader.labels[loader.labels >= 0])
        cfg = replace(cfg, model=replace(cfg.model, head="ssg", num_classes=len(classes)))
    else:                                               # the source model's architecture, without its classes
        source_weights, source_model = _source_checkpoint(cfg.init)
        cfg = replace(cfg, model=replace(ModelConfig(**source_model), num_classes=1, pretrained=None))
    model = build_model(cfg.model)
    if source_weights is not None:
        model.load_state_dict(source_weights, strict=False)
        model.classifier.requires_grad_(False)          # no classifier in adaptation (SSG.md §2.1)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg)
    decay = ExpDecay(cfg.decay_from, cfg.epochs) if cfg.stage == "source" else ExpDecay(0, 0)
    s = Session(out=out_dir, dst_url=dst_url, fmt=FORMAT, config=cfg.to_dict(), legacy=LEGACY, model=model,
                optimizer=optimizer, device=device, run=run, height=cfg.height, width=cfg.width, rank=rank, world=world,
                schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, decay))
    state = s.resume()
    s.start()
    try:
        if cfg.stage == "source":
            if state is not None:
                loader.load_state_dict(state)
            lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.int64)
            lookup[torch.from_numpy(classes)] = torch.arange(len(classes))
            lookup = lookup.to(device)
            log.info("source stage: %d images of %d identities, %d batches/epoch, %s",
                     int((loader.labels >= 0).sum()), len(classes), len(loader), device)
            return run_epochs(s, loader, loader.epoch, cfg.epochs,
                              lambda fwd, b: source_loss(fwd(b.images), lookup[b.folder], cfg.margin), cfg.epochs)
        return _adapt(s, cfg, dst_url, options, excluded, transform, state, truth)
    finally:
        s.close()


def _adapt(s: Session, cfg: SSGConfig, dst_url: str, options: LoaderOptions, excluded: frozenset[int],
           transform: TransformSpec, state: dict | None, truth: dict[str, int] | None) -> dict:
    """The SSG iterations: cluster (unless the resumed checkpoint holds this iteration's clusters), train."""
    from .plus import PlusStream

    keys = [k for e in load_catalog(Storage(dst_url, options.storage_options), "train", excluded) for k in e.key]
    if not keys:
        raise UserError(f"{dst_url} has no training images to adapt to")
    index = {k: i for i, k in enumerate(keys)}
    per_iter, record = cfg.epochs_per_iteration, {}
    epoch = int(state["epoch"]) if state is not None else 0
    first_it = epoch // per_iter if per_iter else cfg.iterations
    for it in range(first_it, cfg.iterations):
        resumed = state is not None and s.extra.get("iteration") == it and "labels" in s.extra
        features = None                                 # this round's target features (a resumed round has none)
        if not resumed:
            labels, eps, quality, features = group_images(s.model, dst_url, keys, cfg, s.run, s.device,
                                                s.extra.get("eps"), truth)
            if s.world > 1:            # rank 0's clusters for all: GPUs may differ in the last bit, and ranks
                box = [labels, eps, quality]           # with other clusters would count other batches (DDP hang)
                dist.broadcast_object_list(box, src=0)
                labels, eps, quality = box
            kept = {k: v for k, v in s.extra.items() if k == "plus_labelled"}    # SSG++ annotates once
            s.extra = {**kept, "iteration": it, "eps": eps, "labels": torch.from_numpy(labels), "quality": quality}
            s.append({"event": "cluster", "iteration": it, "step": s.step, **quality})
        labels = s.extra["labels"].numpy()
        groups = training_groups(keys, labels)
        loader = GroupLoader(dst_url, groups, GroupSpec(cfg.groups, cfg.per_group), transform, options, excluded)
        if len(loader) == 0:
            raise UserError(f"iteration {it + 1}: only {s.extra['quality']['clusters_g']} clusters survive, fewer "
                            f"than --groups {cfg.groups}: lower --groups or raise --rho")
        if resumed:
            loader.load_state_dict(state)
        plus = (PlusStream(s, cfg, dst_url, keys, labels, truth, it, options, excluded, transform, features)
                if 0 <= cfg.plus_from <= it else None)
        table = torch.from_numpy(labels).to(s.device)

        def loss(fwd, b, table=table, plus=plus):
            y = table[:, torch.tensor([index[k] for k in b.keys], device=s.device)]
            terms = ssg_loss(fwd(b.images), b.bag, y[0], y[1], y[2], cfg.margin, cfg.mining)
            if plus is not None:
                extra = plus.loss(fwd)
                terms = {**terms, "plus": extra, "total": terms["total"] + extra}
            return terms

        log.info("iteration %d/%d: %d of %d images in %d clusters, %d batches/epoch", it + 1, cfg.iterations,
                 len(groups), len(keys), s.extra["quality"]["clusters_g"], len(loader))
        quality = dict(s.extra["quality"])
        record = run_epochs(s, loader, max(loader.epoch, it * per_iter), (it + 1) * per_iter, loss, cfg.total_epochs,
                            validate=lambda e: (e + 1) % per_iter == 0,
                            record_extra=lambda: {"iteration": it, **{f"cluster_{k}": v for k, v in quality.items()}})
        if plus is not None:
            plus.close()
        state = None
    return record


def training_groups(keys: list[str], labels: np.ndarray) -> dict[str, int]:
    """{key: global cluster} of the images that are no outlier in any view (SSG.md §2.5: the rest sit out)."""
    keep = (labels >= 0).all(0)
    return {k: int(labels[0, i]) for i, k in enumerate(keys) if keep[i]}


def group_images(model: torch.nn.Module, dst_url: str, keys: list[str], cfg: SSGConfig, run: RunOptions,
                 device: torch.device, eps: list[float] | None = None,
                 truth: dict[str, int] | None = None) -> tuple[np.ndarray, list[float], dict, torch.Tensor]:
    """One round of self-similarity grouping: labels [3, N] (global, upper, lower; −1 = outlier) of the
    images ``keys``, the eps of each view (selected here when ``eps`` is None), quality figures, and the
    target features it grouped (:func:`train_features`, which SSG++ reuses)."""
    from .rerank import cluster, select_eps, ssg_distance

    t0 = time.perf_counter()
    features = train_features(model, dst_url, keys, cfg, run, device)
    target = views(features)
    source = views(train_features(model, cfg.source, None, cfg, run, device)) if cfg.source else None
    t_feat = time.perf_counter() - t0
    labels = np.empty((3, len(keys)), np.int64)
    chosen = []
    for v in range(3):
        d = ssg_distance(target[v], source[v] if source is not None else None, cfg.k1, cfg.k2, cfg.lam,
                         device=device)
        chosen.append(float(eps[v]) if eps else select_eps(d, cfg.rho))
        labels[v] = cluster(d, chosen[-1], cfg.min_samples)
    quality = clustering_quality(labels, [truth.get(k, -1) for k in keys] if truth else None)
    quality.update({f"eps_{name}": e for name, e in zip(VIEWS, chosen)},
                   extract_s=t_feat, distance_s=time.perf_counter() - t0 - t_feat)
    log.info("grouping: %s", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in quality.items()))
    return labels, chosen, quality, features


def train_features(model: torch.nn.Module, dst_url: str, keys: list[str] | None, cfg: SSGConfig, run: RunOptions,
                   device: torch.device) -> torch.Tensor:
    """cat(f_g, f_up, f_low) of DST's training images (``keys`` in that order, or all), flip-summed and
    not normalised, as the evaluator's extraction makes them (resize only, SSG.md §2.2)."""
    spec = TransformSpec(height=cfg.height, width=cfg.width, train=False)
    loader = EvalLoader(dst_url, "train", run.eval_batch, spec,
                        LoaderOptions(decoder=run.decoder, workers=run.workers, storage_options=run.storage_options,
                                      device=str(device)),
                        flip=True, keys=frozenset(keys) if keys is not None else None)
    feats, got, _, _ = extract_features(model, loader, device, flip=True, normalize=False)
    if keys is None:
        return feats
    where = {k: i for i, k in enumerate(got)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise UserError(f"{len(missing)} training image(s) of {dst_url} cannot be read, e.g. {missing[0]}")
    return feats[torch.tensor([where[k] for k in keys])]


def views(feats: torch.Tensor) -> list[torch.Tensor]:
    """The global, upper and lower parts of cat(f_g, f_up, f_low), each L2-normalised on its own."""
    width = feats.shape[1] // 3
    return [torch.nn.functional.normalize(feats[:, v * width:(v + 1) * width], dim=1) for v in range(3)]


def _source_checkpoint(path: str) -> tuple[dict, dict]:
    """(weights without the classifier, model config) of a source-stage checkpoint."""
    state = checkpoint.load(Path(path))
    model = state.get("config", {}).get("model", {})
    if state.get("format") != FORMAT or model.get("head") != "ssg":
        raise UserError(f"{path} is not a train-ssg checkpoint (make one with --stage source)")
    return {k: v for k, v in state["model"].items() if not k.startswith("classifier.")}, model
