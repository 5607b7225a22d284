"""The loader API used by the trainer and the evaluator.

``TrainLoader`` yields bag-structured batches for one epoch at a time; ``EvalLoader`` yields the images of
a test or validation subset in order. Both read whole shards per stream (one stream per DDP rank ×
DataLoader worker), decode with Pillow-SIMD in the workers or with DALI (GPU ``mixed`` decoding when
CUDA is present, the same graph on the CPU otherwise), and hand out :class:`Batch` objects whose images
are uint8 NCHW until ``Batch.to`` moves and normalises them on the training device (for training on the
CPU, Pillow workers hand out normalised float32 already). Pillow workers write batches into reused
shared-memory slots (:mod:`.slots`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..io.storage import Storage
from ..io.tuning import tune_malloc
from ..split.holdout import excluded_folders, training_bags
from . import decode_pil
from .catalog import ShardEntries, assign_streams, load_catalog
from .config import DECODERS, decoder_field
from .decode_dali import DEPTH, THREADS, DaliDecoder
from .groups import GroupSpec, group_batches, plan_group_epoch
from .sampler import BagIndex, BagSpec, BatchPlan, batches_for, plan_epoch
from .shards import ShardReader, member
from .slots import SlotPool
from .transforms import AugParams, TransformSpec, draw_params, normalize_, place

log = logging.getLogger("sysu30k")
@dataclass
class Batch:
    """One batch. ``images`` is uint8 [N,3,H,W] (channels-last memory) until :meth:`to` normalises it."""

    images: torch.Tensor
    keys: list[str]
    valid: torch.Tensor                       # bool [N]: False for padding slots and damaged images
    folder: torch.Tensor                      # int64 [N]: training folder id, -1 for test images
    bag: torch.Tensor | None = None           # int64 [N]: bag index within the batch
    bag_labels: torch.Tensor | None = None    # int64 [N, L]: folder ids of the image's bag, -1 padded
    pid: torch.Tensor | None = None           # int64 [N]: test identity
    camid: torch.Tensor | None = None         # int64 [N]
    flipped: torch.Tensor | None = None       # uint8 [N,3,H,W]: the horizontally flipped copy (eval)
    damaged: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Batch:
        """Move to ``device``; uint8 images become ImageNet-normalised ``dtype`` there (per channel, in
        place); images the workers normalised already are only moved and cast."""
        def norm(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = x.to(device, non_blocking=True)
            if x.dtype != torch.uint8 or dtype == torch.uint8:
                return x.to(dtype)
            return normalize_(torch.empty(x.shape, dtype=torch.float32, device=x.device), x).to(dtype)

        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items() if k not in ("images", "flipped")}
        return Batch(images=norm(self.images), flipped=norm(self.flipped), **moved)

PREFETCH = 2          # batches each DataLoader worker keeps ready


@dataclass(frozen=True)
class LoaderOptions:
    """How to read: decoder, processes, prefetching, the DDP position, storage options."""

    decoder: str = decoder_field()
    workers: int = 2
    prefetch_shards: int = 2
    cache_dir: str | None = None
    rank: int = 0
    world: int = 1
    storage_options: dict = field(default_factory=dict)
    seed: int = 0
    normalize: bool | None = None     # float32 from the workers; None: when the batches are for the CPU
    device: str | None = None         # where the batches go (the training device); None: the GPU when present
    dali_threads: int = THREADS       # DALI's CPU threads
    dali_depth: int = DEPTH           # batches DALI decodes ahead

    def target(self) -> torch.device:
        """The device the batches are for: ``device``, else this rank's GPU when there is one."""
        from ..io.device import resolve_device

        return resolve_device(self.device)

    def normalize_in_workers(self, decoder: str) -> bool:
        """Pillow batches are normalised by the workers for a CPU target; a GPU normalises uint8 itself."""
        wanted = (self.target().type == "cpu") if self.normalize is None else self.normalize
        return wanted and decoder == "pil"


def resolve_decoder(name: str, device: torch.device | str | None = None) -> str:
    """``auto``: DALI when it can decode on the GPU the batches are for (``device``; None: the GPU when there
    is one), else Pillow-SIMD (faster than DALI on the CPU)."""
    if name not in DECODERS:
        from ..errors import UserError

        raise UserError(f"--decoder must be one of {', '.join(DECODERS)}")
    if name != "auto":
        return name
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pil"
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "dali" if on_gpu else "pil"


