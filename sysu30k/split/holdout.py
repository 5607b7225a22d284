"""The held-out folders of the val split: which folders ``sysu30k split`` takes out, and what a trainer skips.

:func:`choose_holdout` picks the held-out blocks and their guard bands (the split's side);
:func:`excluded_folders` and :func:`training_bags` read them back from DST (the trainer's side), so the
loader and the trainers depend on this module only, never on the split builder. May import
``sysu30k.io``, ``sysu30k.release`` and the manifest contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from ..manifests import SPLIT_SUMMARY
from ..release.bags import train_folder_name
from .config import GUARD, VAL_BLOCK


@dataclass(frozen=True)
class Holdout:
    """Training folders taken out for the val split (folder ids, sorted) and the block of each."""

    query: tuple[int, ...] = ()
    distractor: tuple[int, ...] = ()
    guard: tuple[int, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()      # (first, last) held-out folder of each block
    block_of: dict[int, int] = field(default_factory=dict, compare=False)

    def roles(self) -> dict[int, str]:
        return {**{f: "query" for f in self.query}, **{f: "distractor" for f in self.distractor}}

    def excluded(self) -> set[int]:
        return set(self.query) | set(self.distractor) | set(self.guard)

    def table(self) -> pa.Table:
        """The ``holdout`` manifest table: one row per held-out or guard folder, by folder id."""
        rows = sorted([(f, "query") for f in self.query] + [(f, "distractor") for f in self.distractor]
                      + [(f, "guard") for f in self.guard])
        return pa.Table.from_pylist([{"folder": f, "name": train_folder_name(f), "role": r,
                                      "block": self.block_of[f]} for f, r in rows], schema=manifests.schema("holdout"))


def _n_blocks(n: int, block: int, distractor_fraction: float) -> int:
    """Blocks for ``n`` held-out folders: at most ``block`` each, and 2 or more when distractors are asked."""
    return max(math.ceil(n / block), 2 if distractor_fraction > 0 and n >= 2 else 1)


def max_val_folders(n_folders: int, block: int = VAL_BLOCK, distractor_fraction: float = 0.5) -> int:
    """The most held-out folders ``n_folders`` training folders allow (leaving one for training)."""
    n = 0
    while n + 1 + 2 * GUARD * _n_blocks(n + 1, block, distractor_fraction) <= n_folders - 1:
        n += 1
    return n


def choose_holdout(folder_counts: dict[int, int], n: int, seed: int = 0, block: int = VAL_BLOCK,
                   distractor_fraction: float = 0.5) -> Holdout:
    """Pick ``n`` held-out folders in blocks with guard bands; deterministic by seed.

    ``folder_counts``: images per training folder (its keys, sorted, are the training folders). The
    ``n`` folders form ``ceil(n / block)`` contiguous blocks (2 at least when ``distractor_fraction`` > 0)
    of near-equal size, each flanked by ``GUARD`` folders on both sides, placed uniformly at random
    without overlap. Whole blocks give distractors: ``round(blocks * distractor_fraction)`` of them, at
    least one and leaving at least one query block, so a distractor folder is never within impurity
    reach (±2) of a query folder. Every folder of a query block with 2 images or more is a query folder;
    one with fewer cannot give a query and its match and becomes a guard folder (out of both).
    Raises UserError when ``n`` does not fit or no folder can give a query.
    """
    if n <= 0:
        return Holdout()
    if block < 1:
        raise UserError("--val-block must be at least 1")
    if not 0.0 <= distractor_fraction < 1.0:
        raise UserError("--val-distractors must lie in [0, 1)")
    folders = sorted(folder_counts)
    k = _n_blocks(n, block, distractor_fraction)
    sizes = [n // k + (i < n % k) for i in range(k)]
    free = len(folders) - n - 2 * GUARD * k
    if free < 1:
        raise UserError(f"--val-folders {n} is more than this dataset allows: {len(folders)} training folders "
                        f"leave room for at most {max_val_folders(len(folders), block, distractor_fraction)} "
                        f"held-out folders (blocks of at most {block} with {GUARD} guard folders on each side)")
    rng = np.random.default_rng([seed, 0x5B1])
    bars = np.sort(rng.choice(free + k, size=k, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [free + k]])) - 1       # k+1 gaps summing to free
    n_dis = min(max(round(k * distractor_fraction), 1 if distractor_fraction > 0 else 0), k - 1)
    dis_blocks = set(int(b) for b in rng.permutation(k)[:n_dis])
    query, distractor, guard, blocks, block_of, pos = [], [], [], [], {}, int(gaps[0])
    for b, (size, gap) in enumerate(zip(sizes, gaps[1:])):
        band = folders[pos:pos + GUARD] + folders[pos + GUARD + size:pos + 2 * GUARD + size]
        members = folders[pos + GUARD:pos + GUARD + size]
        guard += band
        if b in dis_blocks:
            distractor += members
        else:
            query += [f for f in members if folder_counts[f] >= 2]
            guard += [f for f in members if folder_counts[f] < 2]
        blocks.append((members[0], members[-1]))
        block_of.update({f: b for f in band + members})
        pos += size + 2 * GUARD + int(gap)
    if not query:
        raise UserError("no folder of the val query blocks has 2 images or more, so none can give a query "
                        "and its true match; pass another --seed or more --val-folders")
    return Holdout(tuple(sorted(query)), tuple(sorted(distractor)), tuple(sorted(guard)), tuple(blocks), block_of)




def excluded_folders(dst_url: str, storage_options: dict | None = None) -> set[int]:
    """Training folders a trainer must skip: held out for val or in a guard band (empty before a split).

    Raises UserError when holdout.parquet and split_summary.json disagree (a split run died between
    writing them): rerun ``sysu30k split``.
    """
    dst = Storage(dst_url, storage_options)
    rel = manifests.relpath("holdout")
    if not dst.exists(rel):
        return set()
    folders = set(dst.read_table(rel, columns=["folder"])["folder"].to_pylist())
    summary = dst.read_json(SPLIT_SUMMARY, "rerun `sysu30k split`")
    v = summary["val"] if summary else None
    if v is None or folders != set(v["query_folders"]) | set(v["distractor_folders"]) | set(v["guard_folders"]):
        raise UserError(f"{dst.url}: {rel} and {SPLIT_SUMMARY} disagree (an interrupted `sysu30k split`?); "
                        "rerun sysu30k split")
    return folders


def _drop_bags(bags: pa.Table, excluded: set[int]) -> pa.Table:
    if not excluded or bags.num_rows == 0:
        return bags
    ex = pa.array(sorted(excluded), pa.int64())
    hit = np.zeros(bags.num_rows, dtype=bool)
    label = bags["label"].combine_chunks()
    hit[pc.list_parent_indices(label).to_numpy()[pc.is_in(pc.list_flatten(label).cast(pa.int64()), ex)
                                                 .to_numpy(zero_copy_only=False)]] = True
    folders = bags["folders"].combine_chunks()
    names = pc.list_flatten(folders)
    digits = pc.match_substring_regex(names, r"^\d+$")
    as_int = pc.if_else(digits, names, "-1").cast(pa.int64())
    hit[pc.list_parent_indices(folders).to_numpy()[pc.is_in(as_int, ex).to_numpy(zero_copy_only=False)]] = True
    return bags.filter(pa.array(~hit))


def training_bags(dst_url: str, storage_options: dict | None = None,
                  excluded: frozenset[int] | set[int] | None = None) -> pa.Table:
    """``bags.parquet`` without every bag whose label or folders touch an ``excluded`` folder (default: the
    held-out and guard folders of DST's split)."""
    dst = Storage(dst_url, storage_options)
    if not dst.exists(manifests.relpath("bags")):
        raise UserError(f"{dst.url} has no {manifests.relpath('bags')}: pack the training set with `sysu30k shard`")
    bags = dst.read_table(manifests.relpath("bags"))
    return _drop_bags(bags, set(excluded_folders(dst_url, storage_options) if excluded is None else excluded))


def bag_counts(dst: Storage, excluded: set[int]) -> tuple[int, int]:
    """(bags kept for training, all bags) of DST once the ``excluded`` folders are taken out."""
    rel = manifests.relpath("bags")
    if not dst.exists(rel):
        return 0, 0
    bags = dst.read_table(rel)
    return _drop_bags(bags, excluded).num_rows, bags.num_rows
