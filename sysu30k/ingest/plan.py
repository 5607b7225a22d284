"""Planning: assign every input to a shard before any of its images is read, streaming, in packing order.

``_plan/run.json`` (source and settings) is written before anything else. Each shard's rows go to
``_plan/<shard>.parquet`` the moment the shard is cut, and the caller hears of it at once, so packing
starts while the walk goes on. Layout rejects go to ``_plan/rejects.parquet``, bags to
``_plan/bags.parquet``; ``_plan/plan.json`` is written last and makes the plan complete. Shards close at
``shard_count`` images or when the next image would pass ``shard_size`` bytes of tar (source size plus
header and padding), so the same tree and options always give the same shards; each shard's rows carry a
digest, and a shard packed by an interrupted run counts only when its digest is planned again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable

import pyarrow as pa

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from ..manifests import PLAN_DIR
from ..release.bags import Bag, consecutive_bags, parse_bag_json
from ..release.constants import BAG_LABEL_JSON, TRAIN_DIR
from .config import ShardingOptions
from .layout import LayoutReject, SourceImage, SubsetReport, subset_root, train_folders, walk_subset
from .source import Source

PLAN_VERSION = 3
PLAN_SCHEMA = pa.schema([
    ("key", pa.string()), ("path", pa.string()), ("folder", pa.int32()), ("pid", pa.int32()),
    ("camid", pa.int8()), ("distractor", pa.bool_()), ("src_size", pa.int64()),
    ("archive", pa.string()), ("offset", pa.int64()),      # where a member of an archive is read (else null)
])
_BLOCK = 512
_BATCH = 65_536   # rows buffered before they are handed to Arrow


def shard_name(subset: str, index: int) -> str:
    return f"{subset}-{index:06d}"


def tar_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: one header block plus data padded to 512."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


LABEL_BYTES = tar_bytes(1)     # a KEY.json member: its labels fit one block


def rows_digest(rows: pa.Table) -> str:
    """sha256 of what a shard packs: its keys, source paths, sizes and archive offsets, in order."""
    content = [rows[c].to_pylist() for c in ("key", "path", "src_size", "archive", "offset")]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


OnShard = Callable[[str, int, str], None]       # (subset, index, rows digest) of a shard just planned


class _ShardCutter:
    """Buffers one shard's rows; at each cut writes them to ``_plan/<shard>.parquet`` and reports the shard."""

    def __init__(self, dst: Storage, subset: str, opts: ShardingOptions, on_shard: OnShard, extra: int = 0):
        self.dst, self.subset, self.opts, self.on_shard, self.extra = dst, subset, opts, on_shard, extra
        self.shard_sizes: list[int] = []
        self.digests: list[str] = []
        self._rows: list[tuple] = []
        self._batches: list[pa.RecordBatch] = []
        self._count = 0
        self._bytes = 0

    def add(self, item: SourceImage) -> None:
        cost = tar_bytes(item.size) + self.extra
        if self._count and (self._count >= self.opts.shard_count or self._bytes + cost > self.opts.shard_size):
            self._cut()
        self._rows.append((item.key, item.path, item.folder, item.pid, item.camid, item.distractor, item.size,
                           item.archive, item.offset))
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
        index, digest = len(self.shard_sizes), rows_digest(table)
        self.dst.write_table(shard_rows_path(shard_name(self.subset, index)), table)
        self.shard_sizes.append(table.num_rows)
        self.digests.append(digest)
        self._batches, self._count, self._bytes = [], 0, 0
        self.on_shard(self.subset, index, digest)

    def close(self) -> tuple[list[int], list[str]]:
        """Cut the last shard; returns the row count and the digest of every shard."""
        if self._count:
            self._cut()
        return self.shard_sizes, self.digests


def _bags(src: Source) -> tuple[list[Bag], str]:
    if src.exists(BAG_LABEL_JSON):
        if not src.is_regular_file(BAG_LABEL_JSON):
            raise UserError(f"{src.url}/{BAG_LABEL_JSON} is not a regular file (a FIFO, device or folder?)")
        try:
            text = src.read(BAG_LABEL_JSON).decode("utf-8")
        except OSError as exc:
            raise UserError(f"{src.url}/{BAG_LABEL_JSON} cannot be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{src.url}/{BAG_LABEL_JSON} is not UTF-8 text (byte {exc.start})") from None
        return _checked(parse_bag_json(text), train_folders(src), bool(src.damaged(TRAIN_DIR))), BAG_LABEL_JSON
    return consecutive_bags(train_folders(src)), "consecutive-folder rule"