def _to_nchw(images: torch.Tensor) -> torch.Tensor:
    """[N,H,W,3] uint8 as an [N,3,H,W] tensor in channels-last memory (no copy); float32 batches that
    the workers normalised are NCHW already."""
    return images.permute(0, 3, 1, 2) if images.shape[-1] == 3 and images.dtype == torch.uint8 else images


def _layout(n: int, spec: TransformSpec, normalize: bool) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of a Pillow worker's batch of ``n``: normalised float32 NCHW, or uint8 NHWC."""
    if normalize:
        return (n, 3, spec.height, spec.width), torch.float32
    return (n, spec.height, spec.width, 3), torch.uint8


def _pool(workers: int, batch_size: int, spec: TransformSpec, normalize: bool) -> SlotPool:
    """Slots for a worker's batches in flight, the one the consumer holds and the one it is dropping."""
    return SlotPool(max(1, workers), PREFETCH + 2, *_layout(batch_size, spec, normalize))


def _received(raw: dict, pool: SlotPool) -> torch.Tensor:
    """The images of a batch a Pillow worker sent: a tensor over its slot, or the tensor itself."""
    return pool.hand_out(raw["slot"]) if raw["slot"] is not None else raw["images"]


def _as_is(batch: dict) -> dict:
    """DataLoader collate: batches are whole already (image tensors travel through shared memory)."""
    return batch


