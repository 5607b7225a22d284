"""The logic of ``sysu30k eval``: score feature files, or a checkpoint (features extracted and cached),
and write the run folder (:mod:`sysu30k.evaluation.reports`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import manifests
from ..errors import UserError
from ..io.device import distributed, resolve_device
from ..io.storage import Storage
from ..loader import EvalLoader, LoaderOptions, TransformSpec, resolve_decoder
from ..model.formats import load_network
from .config import EvalOptions
from .features import FeatureSet, FeatureWriter, iter_features, join_split, read_features, write_features
from .reports import write_run
from .scoring import Scorer, auto_chunk, score

log = logging.getLogger("sysu30k")


class IncompleteSplit(UserError):
    """Images of the split could not be embedded: a score without them would not be the split's."""


def evaluate_features(dst_url: str | None, query_features: str, gallery_features: str, out_dir: str,
                      opts: EvalOptions = EvalOptions()) -> dict:
    """Score two feature files (table ``features``) with the official protocol; write the run folder.

    Files without pid/camid are joined on key with ``DST/manifests/split.parquet`` (rows of ``split``).
    Returns the metrics.json content.
    """
    split = opts.split
    dst = Storage(dst_url, opts.storage_options) if dst_url else None
    sets = []
    for role, path in (("query", query_features), ("gallery", gallery_features)):
        fs = read_features(path)
        if len(fs) == 0:
            raise UserError(f"{path} holds no features")
        if fs.pids is None or fs.camids is None:
            if dst is None:
                raise UserError(f"{path} has no pid/camid columns: give DST to join it with its split manifest")
            fs = join_split(fs, dst, split, role, path)
        sets.append(fs)
    meta = {"split": split, "dst": dst.url if dst else None, "query_features": str(query_features),
            "gallery_features": str(gallery_features), "label": Path(str(query_features)).stem}
    return _score_and_write(sets[0], sets[1], out_dir, meta, dst_url, opts)


def evaluate_checkpoint(dst_url: str, checkpoint: str, out_dir: str, opts: EvalOptions = EvalOptions(),
                        dtype: torch.dtype = torch.float32) -> dict:
    """Extract features of ``split`` with the network of ``checkpoint`` (any format of
    :data:`sysu30k.model.FORMATS`), score them, write the run folder; returns metrics.json.

    When the split's features fit ``opts.memory_budget`` they are held in memory and cached in ``out_dir``
    as ``features-<split>-<digest>.parquet``, keyed by everything that decides them
    (:func:`_feature_settings`) and reused only on an exact match that covers the split's images exactly.
    Otherwise the gallery is scored as it is extracted (:func:`stream_split`), the features written only
    with ``opts.save_features``."""
    split = opts.split
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise UserError(f"no checkpoint at {checkpoint}")
    rank, world, local_rank = distributed()
    dev = resolve_device(opts.device, local_rank)
    if world > 1 and opts.save_features:
        raise UserError("--save-features under torchrun: each rank holds part of the gallery; save them in one process")
    loaded = load_network(ckpt_path, opts.feature)
    height, width = opts.height or loaded.size[0], opts.width or loaded.size[1]
    if loaded.format != "sysu30k" and opts.decoder == "auto":
        opts = replace(opts, decoder="pil")      # the official script's pixels: Pillow, whole image, bicubic
        log.info("decoder: pil (the official preprocessing; --decoder dali to trade exactness for speed)")
    sha1 = _sha1(ckpt_path)                             # the file is read once for it
    digest = sha1[:12]
    out = Storage(out_dir)
    dst = Storage(dst_url, opts.storage_options)
    roles = split_roles(dst, split)
    settings = _feature_settings(sha1, dst, opts, height, width, dtype, loaded.feature)
    cache_rel = f"features-{split}-{hashlib.sha1(settings.encode()).hexdigest()[:12]}.parquet"
    network = loaded.network.to(dev)
    dim = _feature_dim(network, height, width, dev, dtype)
    need = (len(roles["query"]) + len(roles["gallery"])) * dim * 4
    meta = {"split": split, "dst": dst.url, "checkpoint": str(ckpt_path), "checkpoint_sha1": digest,
            "checkpoint_format": loaded.format, "feature": loaded.feature, "feature_dim": dim, "size": [height, width],
            "decoder": resolve_decoder(opts.decoder), "flip": opts.flip, "normalize": opts.normalize,
            "label": ckpt_path.stem}
    file_meta = {"checkpoint": str(ckpt_path), "checkpoint_sha1": digest, "split": split, "settings": settings}
    if need <= opts.memory_budget and world == 1:
        allf = _cached(out, cache_rel, settings, roles)
        if allf is None:
            allf = extract_split(network, dst_url, split, roles, dev, opts.batch, opts.workers, opts.flip,
                                 opts.normalize, height, width, opts.decoder, opts.storage_options, dtype)
            write_features(cache_rel, allf.keys, allf.pids, allf.camids, allf.feats, storage=out, metadata=file_meta)
            log.info("features: wrote %s", out.path(cache_rel))
        q, g = by_role(allf, roles)
        return _score_and_write(q, g, out_dir, {**meta, "features": cache_rel, "scoring": "in memory"}, dst_url, opts)
    log.info("features: %d images x %d-d need %.1f GB (--memory-budget %.1f GB), %d process(es): the gallery is "
             "scored as it is extracted", len(roles["query"]) + len(roles["gallery"]), dim, need / 1e9,
             opts.memory_budget / 1e9, world)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = (stack.enter_context(FeatureWriter(cache_rel, out, file_meta)) if opts.save_features else None)
        s = stream_split(network, dst_url, split, roles, dev, opts, height, width, dtype, writer, (rank, world))
    meta = {**meta, "features": cache_rel if opts.save_features else None, "scoring": "streamed", "device": str(dev),
            "chunk": None, "processes": world}
    if rank:
        return {"metrics": s.summary(), **meta}           # rank 0 writes the run folder
    metrics = write_run(out_dir, s, meta, dst_url=dst_url, show=opts.show, worst=opts.worst,
                        storage_options=opts.storage_options)
    log.info("extracted and scored %d queries against %d gallery images in %.1f s", len(roles["query"]),
             len(roles["gallery"]), time.perf_counter() - t0)
    return metrics


