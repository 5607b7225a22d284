"""What a loader can read: the packed images of a subset, grouped by shard, from the manifests.

Training folders held out for validation (see ``sysu30k split``) are dropped here, so no later stage
can see them. Shards are dealt to streams (one per DDP rank × DataLoader worker) as contiguous blocks
balanced by image count: a stream reads its shards whole and in order, and bags, which are runs of
consecutive folders, mostly stay inside one stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from ..manifests import SHARD_DIR

COLUMNS = ["key", "shard", "offset", "size", "sha256", "folder", "pid", "camid", "distractor", "width", "height"]


@dataclass(frozen=True)
class ShardEntries:
    """The images of one shard, in tar order, as parallel arrays."""

    shard: str
    key: list[str]
    offset: np.ndarray          # int64, data offset in the tar
    size: np.ndarray            # int64
    sha256: list[str]
    folder: np.ndarray          # int32 folder id (training) or -1
    pid: np.ndarray             # int32 identity (test) or -1
    camid: np.ndarray           # int8 camera (test) or -1
    width: np.ndarray | None = None     # int32 packed size in pixels (None: unknown, decoders read the header)
    height: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.key)


def _fill(col, value):
    return pc.fill_null(col, value).to_numpy(zero_copy_only=False)


def load_catalog(dst: Storage, subset: str, exclude_folders: frozenset[int] = frozenset(),
                 keys: frozenset[str] | None = None) -> list[ShardEntries]:
    """Shards of ``subset`` with their images, in packing order, without ``exclude_folders``
    (and, when ``keys`` is given, only those images)."""
    rel = manifests.relpath("images")
    if not dst.exists(rel):
        raise UserError(f"{dst.url} has no {rel}: run `sysu30k shard` first")
    table = dst.read_table(rel, columns=COLUMNS, filters=[("subset", "=", subset)])
    if exclude_folders:
        held = pa.array(sorted(exclude_folders), type=pa.int32())
        keep = pc.invert(pc.is_in(table["folder"], value_set=held))
        table = table.filter(pc.fill_null(keep, True))
    if keys is not None:
        table = table.filter(pc.is_in(table["key"], value_set=pa.array(sorted(keys), type=pa.string())))
    out = []
    shard_col = table["shard"].to_numpy(zero_copy_only=False)
    if len(shard_col) == 0:
        return out
    bad = next((s for s in pc.unique(table["shard"]).to_pylist() if not manifests.SHARD_NAME.match(s)), None)
    if bad is not None:                                 # a name like ../../x would be read outside DST
        raise UserError(f"{dst.url}/{rel} names shard {bad!r}, which is not <subset>-NNNNNN: a damaged manifest")
    bounds = np.flatnonzero(shard_col[1:] != shard_col[:-1]) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(shard_col)]])
    key, sha = table["key"].to_pylist(), table["sha256"].to_pylist()
    offset, size = table["offset"].to_numpy(), table["size"].to_numpy()
    folder, pid, camid = _fill(table["folder"], -1), _fill(table["pid"], -1), _fill(table["camid"], -1)
    width, height = table["width"].to_numpy(), table["height"].to_numpy()
    present = {e.name for e in dst.listdir(SHARD_DIR)} if dst.isdir(SHARD_DIR) else set()
    missing = [str(shard_col[a]) for a in starts if f"{shard_col[a]}.tar" not in present]
    if missing:
        raise UserError(f"{dst.url}/{SHARD_DIR}/{missing[0]}.tar is missing ({len(missing)} shard(s) of {rel} are): "
                        "run `sysu30k verify DST`, then rerun `sysu30k shard` with --overwrite")
    for a, b in zip(starts, ends):
        out.append(ShardEntries(str(shard_col[a]), key[a:b], offset[a:b], size[a:b], sha[a:b],
                                folder[a:b].astype(np.int32), pid[a:b].astype(np.int32), camid[a:b].astype(np.int8),
                                width[a:b], height[a:b]))
    return out


def assign_streams(shards: list[ShardEntries], streams: int) -> list[list[int]]:
    """Shard indices of each stream: contiguous blocks with about the same number of images.

    With fewer shards than streams some streams get none; they then emit only padding batches, so
    pack with a --shard-size that gives several shards per stream.
    """
    cum = np.concatenate([[0], np.cumsum([len(s) for s in shards])])
    cuts = [0]
    for i in range(1, streams):
        cuts.append(int(np.clip(np.searchsorted(cum, cum[-1] * i / streams), cuts[-1], len(shards))))
    cuts.append(len(shards))
    return [list(range(cuts[i], cuts[i + 1])) for i in range(streams)]