def _data_loader(dataset: torch.utils.data.IterableDataset, workers: int) -> torch.utils.data.DataLoader:
    """The DataLoader over our streams: whole batches, ``PREFETCH`` per worker."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       prefetch_factor=PREFETCH if workers else None, persistent_workers=False)


class _Materializer:
    """Turns a batch plan into arrays in a worker: reads member bytes, checks sha256, decodes."""

    def __init__(self, dst_url: str, options: dict, catalog: list[ShardEntries], order: list[int],
                 spec: TransformSpec, raw: bool, prefetch: int, cache_dir: str | None, sequential: bool = True):
        """``sequential``: shards are needed in ``order`` (released behind the reader); otherwise any
        shard may be needed again (identity sampling), so every shard stays mapped."""
        self.catalog, self.spec, self.raw, self.sequential = catalog, spec, raw, sequential
        self.position = {c: i for i, c in enumerate(order)}
        self.reader = ShardReader(Storage(dst_url, options), [catalog[c].shard for c in order], prefetch, cache_dir)
        self.scratch = np.empty((spec.height, spec.width, 3), np.uint8)

    def payloads(self, shard: np.ndarray, row: np.ndarray) -> list[bytes | None]:
        out = []
        for s, r in zip(shard.tolist(), row.tolist()):
            if s not in self.position:                 # padding of a stream with no shards
                out.append(None)
                continue
            e = self.catalog[s]
            out.append(member(self.reader.get(self.position[s]), int(e.offset[r]), int(e.size[r]), e.sha256[r]))
        if self.position and self.sequential:
            first = min((self.position[s] for s in shard.tolist() if s in self.position), default=0)
            self.reader.release_before(first)
        return out

    def decode_batch(self, pool: SlotPool | None, worker: int, shard: np.ndarray, row: np.ndarray,
                     datas: list[bytes | None], params: AugParams, keys: list[str],
                     normalize: bool) -> tuple[dict, list[str]]:
        """Decode a batch into a free slot of ``worker`` in ``pool`` (else fresh memory): the ``slot`` and
        ``images`` entries of the batch sent to the main process, and the damaged keys."""
        slot = pool.acquire(worker) if pool is not None and pool.buffers.shape[1] == len(keys) else None
        if slot is not None:
            images = pool.buffers[slot]
        else:
            shape, dtype = _layout(len(keys), self.spec, normalize)
            images = torch.empty(shape, dtype=dtype)
        damaged = self._decode_into(images, datas, self._sizes(shard, row), params, keys)
        return {"slot": slot, "images": images if slot is None else None}, damaged

    def _sizes(self, shard: np.ndarray, row: np.ndarray) -> list[tuple[int, int] | None]:
        """The packed (width, height) of each image as the manifest records it, for images whose bytes
        ``payloads`` checks against a sha256 (None otherwise: the decoder reads the header)."""
        out = []
        for s, r in zip(shard.tolist(), row.tolist()):
            e = self.catalog[s] if s in self.position else None
            known = e is not None and e.width is not None and e.sha256[r] is not None
            out.append((int(e.width[r]), int(e.height[r])) if known else None)
        return out

    def _decode_into(self, out: torch.Tensor, datas: list[bytes | None], sizes: list[tuple[int, int] | None],
                     params: AugParams, keys: list[str]) -> list[str]:
        """Decode and augment each image into ``out`` (uint8 [N,H,W,3], or float32 [N,3,H,W] normalised
        image by image while it is in cache); slots without an image are black. Returns the damaged keys."""
        as_uint8 = out.dtype == torch.uint8
        arrays = out.numpy() if as_uint8 else None
        damaged = []
        for i, data in enumerate(datas):
            dst = arrays[i] if as_uint8 else self.scratch
            try:
                if data is None:
                    dst.fill(0)
                else:
                    place(dst, decode_pil.decode(data, self.spec, sizes[i]), i, params, self.spec)
            except Exception:  # a member that no longer decodes: skipped and reported, never fatal
                damaged.append(keys[i])
                dst.fill(0)
            if not as_uint8:
                normalize_(out[i], torch.from_numpy(dst).permute(2, 0, 1))
        return damaged


class _TrainStreams(torch.utils.data.IterableDataset):
    """The streams of one rank; each DataLoader worker iterates its own stream."""

    def __init__(self, loader: TrainLoader, epoch: int, skips: list[int], rotate: int, pool: SlotPool | None):
        self.l, self.epoch, self.skips, self.rotate, self.pool = loader, epoch, skips, rotate, pool

    def __iter__(self) -> Iterator[dict]:
        tune_malloc()
        info = torch.utils.data.get_worker_info()
        ld = self.l
        worker = info.id if info is not None else 0
        w = (worker + self.rotate) % ld.n_workers
        sid = ld.options.rank * ld.n_workers + w
        rng = np.random.default_rng([ld.options.seed, self.epoch, sid])
        order, plans = ld._stream(sid, self.epoch, rng)
        mat = _Materializer(ld.dst_url, ld.options.storage_options, ld.catalog, order, ld.transform, ld.raw,
                            ld.options.prefetch_shards, ld.options.cache_dir, sequential=ld.sequential)
        try:
            for b, plan in enumerate(plans):
                params = draw_params(len(plan.valid), ld.transform, rng)
                if b < self.skips[w]:
                    continue
                yield self._batch(plan, params, mat, worker)
        finally:
            mat.reader.close()

    def _batch(self, plan: BatchPlan, params: AugParams, mat: _Materializer, worker: int) -> dict:
        cat = self.l.catalog
        keys = [cat[s].key[r] for s, r in zip(plan.shard.tolist(), plan.row.tolist())]
        datas = mat.payloads(plan.shard, plan.row) if plan.valid.any() else [None] * len(keys)
        bad = {keys[i] for i, d in enumerate(datas) if d is None and plan.valid[i]}
        valid = plan.valid & np.array([d is not None for d in datas])
        width = max(1, max((len(x) for x in plan.labels), default=1))
        labels = np.full((len(plan.labels) or 1, width), -1, np.int64)
        for i, lab in enumerate(plan.labels):
            labels[i, :len(lab)] = lab
        out = {"keys": keys, "valid": valid, "bag": plan.bag.astype(np.int64),
               "bag_labels": labels[plan.bag], "params": params,
               "folder": np.array([cat[s].folder[r] for s, r in zip(plan.shard.tolist(), plan.row.tolist())],
                                  np.int64)}
        if mat.raw:
            out["datas"] = datas
        else:
            sent, damaged = mat.decode_batch(self.pool, worker, plan.shard, plan.row, datas, params, keys,
                                             self.l.normalize)
            out.update(sent)
            bad |= set(damaged)
            out["valid"] = valid & np.array([k not in damaged for k in keys])
        out["damaged"] = sorted(bad)
        return out


def manifest_bags(dst_url: str, storage_options: dict, excluded: frozenset[int],
                  catalog: list[ShardEntries]) -> BagIndex:
    """The training bags of DST's ``bags.parquet`` (without those touching held-out folders) as a
    :class:`BagIndex`; a folder with images that no bag holds forms a bag of its own, with a warning."""
    table = training_bags(dst_url, storage_options, excluded)
    folders = [tuple(int(f) for f in fs if f.isascii() and f.isdigit()) for fs in table["folders"].to_pylist()]
    labels = [tuple(int(x) for x in lab) for lab in table["label"].to_pylist()]
    index = BagIndex.build(folders, labels)
    alone = sorted({int(f) for c in catalog for f in np.unique(c.folder)} - set(index.of_folder))
    if alone:
        log.warning("%d training folder(s) are in no bag of bags.parquet (e.g. %d): each is a bag of its own",
                    len(alone), alone[0])
        index = BagIndex.build(folders + [(f,) for f in alone], labels + [(f,) for f in alone])
    return index


class TrainLoader:
    """Bag-structured training batches from DST, one epoch per iteration, resumable mid-epoch."""

    def __init__(self, dst_url: str, bags: BagSpec = BagSpec(), transform: TransformSpec = TransformSpec(),
                 options: LoaderOptions = LoaderOptions(), exclude_folders: frozenset[int] | None = None):
        """``exclude_folders`` defaults to the folders ``sysu30k split`` held out for validation."""
        self.bags = bags
        self._setup(dst_url, transform, options, exclude_folders)
        self.bag_index = manifest_bags(dst_url, options.storage_options, self.excluded, self.catalog)
        self.streams = assign_streams(self.catalog, options.world * self.n_workers)
        counts = [batches_for(sum(len(self.catalog[i]) for i in s), bags) for s in self.streams]
        per_rank = [sum(counts[r * self.n_workers:(r + 1) * self.n_workers]) for r in range(options.world)]
        self.targets = list(counts)
        for r, c in enumerate(per_rank):            # every rank yields the same number of batches
            self.targets[r * self.n_workers] += max(per_rank) - c
        self.batches_per_epoch = max(per_rank) if per_rank else 0
        self.batch_size = bags.batch_size
        self.sequential = True

    def _setup(self, dst_url: str, transform: TransformSpec, options: LoaderOptions,
               exclude_folders: frozenset[int] | None) -> None:
        """Decoder, catalog of the training images (without the held-out folders) and position."""
        self.dst_url, self.transform, self.options = dst_url, transform, options
        self.device = options.target()
        self.decoder = resolve_decoder(options.decoder, self.device)
        self.raw = self.decoder == "dali"
        self.normalize = options.normalize_in_workers(self.decoder)
        if exclude_folders is None:
            exclude_folders = frozenset(excluded_folders(dst_url, options.storage_options))
        self.excluded = exclude_folders
        self.catalog = load_catalog(Storage(dst_url, options.storage_options), "train", self.excluded)
        self.n_workers = max(1, options.workers)
        self.epoch, self.consumed = 0, 0
        self.damaged: list[str] = []
        self.dali: DaliDecoder | None = None

    def _stream(self, sid: int, epoch: int, rng: np.random.Generator) -> tuple[list[int], Iterator[BatchPlan]]:
        """The shards stream ``sid`` reads and its batch plans for ``epoch``."""
        order = self.streams[sid]
        return order, plan_epoch(self.catalog, order, self.bags, rng, self.targets[sid], self.bag_index)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        """Where the loader is: restoring it continues the epoch with the very next batch."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.options.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def _worker_skips(self) -> tuple[list[int], int]:
        """Batches each stream already delivered, given the DataLoader's round-robin over workers, and
        the stream whose turn is next (it becomes worker 0 of the resumed DataLoader)."""
        own = self.targets[self.options.rank * self.n_workers:(self.options.rank + 1) * self.n_workers]
        skips, w, left = [0] * self.n_workers, 0, self.consumed
        while left > 0:
            if skips[w] < own[w]:
                skips[w] += 1
                left -= 1
            w = (w + 1) % self.n_workers
        return skips, w

    def __iter__(self) -> Iterator[Batch]:
        pool = None if self.raw else _pool(self.options.workers, self.batch_size, self.transform, self.normalize)
        dataset = _TrainStreams(self, self.epoch, *self._worker_skips(), pool)
        data = _data_loader(dataset, self.options.workers)
        if self.consumed == 0:
            self.damaged = []
        for raw, images, failed in self._decoded(data, pool):
            batch = self._finish(raw, images, failed)
            self.consumed += 1
            self.damaged += batch.damaged
            yield batch
        if self.damaged:
            log.warning("epoch %d: skipped %d damaged image(s): %s", self.epoch, len(self.damaged),
                        ", ".join(self.damaged[:10]) + (" ..." if len(self.damaged) > 10 else ""))

    @property
    def pin_memory(self) -> bool:
        """Pillow batches for a GPU are copied into pinned memory, so that ``Batch.to``'s ``non_blocking``
        copies are asynchronous (from pageable memory they are synchronous); DALI's are on the GPU already."""
        return not self.raw and self.device.type == "cuda"

    def _decoded(self, data, pool: SlotPool | None) -> Iterator[tuple[dict, torch.Tensor, list[str]]]:
        """(raw batch, images uint8 NCHW or normalised float32, keys that failed to decode) per batch: DALI's
        pipelined stream over the workers' raw batches, or the images the Pillow workers made."""
        if self.raw:
            if self.dali is None:
                self.dali = DaliDecoder(self.transform, self.batch_size, self.device, self.options.dali_threads,
                                        self.options.dali_depth)
            yield from self.dali.stream(data)
            return
        for raw in data:
            images = _received(raw, pool)
            yield raw, _to_nchw(images.pin_memory() if self.pin_memory else images), []

    def _finish(self, raw: dict, images: torch.Tensor, failed: list[str]) -> Batch:
        if failed:
            raw["damaged"] = sorted(set(raw["damaged"]) | set(failed))
            raw["valid"] = raw["valid"] & np.array([k not in failed for k in raw["keys"]])
        return Batch(images=images, keys=raw["keys"], valid=torch.from_numpy(raw["valid"]),
                     folder=torch.from_numpy(raw["folder"]), bag=torch.from_numpy(raw["bag"]),
                     bag_labels=torch.from_numpy(raw["bag_labels"]), damaged=raw["damaged"])