def _checked(bags: list[Bag], folders: list[str], damaged: bool = False) -> list[Bag]:
    """``bags`` of the JSON file, refused (naming the first bad bag) when one names a folder that is not a
    training folder of SRC (unless a damaged archive may have held it: its images are rejects then) or
    carries a label that is not its folders' ids."""
    present = set(folders)
    for b in bags:
        missing = [f for f in b.folders if f not in present]
        if missing and not damaged:
            raise UserError(f"{BAG_LABEL_JSON}: bag {b.bag_id} names folder {missing[0]!r}, which is not a "
                            "training folder of SRC")
        if {int(f) for f in b.folders} != set(b.label):
            raise UserError(f"{BAG_LABEL_JSON}: bag {b.bag_id} is labelled {sorted(set(b.label))} but holds the "
                            f"folders {sorted({int(f) for f in b.folders})}")
    return bags


def shard_rows_path(shard: str) -> str:
    return f"{PLAN_DIR}/{shard}.parquet"


def run_record(src_url: str, settings: dict) -> dict:
    """What ``_plan/run.json`` and ``plan.json`` record about the run, compared on resume."""
    return {"version": PLAN_VERSION, "source": src_url, "settings": settings}


def start_plan(dst: Storage, src_url: str, settings: dict) -> None:
    """Record the run's source and settings before the first shard is planned (and maybe packed)."""
    dst.write_atomic(f"{PLAN_DIR}/run.json", json.dumps(run_record(src_url, settings), indent=1).encode())


def load_run(dst: Storage) -> dict | None:
    """The run record of a plan that was started (complete or not) under DST, or None."""
    rel = f"{PLAN_DIR}/run.json"
    return dst.read_json(rel, "pass --overwrite to start over")


def make_plan(src: Source, dst: Storage, subsets: tuple[str, ...], opts: ShardingOptions, settings: dict,
              on_item: Callable[[], None] = lambda: None, on_shard: OnShard = lambda *_: None,
              labels: bool = False) -> dict:
    """Walk SRC and write the plan under DST, calling ``on_shard`` as each shard's rows are written (each image
    costs a ``KEY.json`` member more with ``labels``); returns the content of ``plan.json``."""
    bags, bag_source = _bags(src) if "train" in subsets else ([], "none")     # checked before the long walk
    rejects: list[LayoutReject] = []
    reports: dict[str, SubsetReport] = {}
    shards: dict[str, tuple[list[int], list[str]]] = {}
    for subset in subsets:
        reports[subset] = SubsetReport()
        cutter = _ShardCutter(dst, subset, opts, on_shard, LABEL_BYTES if labels else 0)
        for item in walk_subset(src, subset, reports[subset]):
            on_item()
            if isinstance(item, LayoutReject):
                rejects.append(item)
            else:
                cutter.add(item)
        shards[subset] = cutter.close()
    rejects += _duplicates(src, subsets)
    reject_schema = manifests.schema("rejects")
    dst.write_table(f"{PLAN_DIR}/rejects.parquet", pa.Table.from_pylist(
        [{f: getattr(r, f) for f in reject_schema.names} for r in rejects], schema=reject_schema))
    bag_schema = manifests.schema("bags").remove(manifests.schema("bags").get_field_index("images"))
    dst.write_table(f"{PLAN_DIR}/bags.parquet", pa.Table.from_pylist(
        [{"bag_id": b.bag_id, "label": list(b.label), "folders": list(b.folders)} for b in bags],
        schema=bag_schema))
    plan = {
        **run_record(src.url, settings),
        "subsets": {s: {"shards": len(sizes), "images": sum(sizes), "shard_sizes": sizes, "shard_digests": digests}
                    for s, (sizes, digests) in shards.items()},
        "layout": {s: dataclasses.asdict(r) for s, r in reports.items()},
        "layout_rejects": len(rejects), "bags": len(bags), "bag_source": bag_source,
        "archives": src.archives,
    }
    dst.write_atomic(f"{PLAN_DIR}/plan.json", json.dumps(plan, indent=1).encode())
    return plan


def _duplicates(src: Source, subsets: tuple[str, ...]) -> list[LayoutReject]:
    """Rejects for the copies of an image that were not packed (in a second archive, or also extracted)."""
    out = []
    for path, (folder, detail) in sorted(src.duplicates.items()):
        subset = next((s for s in subsets if folder == subset_root(s) or folder.startswith(subset_root(s) + "/")),
                      None)
        if subset is not None:
            out.append(LayoutReject(subset, path, "duplicate", detail))
    return out


def load_plan(dst: Storage) -> dict | None:
    """The plan written under DST, or None when there is no complete plan."""
    rel = f"{PLAN_DIR}/plan.json"
    return dst.read_json(rel, "pass --overwrite to start over")


def planned_shards(plan: dict) -> list[tuple[str, int, str]]:
    """(subset, index, rows digest) of every shard of a complete plan, in packing order."""
    return [(subset, i, digest) for subset, info in plan["subsets"].items()
            for i, digest in enumerate(info["shard_digests"])]


def read_shard_rows(dst: Storage, shard: str) -> pa.Table:
    """The planned rows of ``shard``."""
    return dst.read_table(shard_rows_path(shard))

