"""Bag-structured batch plans: which images form each batch, grouped into weakly labelled bags.

Bags are the dataset's own: the rows of ``bags.parquet`` (from ``bag_level_label.json`` when SRC had one,
else the consecutive-folder rule), given as a :class:`BagIndex`. A batch is B bags of K images; the sizes
of the bags cycle through 1, 3 and 5 folders (12 bags of 15 images: 4 of each, as the released recipe),
taken from the bags of that size the manifest has (the nearest size when a folder has none), with the K
images split evenly over the bag's folders. Images are drawn without replacement from per-folder pools
fed by a rolling buffer of whole shards, read in order: a bag is a run of nearby folders, which the packer
laid out contiguously.

Every image of the stream lands in exactly one batch per epoch. A bag that runs dry is completed only
from its own folders; when they have no more images it stays short and the batch goes on with another
bag, so every batch holds B·K images (B bags or a few more) until the stream is nearly empty, and a
stream of n images always gives ``ceil(n / (B·K))`` batches, known before reading anything. A bag's label
is its manifest label. The last batch is completed with padding slots (``valid`` False). Plans carry no
image bytes: producing and skipping them is cheap, which is how a mid-epoch resume fast-forwards.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..release.bags import consecutive_bags, train_folder_name
from .catalog import ShardEntries


@dataclass(frozen=True)
class BagSpec:
    """Batch shape: ``bags`` bags of ``per_bag`` images; windows of ``modes`` folders, cycled."""

    bags: int = 12
    per_bag: int = 15
    modes: tuple[int, ...] = (1, 3, 5)
    buffer_shards: int = 2
    resample: bool = False        # exact windows, images may repeat; the epoch keeps its length

    @property
    def batch_size(self) -> int:
        return self.bags * self.per_bag


@dataclass
class BatchPlan:
    """One batch: for each slot, where its image is and which bag it belongs to."""

    shard: np.ndarray                 # int32, index into the catalog's shard list
    row: np.ndarray                   # int32, row within that shard
    bag: np.ndarray                   # int32, bag index within the batch
    valid: np.ndarray                 # bool, False for padding slots
    labels: list[tuple[int, ...]] = field(default_factory=list)   # per bag: folder ids it drew from


@dataclass(frozen=True)
class BagIndex:
    """The manifest's bags: their folders and labels (folder ids), and the bags of each folder by size."""

    folders: list[tuple[int, ...]]
    labels: list[tuple[int, ...]]
    of_folder: dict[int, dict[int, list[int]]]          # folder -> bag size -> bag numbers

    @classmethod
    def build(cls, folders: list[tuple[int, ...]], labels: list[tuple[int, ...]]) -> BagIndex:
        of: dict[int, dict[int, list[int]]] = {}
        for i, fs in enumerate(folders):
            for f in set(fs):
                of.setdefault(f, {}).setdefault(len(fs), []).append(i)
        return cls(folders, [tuple(sorted(set(lab))) for lab in labels], of)

    @classmethod
    def consecutive(cls, folder_ids) -> BagIndex:
        """The consecutive-folder rule (:func:`sysu30k.release.bags.consecutive_bags`) over ``folder_ids``."""
        bags = consecutive_bags([train_folder_name(f) for f in sorted(set(int(f) for f in folder_ids))])
        return cls.build([b.label for b in bags], [b.label for b in bags])

    def pick(self, anchor: int, size: int, rng: np.random.Generator) -> int | None:
        """A bag holding ``anchor`` with ``size`` folders (or the nearest size it has); None when it is in none."""
        by_size = self.of_folder.get(anchor)
        if not by_size:
            return None
        best = min(by_size, key=lambda s: (abs(s - size), s))
        cands = by_size[best]
        return cands[int(rng.integers(len(cands)))]


def batches_for(n_images: int, spec: BagSpec) -> int:
    """How many batches a stream of ``n_images`` yields in one epoch."""
    return math.ceil(n_images / spec.batch_size)


class _Pools:
    """Unvisited images per folder, fed one whole shard at a time in stream order."""

    def __init__(self, catalog: list[ShardEntries], order: list[int], rng: np.random.Generator):
        self.catalog, self.order, self.rng = catalog, order, rng
        self.next = 0
        self.buffer: deque[tuple[int, set[int]]] = deque()     # (shard index, its folders)
        self.pool: dict[int, list[tuple[int, int]]] = {}
        self.seen: dict[int, list[tuple[int, int]]] = {}       # every buffered image by folder (resampling)
        self.left = sum(len(catalog[i]) for i in order)

    def load(self) -> bool:
        if self.next >= len(self.order):
            return False
        s = self.order[self.next]
        self.next += 1
        folders = self.catalog[s].folder
        touched = set(np.unique(folders).tolist())
        for f in touched:
            rows = np.flatnonzero(folders == f)
            self.pool.setdefault(f, []).extend((s, int(r)) for r in rows)
            self.seen.setdefault(f, []).extend((s, int(r)) for r in rows)
            self.rng.shuffle(self.pool[f])
        self.buffer.append((s, touched))
        return True

    def live(self) -> list[int]:
        return sorted(self.pool)                          # exhausted folders are removed by take()

    def anchor_candidates(self, keep: int) -> list[int]:
        """Folders with images left in the oldest buffered shard, loading/dropping shards as needed."""
        while True:
            while len(self.buffer) < keep and self.load():
                pass
            if not self.buffer:
                return []
            _, folders = self.buffer[0]
            cands = sorted(f for f in folders if self.pool.get(f))
            if cands:
                return cands
            self.buffer.popleft()
            for f in folders:
                if f not in self.pool and all(f not in fs for _, fs in self.buffer):
                    self.seen.pop(f, None)

    def take(self, folder: int, n: int) -> list[tuple[int, int]]:
        rows = self.pool[folder]
        got = rows[len(rows) - n:] if n else []
        del rows[len(rows) - len(got):]
        if not rows:
            del self.pool[folder]
        self.left -= len(got)
        return got