class GroupLoader(TrainLoader):
    """Identity-sampled training batches (P groups × K images, :mod:`.groups`) from DST's training images.

    ``labels`` maps image keys to groups (a cluster id for SSG; None: each image's folder, for a labelled
    source dataset); images without a label, or with a negative one, are left out. Batches are dealt round-robin to
    ranks and workers; ``Batch.bag`` is the group's block in the batch and ``Batch.bag_labels[:, 0]`` its
    group. Every worker may read every shard: meant for adaptation-sized sets (SSG's ~10⁴–10⁵ images);
    remote shards are best read with ``cache_dir``."""

    def __init__(self, dst_url: str, labels: dict[str, int] | None, groups: GroupSpec = GroupSpec(),
                 transform: TransformSpec = TransformSpec(), options: LoaderOptions = LoaderOptions(),
                 exclude_folders: frozenset[int] | None = None):
        self.groups = groups
        self._setup(dst_url, transform, options, exclude_folders)
        self.shard = np.concatenate([np.full(len(e), i, np.int32) for i, e in enumerate(self.catalog)] or [[]])
        self.row = np.concatenate([np.arange(len(e), dtype=np.int32) for e in self.catalog] or [[]])
        self.labels = (np.concatenate([e.folder for e in self.catalog] or [[]]).astype(np.int64) if labels is None
                       else np.array([labels.get(k, -1) for e in self.catalog for k in e.key], np.int64))
        per_rank = group_batches(self.labels, groups) // options.world
        self.targets = [len(range(w, per_rank, self.n_workers)) for _ in range(options.world)
                        for w in range(self.n_workers)]
        self.batches_per_epoch = per_rank
        self.batch_size = groups.batch_size
        self.sequential = False

    def _stream(self, sid: int, epoch: int, rng: np.random.Generator) -> tuple[list[int], Iterator[BatchPlan]]:
        rank, w = divmod(sid, self.n_workers)
        plans = plan_group_epoch(self.shard, self.row, self.labels, self.groups, self.options.seed, epoch)
        mine = plans[rank:self.batches_per_epoch * self.options.world:self.options.world][w::self.n_workers]
        return list(range(len(self.catalog))), iter(mine)


