"""Pack one planned shard: read its sources, validate and convert each image, write the tar.

Sources are extracted files (read one by one locally, fetched in concurrent batches from object storage)
or members of the download's archives, read by byte range: consecutive members of one archive are
coalesced into windows (over a whole batch, whatever the order of its rows), so a shard costs a few large
reads per archive instead of one request per image.

Publishing order makes a crash harmless: the tar, its DALI index and the shard's manifest parts are
each written under a temporary name and renamed into place, and only then is the completion marker
``_parts/<shard>.done.json`` written. A shard without a marker (or whose tar size disagrees with it, or
whose marker names other planned rows) is packed again from scratch, with the same bytes as result.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import pyarrow as pa

from .. import manifests
from ..errors import UserError
from ..io.retry import RetryPolicy
from ..io.storage import NotRegularFile, Storage, TooLarge
from ..io.tuning import tune_malloc
from ..manifests import PARTS_DIR, SHARD_DIR
from .config import MAX_SOURCE_BYTES, ImageOptions
from .imageproc import Rejected, prepare
from .labels import LABEL_EXT, label_bytes
from .plan import read_shard_rows, rows_digest, shard_name
from .tarpack import ShardWriter

READ_CHUNK = 128                     # source objects fetched per batch (concurrently on object stores)
READ_BYTES = 64 << 20                # or this many bytes of archive windows, whichever comes first
WINDOW_BYTES = 16 << 20              # one read of consecutive archive members: at most this long
WINDOW_GAP = 256 << 10               # and it skips at most this much between two members


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to pack one shard; small and picklable (no image bytes)."""

    src_url: str
    dst_url: str
    subset: str
    index: int
    image: ImageOptions
    labels: bool = True
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


class ArchiveTruncated(OSError):
    """A member whose bytes the archive no longer holds (it shrank after it was indexed)."""


# a failed read's reject reason, by its exception (any other: unreadable)
_READ_REASONS = {NotRegularFile: "not-a-file", TooLarge: "too-large", ArchiveTruncated: "archive-truncated"}


def start_worker() -> None:
    """Set up a local packing process before its first task: tuned malloc, and Ctrl-C left to the parent
    (which stops the workers itself, so none dies mid-task with a traceback of its own). SIGTERM, with which
    the parent stops them, is at its default: the pool forks with it so (``shard._runner``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()


class _Source(NamedTuple):
    """Where one planned row's bytes are: an extracted file (``archive`` None) or a member's byte range."""

    path: str
    archive: str | None
    offset: int | None
    size: int


def _batches(rows: pa.Table) -> Iterator[list[_Source]]:
    """The rows' sources in order, in batches of about READ_CHUNK extracted files or READ_BYTES of members."""
    batch: list[_Source] = []
    files = nbytes = 0
    for row in zip(*(rows[c].to_pylist() for c in ("path", "archive", "offset", "src_size"))):
        item = _Source(*row)
        batch.append(item)
        if item.archive is None:
            files += 1
        else:
            nbytes += item.size
        if files >= READ_CHUNK or nbytes >= READ_BYTES:
            yield batch
            batch, files, nbytes = [], 0, 0
    if batch:
        yield batch


def windows(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) reads covering the (offset, size) ranges of one archive: ranges sorted by offset merge
    while the gap between them is at most WINDOW_GAP and the read stays within WINDOW_BYTES."""
    out: list[list[int]] = []
    for offset, size in sorted(ranges):
        if out and offset <= out[-1][1] + WINDOW_GAP and offset + size - out[-1][0] <= WINDOW_BYTES:
            out[-1][1] = max(out[-1][1], offset + size)
        else:
            out.append([offset, offset + size])
    return [(a, b) for a, b in out]


def _fetch(src: Storage, batch: list[_Source]) -> list[bytes | Exception]:
    """The bytes of each source of ``batch`` (or the exception reading it ended with): extracted files read
    as files, the members of each archive through the fewest windows that cover them, whatever their order
    in the batch (folders interleaved across parts are read in one pass over each part)."""
    out: list[bytes | Exception | None] = [None] * len(batch)
    files = [i for i, item in enumerate(batch) if item.archive is None]
    for i, data in zip(files, src.read_many([batch[i].path for i in files], MAX_SOURCE_BYTES) if files else []):
        out[i] = data
    by_archive: dict[str, list[int]] = {}
    for i, item in enumerate(batch):
        if item.archive is not None:
            by_archive.setdefault(item.archive, []).append(i)
    for archive, members in by_archive.items():
        reads = windows([(batch[i].offset, batch[i].size) for i in members])
        try:
            got = src.read_ranges(archive, [a for a, _ in reads], [b for _, b in reads])
        except OSError as exc:
            got = [exc] * len(reads)
        starts = [a for a, _ in reads]
        for i in members:
            offset, size = batch[i].offset, batch[i].size
            w = bisect.bisect_right(starts, offset) - 1
            data = got[w]
            if isinstance(data, Exception):
                out[i] = data
            elif offset + size - starts[w] > len(data):
                out[i] = ArchiveTruncated(errno.EIO, f"{archive} ends before byte {offset + size}")
            else:
                out[i] = data[offset - starts[w]:offset - starts[w] + size]
    return out


def _with_sources(src: Storage, rows: pa.Table) -> Iterator[bytes | Exception]:
    """The bytes of each planned row's source (or the exception reading it ended with): local files and
    archive windows read here, in order; on an object store, fetched in batches one batch ahead."""
    batches = _batches(rows)
    if src.local:      # a reading thread would only trade the GIL back and forth with this one
        for batch in batches:
            yield from _fetch(src, batch)
        return
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(_fetch, src, next(batches, []))
        while True:
            batch = next(batches, None)
            data = ahead.result()
            if batch is not None:
                ahead = reader.submit(_fetch, src, batch)
            yield from data
            if batch is None:
                return


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
    folders, pids, camids, distractors = (plan[c].to_pylist() for c in ("folder", "pid", "camid", "distractor"))
    kept: list[int] = []
    packed: dict[str, list] = {"offset": [], "size": [], "width": [], "height": [], "sha256": []}
    offsets, sizes, widths, heights, hashes = packed.values()
    rejects: list[dict] = []
    with dst.open_atomic(f"{SHARD_DIR}/{name}.tar") as f:
        writer = ShardWriter(f)
        for i, data in enumerate(_with_sources(src, plan)):
            try:
                if isinstance(data, Exception):
                    raise Rejected(_READ_REASONS.get(type(data), "unreadable"), f"{type(data).__name__}: {data}")
                out = prepare(data, task.image)
            except Rejected as rej:
                rejects.append({"path": paths[i], "subset": task.subset, "reason": rej.reason, "detail": rej.detail})
                continue
            kept.append(i)
            extras = ((LABEL_EXT, label_bytes(task.subset, folders[i], pids[i], camids[i], distractors[i])),) \
                if task.labels else ()
            offsets.append(writer.add(keys[i], out.data, extras))
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
