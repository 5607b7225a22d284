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
from .config import PRECISIONS, EvalOptions
from .features import (
    FeatureFile,
    FeatureSet,
    FeatureWriter,
    autocast,
    iter_features,
    join_labels,
    join_split,
    merge_features,
    read_features,
    write_features,
)
from .reports import write_run
from .rerank import rerank_score
from .scoring import Scorer, Scores, auto_chunk, score

log = logging.getLogger("sysu30k")


class IncompleteSplit(UserError):
    """Images of the split could not be embedded: a score without them would not be the split's."""


def evaluate_features(dst_url: str | None, query_features: str, gallery_features: str, out_dir: str,
                      opts: EvalOptions = EvalOptions()) -> dict:
    """Score two feature files (table ``features``) with the official protocol; write the run folder.

    Files without pid/camid are joined on key with ``DST/manifests/split.parquet`` (rows of ``split``).
    When both files' features exceed ``opts.memory_budget`` the gallery file is read a batch of rows at a
    time (:func:`score_file`), with the numbers and refusals of the in-memory path. Returns metrics.json.
    """
    split = opts.split
    dst = Storage(dst_url, opts.storage_options) if dst_url else None

    def labelled(fs: FeatureSet, role: str, path: str) -> FeatureSet:
        if len(fs) == 0:
            raise UserError(f"{path} holds no features")
        if fs.pids is None or fs.camids is None:
            if dst is None:
                raise UserError(f"{path} has no pid/camid columns: give DST to join it with its split manifest")
            fs = join_split(fs, dst, split, role, path)
        return fs

    q = labelled(read_features(query_features), "query", query_features)
    meta = {"split": split, "dst": dst.url if dst else None, "query_features": str(query_features),
            "gallery_features": str(gallery_features), "label": Path(str(query_features)).stem}
    with FeatureFile(gallery_features) as gfile:
        need = q.feats.numel() * 4 + gfile.nbytes
        if need > opts.memory_budget:
            _refuse_rerank(opts, need)
            log.info("features: %.1f GB (--memory-budget %.1f GB): the gallery file is scored as it is read",
                     need / 1e9, opts.memory_budget / 1e9)
            dev = resolve_device(opts.device)
            chunk = opts.chunk or auto_chunk(len(q), gfile.rows, dev)
            t0 = time.perf_counter()
            s = score_file(q, gfile, dst, split, chunk, dev)
            metrics = write_run(out_dir, s, {**meta, "scoring": "streamed", "device": str(dev), "chunk": chunk},
                                dst_url=dst_url, show=opts.show, worst=opts.worst,
                                storage_options=opts.storage_options)
            log.info("scored %d queries against %d gallery images in %.1f s", len(q), gfile.rows,
                     time.perf_counter() - t0)
            return metrics
    g = labelled(read_features(gallery_features), "gallery", gallery_features)
    return _score_and_write(q, g, out_dir, {**meta, "scoring": "in memory"}, dst_url, opts)


def score_file(q: FeatureSet, gfile: FeatureFile, dst: Storage | None, split: str, chunk: int,
               device: torch.device) -> Scores:
    """Score the labelled queries ``q`` against the gallery file ``gfile`` without holding its vectors: its
    labels (joined with ``split`` of DST when it has none), then the blocks :func:`score` would make of it,
    read as they are scored. Any refusal is the in-memory path's for the same files (the first fault in its
    order: vectors missing or of two lengths, bad keys or labels, NaN or inf, then the blocks' own)."""
    try:
        keys, pids, camids = gfile.labels()
        if pids is None or camids is None:
            if dst is None:
                raise UserError(f"{gfile.path} has no pid/camid columns: give DST to join it with its split manifest")
            pids, camids = join_labels(keys, pids, camids, dst, split, "gallery", gfile.path)
    except UserError as exc:
        raise gfile.fault() or exc from None
    s = Scorer(q.feats, q.pids, q.camids, pids, camids, q.keys, keys, device=device)
    try:
        if len(s.matched):
            s.add_matches(s.matched, gfile.take(s.matched))
        for rows, feats in gfile.blocks(np.setdiff1d(np.arange(gfile.rows), s.matched), chunk):
            s.add(rows, feats)
    except UserError as exc:                    # in memory, the whole file's NaN check comes before any block
        raise gfile.fault(keys) or exc from None
    return s.result()


