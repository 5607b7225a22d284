"""Planning: assign every input to a shard before any image is read, streaming, in packing order.

The plan of a subset is ``_plan/<subset>.parquet`` with one row group per shard, so a shard task reads
exactly its own rows; layout rejects go to ``_plan/rejects.parquet``; bags to ``_plan/bags.parquet``;
``_plan/plan.json`` is written last and makes the plan valid. Shards close at ``shard_count`` images or
when the next image would pass ``shard_size`` bytes of tar (source size plus header and padding), so
the same tree and options always give the same shards.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from . import manifests
from .bags import Bag, consecutive_bags, parse_bag_json
from .constants import BAG_LABEL_JSON
from .layout import LayoutReject, SourceImage, SubsetReport, train_folders, walk_subset
from .storage import Storage

PLAN_DIR = "_plan"
PLAN_VERSION = 1
PLAN_SCHEMA = pa.schema([
    ("key", pa.string()), ("path", pa.string()), ("folder", pa.int32()), ("pid", pa.int32()),
    ("camid", pa.int8()), ("distractor", pa.bool_()), ("src_size", pa.int64()),
])
_BLOCK = 512
_BATCH = 65_536   # rows buffered before they are handed to Arrow


@dataclass(frozen=True)
class ShardingOptions:
    """Where shards are cut: at most ``shard_count`` images and about ``shard_size`` bytes of tar."""

    shard_size: int = 256 * 10**6
    shard_count: int = 100_000


def shard_name(subset: str, index: int) -> str:
    return f"{subset}-{index:06d}"


def tar_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: one header block plus data padded to 512."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class _ShardCutter:
    """Buffers a subset's rows and writes one Parquet row group per shard."""

    def __init__(self, f, opts: ShardingOptions):
        self.opts = opts
        self._writer = pq.ParquetWriter(f, PLAN_SCHEMA, compression="zstd")
        self.shard_sizes: list[int] = []
        self._rows: list[tuple] = []
        self._batches: list[pa.RecordBatch] = []
        self._count = 0
        self._bytes = 0

    def add(self, item: SourceImage) -> None:
        cost = tar_bytes(item.size)
        if self._count and (self._count >= self.opts.shard_count or self._bytes + cost > self.opts.shard_size):
            self._cut()
        self._rows.append((item.key, item.path, item.folder, item.pid, item.camid, item.distractor, item.size))
        self._count += 1
        self._bytes += cost
        if len(self._rows) >= _BATCH:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if self._rows:
            columns = list(zip(*self._rows))
            self._batches.append(pa.RecordBatch.from_arrays(
                [pa.array(c, type=f.type) for c, f in zip(columns, PLAN_SCHEMA)], schema=PLAN_SCHEMA))
            self._rows = []

    def _cut(self) -> None:
        self._flush_rows()
        table = pa.Table.from_batches(self._batches, schema=PLAN_SCHEMA)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.shard_sizes.append(table.num_rows)
        self._batches, self._count, self._bytes = [], 0, 0

    def close(self) -> list[int]:
        if self._count:
            self._cut()
        self._writer.close()
        return self.shard_sizes


def _bags(src: Storage) -> tuple[list[Bag], str]:
    if src.exists(BAG_LABEL_JSON):
        return parse_bag_json(src.read_text(BAG_LABEL_JSON)), BAG_LABEL_JSON
    return consecutive_bags(train_folders(src)), "consecutive-folder rule"


def _write_table(dst: Storage, rel: str, table: pa.Table) -> None:
    with dst.open_atomic(rel) as f:
        pq.write_table(table, f, compression="zstd")


def make_plan(src: Storage, dst: Storage, subsets: tuple[str, ...], opts: ShardingOptions, settings: dict,
              on_item: Callable[[], None] = lambda: None) -> dict:
    """Walk SRC and write the plan under DST; returns the content of ``plan.json``."""
    rejects: list[LayoutReject] = []
    reports: dict[str, SubsetReport] = {}
    shards: dict[str, list[int]] = {}
    for subset in subsets:
        reports[subset] = SubsetReport()
        with dst.open_atomic(f"{PLAN_DIR}/{subset}.parquet") as f:
            cutter = _ShardCutter(f, opts)
            for item in walk_subset(src, subset, reports[subset]):
                on_item()
                if isinstance(item, LayoutReject):
                    rejects.append(item)
                else:
                    cutter.add(item)
            shards[subset] = cutter.close()
    reject_schema = manifests.schema("rejects")
    _write_table(dst, f"{PLAN_DIR}/rejects.parquet", pa.Table.from_pylist(
        [{f: getattr(r, f) for f in reject_schema.names} for r in rejects], schema=reject_schema))
    bags, bag_source = _bags(src) if "train" in subsets else ([], "none")
    bag_schema = manifests.schema("bags").remove(manifests.schema("bags").get_field_index("images"))
    _write_table(dst, f"{PLAN_DIR}/bags.parquet", pa.Table.from_pylist(
        [{"bag_id": b.bag_id, "label": list(b.label), "folders": list(b.folders)} for b in bags],
        schema=bag_schema))
    plan = {
        "version": PLAN_VERSION, "source": src.url, "settings": settings,
        "subsets": {s: {"shards": len(shards[s]), "images": sum(shards[s]), "shard_sizes": shards[s]}
                    for s in subsets},
        "layout": {s: dataclasses.asdict(r) for s, r in reports.items()},
        "layout_rejects": len(rejects), "bags": len(bags), "bag_source": bag_source,
    }
    dst.write_atomic(f"{PLAN_DIR}/plan.json", json.dumps(plan, indent=1).encode())
    return plan


def load_plan(dst: Storage) -> dict | None:
    """The plan written under DST, or None when there is no complete plan."""
    rel = f"{PLAN_DIR}/plan.json"
    return json.loads(dst.read_text(rel)) if dst.exists(rel) else None


def read_shard_rows(dst: Storage, subset: str, index: int) -> pa.Table:
    """The planned rows of shard ``index`` of ``subset``."""
    return dst.read_row_group(f"{PLAN_DIR}/{subset}.parquet", index)