def _score_and_write(q: FeatureSet, g: FeatureSet, out_dir, meta, dst_url, opts: EvalOptions) -> dict:
    dev = resolve_device(opts.device)
    chunk = opts.chunk or auto_chunk(len(q), len(g), dev)
    t0 = time.perf_counter()
    s = score(q.feats, q.pids, q.camids, g.feats, g.pids, g.camids, query_keys=q.keys, gallery_keys=g.keys,
              chunk=chunk, device=dev)
    meta = {**meta, "device": str(dev), "chunk": chunk}
    metrics = write_run(out_dir, s, meta, dst_url=dst_url, show=opts.show, worst=opts.worst,
                        storage_options=opts.storage_options)
    log.info("scored %d queries against %d gallery images in %.1f s", len(q), len(g), time.perf_counter() - t0)
    return metrics


def _feature_dim(network: torch.nn.Module, height: int, width: int, dev: torch.device, dtype: torch.dtype) -> int:
    """The length of ``network``'s feature, from one forward pass of a blank image."""
    with torch.inference_mode():
        return int(network(torch.zeros(1, 3, height, width, device=dev, dtype=dtype)).flatten(1).shape[1])


def stream_split(network: torch.nn.Module, dst_url: str, split: str, roles: dict, dev: torch.device,
                 opts: EvalOptions, height: int, width: int, dtype: torch.dtype = torch.float32,
                 writer: FeatureWriter | None = None, part: tuple[int, int] = (0, 1)):
    """Extract and score ``split`` without holding the gallery's features: the queries first, then the
    gallery images that are some query's true match (:attr:`Scorer.matched`; on SYSU-30k the first shard
    or two), then every other gallery image, block by block. Memory: the queries' features and a few
    batches. ``writer`` receives every feature as it is made. Returns :class:`Scores`.

    ``part=(rank, world)`` under torchrun: every rank embeds the queries and the true matches (the
    thresholds), rank r the r-th share of the other gallery shards; the states are then summed
    (:meth:`Scorer.reduce`), with the numbers of one process."""
    rank, world = part
    options = LoaderOptions(decoder=opts.decoder, workers=opts.workers, storage_options=opts.storage_options)
    spec = TransformSpec(height=height, width=width, train=False)

    def batches(role: str, keys, share: tuple[int, int] = (0, 1)):
        loader = EvalLoader(dst_url, "train" if split == "val" else role, opts.batch, spec, options, flip=opts.flip,
                            keys=frozenset(keys), part=share)
        return iter_features(network, loader, dev, flip=opts.flip, normalize=opts.normalize, dtype=dtype)

    q = _collect(batches("query", roles["query"]), roles["query"], roles, split)
    gkeys = roles["gallery"]
    scorer = Scorer(q.feats, q.pids, q.camids, [roles["pid"][k] for k in gkeys], [roles["camid"][k] for k in gkeys],
                    q.keys, gkeys, device=dev)
    matched = [gkeys[i] for i in scorer.matched]
    m = _collect(batches("gallery", matched), matched, roles, split)
    scorer.add_matches(scorer.matched, m.feats, count=rank == 0)
    for fs in (q, m) if writer is not None else ():
        writer.write(fs.keys, fs.pids, fs.camids, fs.feats)
    index = {k: i for i, k in enumerate(gkeys)}
    for feats, keys, _, _ in batches("gallery", set(gkeys).difference(matched), (rank, world)):
        scorer.add([index[k] for k in keys], feats)
        if writer is not None:
            writer.write(keys, [roles["pid"][k] for k in keys], [roles["camid"][k] for k in keys], feats)
    scorer.reduce()
    lost = np.flatnonzero(scorer.seen == 0)
    if len(lost):
        raise IncompleteSplit(f"{len(lost)} gallery image(s) of the {split} split could not be read (damaged or "
                              f"missing in the shards), e.g. {gkeys[lost[0]]}: a score without them would not be "
                              "the split's")
    return scorer.result()