def evaluate_checkpoint(dst_url: str, checkpoint: str, out_dir: str, opts: EvalOptions = EvalOptions()) -> dict:
    """Extract features of ``split`` with the network of ``checkpoint`` (any format of
    :data:`sysu30k.model.FORMATS`), score them, write the run folder; returns metrics.json.

    When the split's features fit ``opts.memory_budget`` they are held in memory and cached in ``out_dir``
    as ``features-<split>-<digest>.parquet``, keyed by everything that decides them
    (:func:`_feature_settings`) and reused only on an exact match that covers the split's images exactly.
    Otherwise the gallery is scored as it is extracted (:func:`stream_split`), the features written only
    with ``opts.save_features``."""
    split = opts.split
    dtype = getattr(torch, PRECISIONS[opts.precision])
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise UserError(f"no checkpoint at {checkpoint}")
    rank, world, local_rank = distributed(opts.device)
    dev = resolve_device(opts.device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)                  # this rank's GPU for the collectives (Scorer.reduce)
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
    decoder = resolve_decoder(opts.decoder, dev)
    settings = _feature_settings(sha1, dst, opts, height, width, dtype, loaded.feature, decoder)
    cache_rel = f"features-{split}-{hashlib.sha1(settings.encode()).hexdigest()[:12]}.parquet"
    network = loaded.network.to(dev)
    dim = _feature_dim(network, height, width, dev, dtype)
    need = (len(roles["query"]) + len(roles["gallery"])) * dim * 4
    meta = {"split": split, "dst": dst.url, "checkpoint": str(ckpt_path), "checkpoint_sha1": digest,
            "checkpoint_format": loaded.format, "feature": loaded.feature, "feature_dim": dim, "size": [height, width],
            "decoder": decoder, "flip": opts.flip, "normalize": opts.normalize, "precision": opts.precision,
            "label": ckpt_path.stem}
    file_meta = {"checkpoint": str(ckpt_path), "checkpoint_sha1": digest, "split": split, "settings": settings}
    if opts.rerank and not opts.normalize:
        raise UserError("--rerank needs L2-normalised features: drop --no-normalize")
    if need > opts.memory_budget or world > 1:
        _refuse_rerank(opts, need, world)
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
    save = (out, cache_rel, file_meta) if opts.save_features else None
    s = stream_split(network, dst_url, split, roles, dev, opts, height, width, dtype, save, (rank, world))
    meta = {**meta, "features": cache_rel if opts.save_features else None, "scoring": "streamed", "device": str(dev),
            "chunk": None, "processes": world}
    if rank:
        return {"metrics": s.summary(), **meta}           # rank 0 writes the run folder
    metrics = write_run(out_dir, s, meta, dst_url=dst_url, show=opts.show, worst=opts.worst,
                        storage_options=opts.storage_options)
    log.info("extracted and scored %d queries against %d gallery images in %.1f s", len(roles["query"]),
             len(roles["gallery"]), time.perf_counter() - t0)
    return metrics


def _refuse_rerank(opts: EvalOptions, need: int, world: int = 1) -> None:
    """A one-line refusal of ``--rerank`` where the features would be streamed (re-ranking needs them all)."""
    if not opts.rerank:
        return
    if world > 1:
        raise UserError("--rerank runs in one process (it needs every feature at once): run eval without torchrun")
    raise UserError(f"--rerank needs the query and gallery features in memory ({need / 1e9:.1f} GB): raise "
                    f"--memory-budget to at least {need / 1e9:.1f}GB (the re-ranking itself adds about 1 GB)")