class EvalLoader:
    """The images of one subset (query, gallery, or train for feature extraction) in manifest order.

    Batches hold uint8 images (and their flipped copies): call ``Batch.to(device)`` to normalise them
    before they reach a model."""

    def __init__(self, dst_url: str, subset: str, batch_size: int = 128,
                 transform: TransformSpec = TransformSpec(train=False), options: LoaderOptions = LoaderOptions(),
                 flip: bool = True, keys: frozenset[str] | None = None, part: tuple[int, int] = (0, 1)):
        """``keys`` restricts the subset to those images (e.g. the val split's, carved from train);
        ``part=(rank, world)`` to rank's share of whole shards (contiguous, balanced by image count)."""
        self.dst_url, self.batch_size, self.options, self.flip = dst_url, batch_size, options, flip
        self.transform = replace(transform, train=False)
        self.device = options.target()
        self.decoder = resolve_decoder(options.decoder, self.device)
        self.raw = self.decoder == "dali"
        self.dali: DaliDecoder | None = None
        catalog = load_catalog(Storage(dst_url, options.storage_options), subset, keys=keys)
        self.catalog = [catalog[i] for i in assign_streams(catalog, part[1])[part[0]]]
        self.streams = assign_streams(self.catalog, max(1, options.workers))

    def __len__(self) -> int:
        return sum(batches_for(sum(len(self.catalog[i]) for i in s), BagSpec(1, self.batch_size))
                   for s in self.streams)

    def __iter__(self) -> Iterator[Batch]:
        pool = None if self.raw else _pool(self.options.workers, self.batch_size, self.transform, normalize=False)
        data = _data_loader(_EvalStreams(self, pool), self.options.workers)
        if self.raw:
            if self.dali is None:
                self.dali = DaliDecoder(self.transform, self.batch_size, self.device, self.options.dali_threads,
                                        self.options.dali_depth)
            decoded = self.dali.stream(data)
        else:
            pin = self.device.type == "cuda"
            decoded = ((raw, _to_nchw(_received(raw, pool).pin_memory() if pin else _received(raw, pool)), [])
                       for raw in data)
        for raw, images, failed in decoded:
            valid = raw["valid"] & np.array([k not in failed for k in raw["keys"]])
            yield Batch(images=images, keys=raw["keys"], valid=torch.from_numpy(valid),
                        folder=torch.from_numpy(raw["folder"]), pid=torch.from_numpy(raw["pid"]),
                        camid=torch.from_numpy(raw["camid"]), flipped=images.flip(3) if self.flip else None,
                        damaged=sorted(set(raw["damaged"]) | set(failed)))