def _fill_bag(pools: _Pools, folders: tuple[int, ...], anchor: int, k: int,
              resample: bool) -> list[tuple[int, int, int]]:
    """Up to K images (shard, row, folder) from the bag of ``folders``, split evenly, the anchor's nearest
    folders first; a folder short of its share leaves it to the bag's other folders, never to others."""
    live = set(pools.seen if resample else pools.pool)
    window = sorted(f for f in set(folders) if f in live)
    quota = {f: k // len(window) for f in window}
    for f in sorted(window, key=lambda f: (abs(f - anchor), f))[: k % len(window)]:
        quota[f] += 1
    picks: list[tuple[int, int, int]] = []
    for f in window:
        fresh = pools.take(f, min(quota[f], len(pools.pool.get(f, ())))) if f in pools.pool else []
        if resample and len(fresh) < quota[f]:          # the window stays exact: draw this folder again
            again = pools.rng.integers(len(pools.seen[f]), size=quota[f] - len(fresh))
            fresh += [pools.seen[f][int(i)] for i in again]
        picks += [(s, r, f) for s, r in fresh]
    for f in sorted(window, key=lambda f: (abs(f - anchor), f)):    # the bag's other folders fill its gaps
        if len(picks) >= k:
            break
        if f in pools.pool:
            picks += [(s, r, f) for s, r in pools.take(f, min(k - len(picks), len(pools.pool[f])))]
    return picks


def plan_epoch(catalog: list[ShardEntries], order: list[int], spec: BagSpec, rng: np.random.Generator,
               n_batches: int | None = None, bags: BagIndex | None = None) -> Iterator[BatchPlan]:
    """The batch plans of one stream for one epoch (``n_batches`` pads the stream up to that count), with
    the bags of ``bags`` (default: the consecutive-folder rule over the catalog's folders).

    With ``spec.resample`` the epoch is exactly ``n_batches`` long and starts a new pass over the
    stream whenever it has seen every image."""
    if bags is None:
        bags = BagIndex.consecutive(np.unique(np.concatenate([c.folder for c in catalog])) if catalog else [])
    pools = _Pools(catalog, order, rng)
    produced = 0
    total = n_batches if n_batches is not None else batches_for(pools.left, spec)
    while produced < total if spec.resample else pools.left > 0:
        if spec.resample and pools.left == 0:           # every image seen at a batch boundary: a new pass
            pools = _Pools(catalog, order, rng)
            if pools.left == 0:
                break
        modes = [spec.modes[i % len(spec.modes)] for i in range(spec.bags)]
        rng.shuffle(modes)
        slots: list[tuple[int, int, int]] = []
        labels: list[tuple[int, ...]] = []
        while len(slots) < spec.batch_size:
            cands = pools.anchor_candidates(spec.buffer_shards)
            if not cands and spec.resample:             # every image seen: a new pass over the stream
                pools = _Pools(catalog, order, rng)
                cands = pools.anchor_candidates(spec.buffer_shards)
            if not cands:
                break
            anchor = cands[int(rng.integers(len(cands)))]
            bag = bags.pick(anchor, modes[len(labels) % len(modes)], rng)
            folders, label = (bags.folders[bag], bags.labels[bag]) if bag is not None else ((anchor,), (anchor,))
            picks = _fill_bag(pools, folders, anchor, min(spec.per_bag, spec.batch_size - len(slots)),
                              spec.resample)
            slots += [(s, r, len(labels)) for s, r, _ in picks]
            labels.append(label)
        yield _finish(slots, labels, spec)
        produced += 1
    for _ in range((n_batches or 0) - produced):         # equal batch counts across ranks
        yield _padding(catalog, order, spec)


def _finish(slots: list[tuple[int, int, int]], labels: list[tuple[int, ...]], spec: BagSpec) -> BatchPlan:
    n_valid = len(slots)
    while len(slots) < spec.batch_size:                  # the stream's last batch: repeat, marked invalid
        slots.append(slots[len(slots) % n_valid])
    arr = np.array(slots, dtype=np.int32)
    valid = np.arange(spec.batch_size) < n_valid
    return BatchPlan(arr[:, 0], arr[:, 1], arr[:, 2], valid, labels)


def _padding(catalog: list[ShardEntries], order: list[int], spec: BagSpec) -> BatchPlan:
    """A batch of padding slots only (a real image, repeated, so decoding still works)."""
    shard = order[0] if order else 0
    n = spec.batch_size
    return BatchPlan(np.full(n, shard, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32),
                     np.zeros(n, bool), [()])
