"""Dataset-level manifests, assembled from the shard parts once every shard is complete.

images/rejects/shards/bags Parquet tables are streamed part by part (never the whole dataset in
memory) and written atomically; ``manifests/summary.json`` comes last and marks DST complete. The
summary holds no timings, so an interrupted-and-resumed run ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import manifests
from ..io.storage import Storage
from ..manifests import PARTS_DIR, PLAN_DIR, SUMMARY
from .packer import ShardStats

SHARD_TABLES = ("images", "bags", "shards", "rejects")   # the manifests `sysu30k shard` writes
SUMMARY_VERSION = 1


def _read(dst: Storage, rel: str) -> pa.Table:
    return dst.read_table(rel)


def publish(dst: Storage, plan: dict, stats: list[ShardStats]) -> dict:
    """Write the four manifests and the summary from the parts of ``stats``; returns the summary."""
    folder_counts: collections.Counter[int] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    with dst.open_atomic(manifests.relpath("images")) as fi, dst.open_atomic(manifests.relpath("rejects")) as fr, \
            pq.ParquetWriter(fi, manifests.schema("images"), compression="zstd") as images, \
            pq.ParquetWriter(fr, manifests.schema("rejects"), compression="zstd") as rejects:
        # the writers close before their files, also when interrupted (a writer left to the garbage
        # collector writes into a closed file and says so on stderr)
        layout_rejects = _read(dst, f"{PLAN_DIR}/rejects.parquet")
        rejects.write_table(layout_rejects.cast(manifests.schema("rejects")))
        reasons.update(layout_rejects["reason"].to_pylist())
        for s in stats:
            part = _read(dst, f"{PARTS_DIR}/{s.shard}.images.parquet").cast(manifests.schema("images"))
            images.write_table(part, row_group_size=max(1, part.num_rows))
            if s.subset == "train" and part.num_rows:
                counts = pc.value_counts(part["folder"])
                folder_counts.update(dict(zip(counts.field("values").to_pylist(),
                                              counts.field("counts").to_pylist())))
            shard_rejects = _read(dst, f"{PARTS_DIR}/{s.shard}.rejects.parquet").cast(manifests.schema("rejects"))
            rejects.write_table(shard_rejects)
            reasons.update(shard_rejects["reason"].to_pylist())
    shards = pa.Table.from_pylist([{f: getattr(s, f) for f in manifests.schema("shards").names} for s in stats],
                                  schema=manifests.schema("shards"))
    dst.write_table(manifests.relpath("shards"), shards)
    bags = _read(dst, f"{PLAN_DIR}/bags.parquet")
    bag_images = [sum(folder_counts.get(int(f), 0) for f in set(folders) if f.isdigit())
                  for folders in bags["folders"].to_pylist()]
    bags = bags.append_column("images", pa.array(bag_images, pa.int64())).cast(manifests.schema("bags"))
    dst.write_table(manifests.relpath("bags"), bags)
    summary = {
        "version": SUMMARY_VERSION, "source": plan["source"], "settings": plan["settings"],
        "subsets": {subset: {
            "images": sum(s.count for s in stats if s.subset == subset),
            "rejects": sum(s.rejects for s in stats if s.subset == subset)
            + sum(1 for r in layout_rejects["subset"].to_pylist() if r == subset),
            "shards": info["shards"],
            "bytes": sum(s.bytes for s in stats if s.subset == subset),
        } for subset, info in plan["subsets"].items()},
        "rejects_by_reason": dict(sorted(reasons.items())),
        "bags": bags.num_rows, "bag_source": plan["bag_source"], "layout": plan["layout"],
        "archives": plan["archives"],
        "manifests": {t: manifests.relpath(t) for t in SHARD_TABLES},
    }
    dst.write_atomic(SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def load_summary(dst: Storage) -> dict | None:
    """The summary of a complete DST, or None."""
    return dst.read_json(SUMMARY, "pass --overwrite to `sysu30k shard` to pack again")