class _EvalStreams(torch.utils.data.IterableDataset):
    def __init__(self, loader: EvalLoader, pool: SlotPool):
        self.l, self.pool = loader, pool

    def __iter__(self) -> Iterator[dict]:
        tune_malloc()
        info = torch.utils.data.get_worker_info()
        ld = self.l
        worker = info.id if info is not None else 0
        order = ld.streams[worker]
        mat = _Materializer(ld.dst_url, ld.options.storage_options, ld.catalog, order, ld.transform, ld.raw,
                            ld.options.prefetch_shards, ld.options.cache_dir)
        rows = [(s, r) for s in order for r in range(len(ld.catalog[s]))]
        params = draw_params(ld.batch_size, ld.transform, np.random.default_rng(0))
        try:
            for i in range(0, len(rows), ld.batch_size):
                chunk = np.array(rows[i:i + ld.batch_size], np.int32)
                shard, row = chunk[:, 0], chunk[:, 1]
                keys = [ld.catalog[s].key[r] for s, r in zip(shard.tolist(), row.tolist())]
                datas = mat.payloads(shard, row)
                if ld.raw:                                  # DALI decodes in the main process
                    sent, damaged = {"datas": datas, "params": params}, []
                else:
                    sent, damaged = mat.decode_batch(self.pool, worker, shard, row, datas, params, keys,
                                                     normalize=False)
                bad = set(damaged) | {k for k, d in zip(keys, datas) if d is None}
                pick = lambda col: np.array([getattr(ld.catalog[s], col)[r] for s, r in zip(shard, row)], np.int64)
                yield {**sent, "keys": keys, "valid": np.array([k not in bad for k in keys]),
                       "folder": pick("folder"), "pid": pick("pid"), "camid": pick("camid"), "damaged": sorted(bad)}
        finally:
            mat.reader.close()