def _score_and_write(q: FeatureSet, g: FeatureSet, out_dir, meta, dst_url, opts: EvalOptions) -> dict:
    dev = resolve_device(opts.device)
    chunk = opts.chunk or auto_chunk(len(q), len(g), dev)
    t0 = time.perf_counter()
    s = score(q.feats, q.pids, q.camids, g.feats, g.pids, g.camids, query_keys=q.keys, gallery_keys=g.keys,
              chunk=chunk, device=dev)
    meta = {**meta, "device": str(dev), "chunk": chunk}
    if opts.rerank:
        meta["rerank"] = _reranked(q, g, opts.rerank, dev)
    metrics = write_run(out_dir, s, meta, dst_url=dst_url, show=opts.show, worst=opts.worst,
                        storage_options=opts.storage_options)
    log.info("scored %d queries against %d gallery images in %.1f s", len(q), len(g), time.perf_counter() - t0)
    return metrics


def _reranked(q: FeatureSet, g: FeatureSet, params: tuple[int, int, float], dev: torch.device) -> dict:
    """metrics.json's ``rerank`` section: the k-reciprocal re-ranked metrics of ``q`` against ``g`` (exact,
    :mod:`sysu30k.evaluation.rerank`), the parameters, the time per stage and the sizes of the sets used."""
    k1, k2, lam = params
    t0 = time.perf_counter()
    log.info("re-ranking %d queries against %d gallery images (k1=%d, k2=%d, lambda=%g)", len(q), len(g), k1, k2, lam)
    rs, stats = rerank_score(q.feats, q.pids, q.camids, g.feats, g.pids, g.camids, k1, k2, lam, query_keys=q.keys,
                             gallery_keys=g.keys, device=dev)
    n_match = int((rs.first_rank >= 0).sum())
    return {"k1": k1, "k2": k2, "lambda": lam, "metrics": rs.summary(), "cmc": [float(c) for c in rs.cmc],
            "queries_with_match": n_match, "seconds": round(time.perf_counter() - t0, 3),
            "stages_s": {k[:-2]: round(v, 3) for k, v in stats.items() if k.endswith("_s")},
            "sets": {k: v for k, v in stats.items() if not k.endswith("_s")}}


def _feature_dim(network: torch.nn.Module, height: int, width: int, dev: torch.device, dtype: torch.dtype) -> int:
    """The length of ``network``'s feature, from one forward pass of a blank image."""
    with torch.inference_mode(), autocast(dev, dtype):
        return int(network(torch.zeros(1, 3, height, width, device=dev)).flatten(1).shape[1])


def stream_split(network: torch.nn.Module, dst_url: str, split: str, roles: dict, dev: torch.device,
                 opts: EvalOptions, height: int, width: int, dtype: torch.dtype = torch.float32,
                 save: tuple[Storage, str, dict] | None = None, part: tuple[int, int] = (0, 1)):
    """Extract and score ``split`` without holding the gallery's features: the queries first, then the
    gallery images that are some query's true match (:attr:`Scorer.matched`; on SYSU-30k the first shard
    or two), then every other gallery image, block by block. Memory: the queries' features and a few
    batches. ``save=(storage, rel, metadata)``: every feature is also written, as it is made, to the
    feature file ``rel``. Returns :class:`Scores`.

    ``part=(rank, world)`` under torchrun: every rank embeds the queries and the true matches (the
    thresholds), rank r the r-th share of the other gallery shards; the states are then summed
    (:meth:`Scorer.reduce`), with the numbers of one process. The saved file is too (:func:`_join_parts`)."""
    rank, world = part
    options = LoaderOptions(decoder=opts.decoder, workers=opts.workers, storage_options=opts.storage_options,
                            device=str(dev))
    spec = TransformSpec(height=height, width=width, train=False)

    def loader(role: str, keys, share: tuple[int, int] = (0, 1)) -> EvalLoader:
        return EvalLoader(dst_url, "train" if split == "val" else role, opts.batch, spec, options, flip=opts.flip,
                          keys=frozenset(keys), part=share)

    def batches(role: str, keys, share: tuple[int, int] = (0, 1)):
        return iter_features(network, loader(role, keys, share), dev, flip=opts.flip, normalize=opts.normalize,
                             dtype=dtype)

    with contextlib.ExitStack() as stack:
        writer = (stack.enter_context(FeatureWriter(_part_rel(save[1], rank, world), save[0], save[2]))
                  if save is not None else None)
        q = _collect(batches("query", roles["query"]), roles["query"], roles, split)
        gkeys = roles["gallery"]
        scorer = Scorer(q.feats, q.pids, q.camids, [roles["pid"][k] for k in gkeys],
                        [roles["camid"][k] for k in gkeys], q.keys, gkeys, device=dev)
        matched = [gkeys[i] for i in scorer.matched]
        m = _collect(batches("gallery", matched), matched, roles, split)
        scorer.add_matches(scorer.matched, m.feats, count=rank == 0)
        for fs in (q, m) if writer is not None and rank == 0 else ():
            writer.write(fs.keys, fs.pids, fs.camids, fs.feats)
        index = {k: i for i, k in enumerate(gkeys)}
        rest = set(gkeys).difference(matched)
        for feats, keys, _, _ in batches("gallery", rest, (rank, world)):
            scorer.add([index[k] for k in keys], feats)
            if writer is not None:
                writer.write(keys, [roles["pid"][k] for k in keys], [roles["camid"][k] for k in keys], feats)
        scorer.reduce()
        lost = np.flatnonzero(scorer.seen == 0)
        if len(lost):
            raise IncompleteSplit(f"{len(lost)} gallery image(s) of the {split} split could not be read (damaged or "
                                  f"missing in the shards), e.g. {gkeys[lost[0]]}: a score without them would not "
                                  "be the split's")
    if save is not None and world > 1:
        _join_parts(*save[:2], part, dev, lambda: [*q.keys, *matched, *_loader_order(loader("gallery", rest))])
    return scorer.result()