def _collect(batches, keys: list[str], roles: dict, split: str) -> FeatureSet:
    """The features of exactly ``keys``, in that order, from ``batches`` of :func:`iter_features`, labelled
    from the split manifest; an image that could not be embedded is an IncompleteSplit."""
    got: dict[str, torch.Tensor] = {}
    for feats, names, _, _ in batches:
        got.update(zip(names, feats))
    lost = [k for k in keys if k not in got]
    if lost:
        raise IncompleteSplit(f"{len(lost)} image(s) of the {split} split could not be read (damaged or missing in "
                              f"the shards), e.g. {lost[0]}: a score without them would not be the split's")
    dim = next(iter(got.values())).shape[0] if got else 0
    return FeatureSet(list(keys), np.array([roles["pid"][k] for k in keys], np.int64),
                      np.array([roles["camid"][k] for k in keys], np.int64),
                      torch.stack([got[k] for k in keys]) if keys else torch.zeros(0, dim))


def _feature_settings(checkpoint_sha1: str, dst: Storage, opts: EvalOptions, height: int, width: int,
                      dtype: torch.dtype, feature: str) -> str:
    """Everything that decides a split's features, as canonical JSON: the checkpoint's bytes, the dataset
    (its split manifest, and its shard list, which holds every tar's sha256), the split, the decoder and the
    extraction settings. Another DST, a re-split or a re-packed tree gives other settings."""
    def digest(rel: str) -> str | None:
        return hashlib.sha256(dst.read(rel)).hexdigest() if dst.exists(rel) else None

    return json.dumps({"checkpoint_sha1": checkpoint_sha1, "split_manifest": digest(manifests.relpath("split")),
                       "shards_manifest": digest(manifests.relpath("shards")), "split": opts.split,
                       "decoder": resolve_decoder(opts.decoder), "flip": opts.flip, "normalize": opts.normalize,
                       "size": [height, width], "dtype": str(dtype), "feature": feature},
                      sort_keys=True)


