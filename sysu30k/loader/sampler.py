"""Bag-structured batch plans: which images form each batch, grouped into weakly labelled bags.

A batch is B bags of K images. Bag windows cycle through 1, 3 and 5 consecutive folders (12 bags of 15
images: 4 of each, as the released recipe), with the K images split evenly over the window's folders.
Images are drawn without replacement from per-folder pools fed by a rolling buffer of whole shards, read
in order: a bag is a run of consecutive folders, which the packer laid out contiguously.

Every image of the stream lands in exactly one batch per epoch. A bag short of K (its window ran dry)
is completed from the nearest folders that still have images, and its label is the set of folders it
actually drew from; so all bags hold K images until the stream is nearly empty, and a stream of n images
always gives ``ceil(n / (B·K))`` batches, known before reading anything. The last batch is completed
with padding slots (``valid`` False). Plans carry no image bytes: producing and skipping them is cheap,
which is how a mid-epoch resume fast-forwards.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

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


def _fill_bag(pools: _Pools, anchor: int, mode: int, k: int, resample: bool) -> list[tuple[int, int, int]]:
    """K images (shard, row, folder) for a bag of ``mode`` folders around ``anchor``."""
    live = sorted(pools.seen) if resample else pools.live()
    window = [f for f in live if abs(f - anchor) <= mode // 2]
    quota = {f: k // len(window) for f in window}
    for f in sorted(window, key=lambda f: abs(f - anchor))[: k % len(window)]:
        quota[f] += 1
    picks: list[tuple[int, int, int]] = []
    for f in window:
        fresh = pools.take(f, min(quota[f], len(pools.pool.get(f, ())))) if f in pools.pool else []
        if resample and len(fresh) < quota[f]:          # the window stays exact: draw this folder again
            again = pools.rng.integers(len(pools.seen[f]), size=quota[f] - len(fresh))
            fresh += [pools.seen[f][int(i)] for i in again]
        picks += [(s, r, f) for s, r in fresh]
    while len(picks) < k:                                # window ran dry: nearest folders with images
        live = pools.live()
        if not live:
            if not pools.load():
                break
            continue
        f = min(live, key=lambda f: (abs(f - anchor), f))
        picks += [(s, r, f) for s, r in pools.take(f, min(k - len(picks), len(pools.pool[f])))]
    return picks


def plan_epoch(catalog: list[ShardEntries], order: list[int], spec: BagSpec, rng: np.random.Generator,
               n_batches: int | None = None) -> Iterator[BatchPlan]:
    """The batch plans of one stream for one epoch (``n_batches`` pads the stream up to that count).

    With ``spec.resample`` the epoch is exactly ``n_batches`` long and starts a new pass over the
    stream whenever it has seen every image."""
    pools = _Pools(catalog, order, rng)
    produced = 0
    total = n_batches if n_batches is not None else batches_for(pools.left, spec)
    while (produced < total and pools.left > 0) if spec.resample else pools.left > 0:
        modes = [spec.modes[i % len(spec.modes)] for i in range(spec.bags)]
        rng.shuffle(modes)
        slots: list[tuple[int, int, int]] = []
        labels: list[tuple[int, ...]] = []
        for mode in modes:
            cands = pools.anchor_candidates(spec.buffer_shards)
            if not cands and spec.resample:             # every image seen: a new pass over the stream
                pools = _Pools(catalog, order, rng)
                cands = pools.anchor_candidates(spec.buffer_shards)
            if not cands:
                break
            picks = _fill_bag(pools, cands[int(rng.integers(len(cands)))], mode, spec.per_bag, spec.resample)
            slots += [(s, r, len(labels)) for s, r, _ in picks]
            labels.append(tuple(sorted({f for _, _, f in picks})))
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
