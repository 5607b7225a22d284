"""Pack one planned shard: read its sources, validate and convert each image, write the tar.

Publishing order makes a crash harmless: the tar, its DALI index and the shard's manifest parts are
each written under a temporary name and renamed into place, and only then is the completion marker
``_parts/<shard>.done.json`` written. A shard without a marker (or whose tar size disagrees with it, or
whose marker names other planned rows) is packed again from scratch, with the same bytes as result.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from .. import manifests
from ..errors import UserError
from ..io.retry import RetryPolicy
from ..io.storage import NotRegularFile, Storage, TooLarge
from ..io.tuning import tune_malloc
from ..manifests import PARTS_DIR, SHARD_DIR
from .config import MAX_SOURCE_BYTES, ImageOptions
from .imageproc import Rejected, prepare
from .plan import read_shard_rows, rows_digest, shard_name
from .tarpack import ShardWriter

READ_CHUNK = 128                     # source objects fetched per batch (concurrently on object stores)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to pack one shard; small and picklable (no image bytes)."""

    src_url: str
    dst_url: str
    subset: str
    index: int
    image: ImageOptions
    src_options: dict = field(default_factory=dict)
    dst_options: dict = field(default_factory=dict)
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True)
class ShardStats:
    """What a packed shard reports back: small, written as its completion marker."""

    shard: str
    subset: str
    count: int
    rejects: int
    bytes: int
    sha256: str
    plan_sha256: str          # digest of the planned rows it packed (plan.rows_digest)


def marker_path(shard: str) -> str:
    return f"{PARTS_DIR}/{shard}.done.json"


def is_complete(dst: Storage, shard: str, plan_sha256: str) -> ShardStats | None:
    """The stats of ``shard`` when it was fully published from the planned rows of digest ``plan_sha256``
    and its tar has the recorded size."""
    try:
        recorded = dst.read_json(marker_path(shard))
        stats = ShardStats(**recorded) if recorded is not None else None
    except (UserError, TypeError):          # a damaged marker says nothing: the shard is packed again
        return None
    if stats is None:
        return None
    tar = f"{SHARD_DIR}/{shard}.tar"
    if stats.plan_sha256 != plan_sha256 or not dst.exists(tar) or dst.size(tar) != stats.bytes:
        return None
    return stats


_READ_REASONS = {NotRegularFile: "not-a-file", TooLarge: "too-large"}     # by the read's exception; else unreadable


def start_worker() -> None:
    """Set up a local packing process before its first task: tuned malloc, and Ctrl-C left to the parent
    (which stops the workers itself, so none dies mid-task with a traceback of its own). SIGTERM, with which
    the parent stops them, is at its default: the pool forks with it so (``shard._runner``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()


def _with_sources(src: Storage, paths: list[str]) -> Iterator[bytes | Exception]:
    """The bytes of each source path (or the exception reading it ended with): local files read here,
    one by one; objects fetched in batches, one batch ahead of the caller."""
    chunks = [paths[i:i + READ_CHUNK] for i in range(0, len(paths), READ_CHUNK)]
    if src.local:      # a reading thread would only trade the GIL back and forth with this one
        for chunk in chunks:
            yield from src.read_many(chunk, MAX_SOURCE_BYTES)
        return
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(src.read_many, chunks[0], MAX_SOURCE_BYTES) if chunks else None
        for i in range(len(chunks)):
            data = ahead.result()
            if i + 1 < len(chunks):
                ahead = reader.submit(src.read_many, chunks[i + 1], MAX_SOURCE_BYTES)
            yield from data


def pack_shard(task: ShardTask) -> ShardStats:
    """Pack shard ``task.index`` of ``task.subset``; returns its stats once it is published.

    Idempotent: running it twice, or concurrently (a retried or duplicated task), publishes the same bytes.
    """
    tune_malloc()
    src = Storage(task.src_url, task.src_options, task.retry)
    dst = Storage(task.dst_url, task.dst_options, task.retry)
    name = shard_name(task.subset, task.index)
    plan = read_shard_rows(dst, name)
    keys, paths = plan["key"].to_pylist(), plan["path"].to_pylist()
    kept: list[int] = []
    packed: dict[str, list] = {"offset": [], "size": [], "width": [], "height": [], "sha256": []}
    offsets, sizes, widths, heights, hashes = packed.values()
    rejects: list[dict] = []
    with dst.open_atomic(f"{SHARD_DIR}/{name}.tar") as f:
        writer = ShardWriter(f)
        for i, data in enumerate(_with_sources(src, paths)):
            try:
                if isinstance(data, Exception):
                    raise Rejected(_READ_REASONS.get(type(data), "unreadable"), f"{type(data).__name__}: {data}")
                out = prepare(data, task.image)
            except Rejected as rej:
                rejects.append({"path": paths[i], "subset": task.subset, "reason": rej.reason, "detail": rej.detail})
                continue
            kept.append(i)
            offsets.append(writer.add(keys[i], out.data))
            sizes.append(len(out.data))
            widths.append(out.width)
            heights.append(out.height)
            hashes.append(hashlib.sha256(out.data).hexdigest())
        size, digest = writer.close()
    dst.write_atomic(f"{SHARD_DIR}/{name}.idx", writer.dali_index().encode())
    rows = plan.take(pa.array(kept, pa.int64()))
    images = pa.table({"key": rows["key"], "subset": pa.array([task.subset] * len(kept), pa.string()),
                       "path": rows["path"], "folder": rows["folder"], "pid": rows["pid"], "camid": rows["camid"],
                       "distractor": rows["distractor"], "shard": pa.array([name] * len(kept), pa.string()),
                       **{k: pa.array(v) for k, v in packed.items()}})
    dst.write_table(f"{PARTS_DIR}/{name}.images.parquet", images.cast(manifests.schema("images")))
    dst.write_table(f"{PARTS_DIR}/{name}.rejects.parquet",
                    pa.Table.from_pylist(rejects, schema=manifests.schema("rejects")))
    stats = ShardStats(name, task.subset, len(images), len(rejects), size, digest, rows_digest(plan))
    dst.write_atomic(marker_path(name), json.dumps(asdict(stats)).encode())
    return stats