def _cached(out: Storage, rel: str, settings: str, roles: dict) -> FeatureSet | None:
    """The cached features at ``rel`` when they were made with exactly ``settings`` and hold exactly the
    split's images; None otherwise (extract again)."""
    if not out.exists(rel):
        return None
    try:
        with out.open(rel) as f:
            made_with = (pq.read_schema(f).metadata or {}).get(b"settings", b"").decode()
        cached = read_features(rel, out) if made_with == settings else None
    except (OSError, UserError, pa.ArrowInvalid):        # unreadable or damaged: extract again
        return None
    if cached is None or set(cached.keys) != set(roles["query"]) | set(roles["gallery"]):
        return None
    log.info("features: cached %s", out.path(rel))
    return cached


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_roles(dst: Storage, split: str, required: bool = True) -> dict | None:
    """``{"query": [keys], "gallery": [keys], "pid": {key: pid}, "camid": {key: camid}, "folder": {...}}`` of
    ``split``; when DST has no such split: a UserError, or None when not ``required``."""
    rel = manifests.relpath("split")
    t = (dst.read_table(rel, columns=["split", "role", "key", "pid", "camid", "folder"],
                      filters=[("split", "=", split)]) if dst.exists(rel) else None)
    if t is None or t.num_rows == 0:
        if not required:
            return None
        if t is None:
            raise UserError(f"{dst.url} has no {rel}: run `sysu30k split` first")
        raise UserError(f"{dst.url}/{rel} has no {split} split"
                        + (" (run `sysu30k split --val-folders N`)" if split == "val" else ""))
    cols = {c: t[c].to_pylist() for c in ("role", "key", "pid", "camid", "folder")}
    out = {"query": [], "gallery": [], "pid": {}, "camid": {}, "folder": set()}
    for role, key, pid, cam, folder in zip(*(cols[c] for c in ("role", "key", "pid", "camid", "folder"))):
        out[role].append(key)
        out["pid"][key], out["camid"][key] = pid, cam
        if folder is not None:
            out["folder"].add(folder)
    return out


def extract_split(model: torch.nn.Module, dst_url: str, split: str, roles: dict, dev: torch.device, batch: int = 128,
                  workers: int = 2, flip: bool = True, normalize: bool = True, height: int = 256, width: int = 128,
                  decoder: str = "auto", storage_options: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> FeatureSet:
    """Features of every query and gallery image of ``split`` (val images live in the training shards),
    in role order; images that cannot be read are left out with a warning."""
    options = LoaderOptions(decoder=decoder, workers=workers, storage_options=storage_options or {})
    spec = TransformSpec(height=height, width=width, train=False)
    parts = []
    for role in ("query", "gallery"):
        loader = EvalLoader(dst_url, "train" if split == "val" else role, batch, spec, options, flip=flip,
                            keys=frozenset(roles[role]))
        parts.append(_collect(iter_features(model, loader, dev, flip=flip, normalize=normalize, dtype=dtype),
                              roles[role], roles, split))
    return FeatureSet(parts[0].keys + parts[1].keys, np.concatenate([p.pids for p in parts]),
                      np.concatenate([p.camids for p in parts]), torch.cat([p.feats for p in parts]))


def evaluate_split(model: torch.nn.Module, dst_url: str, split: str, device: torch.device, height: int = 256,
                   width: int = 128, batch: int = 128, workers: int = 2, storage_options: dict | None = None,
                   flip: bool = True, decoder: str = "auto") -> dict | None:
    """The summary metrics (rank-1/5/10/20, both mAPs) of ``model`` on ``split`` of DST, or None when DST
    has no such split: the trainer's per-epoch validation. Writes nothing."""
    roles = split_roles(Storage(dst_url, storage_options), split, required=False)
    if roles is None or not roles["query"]:
        return None
    q, g = by_role(extract_split(model, dst_url, split, roles, device, batch, workers, flip, height=height,
                                 width=width, decoder=decoder, storage_options=storage_options), roles)
    return score(q.feats, q.pids, q.camids, g.feats, g.pids, g.camids, query_keys=q.keys, gallery_keys=g.keys,
                 device=device).summary()


def by_role(allf: FeatureSet, roles: dict) -> tuple[FeatureSet, FeatureSet]:
    """The query and the gallery part of a split's features."""
    index = {k: i for i, k in enumerate(allf.keys)}
    out = []
    for role in ("query", "gallery"):
        keys = roles[role]
        missing = [k for k in keys if k not in index]
        if missing or not keys:
            raise UserError(f"the features lack {len(missing)} {role} image(s) of this split, e.g. "
                            f"{missing[0] if missing else '(none in the split)'}")
        rows = torch.as_tensor([index[k] for k in keys])
        out.append(FeatureSet(keys, allf.pids[rows.numpy()], allf.camids[rows.numpy()], allf.feats[rows]))
    return out[0], out[1]