def _part_rel(rel: str, rank: int, world: int) -> str:
    """Where rank ``rank`` of ``world`` writes its share of the feature file ``rel`` (``rel`` itself in one
    process)."""
    return rel if world == 1 else f"{rel}.rank{rank}-of-{world}"


def _join_parts(store: Storage, rel: str, part: tuple[int, int], dev: torch.device, order) -> None:
    """Once every rank's part of ``rel`` is written, rank 0 joins them into ``rel`` with the rows in the
    order one process writes them (``order()``: the keys), then removes them. The parts must be on storage
    that every rank writes to and rank 0 reads (e.g. one machine's disk, or an object store)."""
    import torch.distributed as dist

    rank, world = part
    dist.barrier(device_ids=[dev.index] if dist.get_backend() == "nccl" else None)
    if rank:
        return
    parts = [_part_rel(rel, r, world) for r in range(world)]
    try:
        unseen = [p for p in parts if not store.exists(p)]
        if unseen:
            raise UserError(f"--save-features under torchrun: rank 0 does not see {store.path(unseen[0])}, written "
                            "by another rank: give an --out that every rank shares")
        merge_features(store, parts, rel, order())
        log.info("features: wrote %s (joined from %d ranks)", store.path(rel), world)
    finally:
        for p in parts:
            store.remove(p)


def _loader_order(loader: EvalLoader) -> list[str]:
    """The keys in the order a pass over ``loader`` yields them: torch's DataLoader takes one batch from
    each worker's stream in turn (a finished stream drops out); each stream holds whole shards in order."""
    streams = [[k for s in stream for k in loader.catalog[s].key] for stream in loader.streams]
    b = loader.batch_size
    rounds = max((len(keys) + b - 1) // b for keys in streams)
    return [k for r in range(rounds) for keys in streams for k in keys[r * b:(r + 1) * b]]


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
                      dtype: torch.dtype, feature: str, decoder: str) -> str:
    """Everything that decides a split's features, as canonical JSON: the checkpoint's bytes, the dataset
    (its split manifest, and its shard list, which holds every tar's sha256), the split, the decoder that
    runs and the extraction settings. Another DST, a re-split or a re-packed tree gives other settings."""
    def digest(rel: str) -> str | None:
        return hashlib.sha256(dst.read(rel)).hexdigest() if dst.exists(rel) else None

    return json.dumps({"checkpoint_sha1": checkpoint_sha1, "split_manifest": digest(manifests.relpath("split")),
                       "shards_manifest": digest(manifests.relpath("shards")), "split": opts.split,
                       "decoder": decoder, "flip": opts.flip, "normalize": opts.normalize,
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
    options = LoaderOptions(decoder=decoder, workers=workers, storage_options=storage_options or {}, device=str(dev))
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
