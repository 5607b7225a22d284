"""``sysu30k verify``: check a finished DST against its own manifests, byte for byte.

Every shard of ``shards.parquet`` must exist with its size and sha256, its DALI index must list exactly the
members of ``images.parquet`` for that shard (offsets and sizes), every image's bytes at its offset must
have its sha256, and (when shards carry labels) the ``KEY.json`` after it must hold the manifest's labels;
tars in ``shards/`` that no manifest names are reported as extra. Reads each tar once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .. import manifests
from ..errors import UserError
from ..io.progress import progress
from ..io.storage import Storage
from ..manifests import SHARD_DIR, SHARD_NAME, SUMMARY
from ..release.constants import IMAGE_EXT
from .labels import LABEL_EXT, label_bytes
from .tarpack import dali_index, next_member_offset


@dataclass
class Report:
    """What ``verify`` checked, and each difference found (kind, where, detail)."""

    shards: int = 0
    images: int = 0
    bytes: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, where: str, detail: str) -> None:
        self.problems.append((kind, where, detail))


def shard_sizes(dst: Storage) -> dict[str, int]:
    """The byte size of every shard ``shards.parquet`` names (a UserError when DST has no such manifest)."""
    rel = manifests.relpath("shards")
    if not dst.exists(rel):
        raise UserError(f"{dst.url} has no {rel}: `sysu30k shard` has not finished there")
    t = dst.read_table(rel, columns=["shard", "bytes"])
    return dict(zip(t["shard"].to_pylist(), t["bytes"].to_pylist()))


def missing_or_resized(dst: Storage) -> list[str]:
    """Shards of the manifest whose tar is missing or has another size than recorded (one listing, no reads)."""
    on_disk = {e.name: e.size for e in dst.listdir(SHARD_DIR)} if dst.isdir(SHARD_DIR) else {}
    out = []
    for name, size in shard_sizes(dst).items():
        found = on_disk.get(f"{name}.tar")
        if found != size:
            out.append(f"{name}.tar ({'missing' if found is None else f'{found} bytes, not {size}'})")
    return out


def verify(dst_url: str, storage_options: dict | None = None, show_progress: bool = True) -> Report:
    """Re-hash every tar and image of DST against its manifests; returns what was checked and found."""
    dst = Storage(dst_url, storage_options)
    if not dst.exists(SUMMARY):
        raise UserError(f"{dst.url} has no {SUMMARY}: `sysu30k shard` has not finished there")
    shards = dst.read_table(manifests.relpath("shards"), columns=["shard", "bytes", "sha256"]).to_pylist()
    images = dst.read_table(manifests.relpath("images"), columns=[
        "key", "shard", "offset", "size", "sha256", "subset", "folder", "pid", "camid", "distractor"])
    labels = bool(dst.read_json(SUMMARY)["settings"].get("labels"))
    report = Report()
    named = {s["shard"] for s in shards}
    for e in dst.listdir(SHARD_DIR) if dst.isdir(SHARD_DIR) else []:
        stem = e.name.rsplit(".", 1)[0]
        if e.name.endswith((".tar", ".idx")) and stem not in named:
            report.add("extra", f"{SHARD_DIR}/{e.name}", "no manifest names this shard")
    rows = _rows_by_shard(images)
    with progress(len(shards), "verifying", "shard", show_progress) as bar:
        for s in shards:
            _check_shard(dst, s, rows.pop(s["shard"], images.slice(0, 0)), report, labels)
            bar.update(1)
    unknown = set(rows) - named
    for name in sorted(unknown):
        report.add("missing", f"{SHARD_DIR}/{name}.tar", "images.parquet names a shard shards.parquet does not")
    return report


def _rows_by_shard(images: pa.Table) -> dict[str, pa.Table]:
    """The rows of each shard (one sort of the table, not one scan of it per shard)."""
    images = images.sort_by([("shard", "ascending")])
    names = images["shard"].to_numpy(zero_copy_only=False)
    if not len(names):
        return {}
    starts = np.concatenate([[0], np.flatnonzero(names[1:] != names[:-1]) + 1, [len(names)]])
    return {str(names[a]): images.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:])}


def _check_shard(dst: Storage, s: dict, rows, report: Report, labels: bool) -> None:
    name = s["shard"]
    tar_rel, idx_rel = f"{SHARD_DIR}/{name}.tar", f"{SHARD_DIR}/{name}.idx"
    report.shards += 1
    if not SHARD_NAME.match(name):
        report.add("bad-name", name, "not <subset>-NNNNNN")
        return
    if not dst.exists(tar_rel):
        report.add("missing", tar_rel, f"{len(rows)} image(s) of the manifest are in it")
        return
    data = dst.read(tar_rel)
    report.bytes += len(data)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != s["bytes"] or digest != s["sha256"]:
        report.add("different", tar_rel, f"{len(data)} bytes, sha256 {digest[:12]}…; the manifest says "
                   f"{s['bytes']} bytes, {s['sha256'][:12]}…")
    cols = rows.to_pydict()
    samples = []
    for i, (key, offset, size, sha) in enumerate(zip(cols["key"], cols["offset"], cols["size"], cols["sha256"])):
        report.images += 1
        if offset + size > len(data) or hashlib.sha256(data[offset:offset + size]).hexdigest() != sha:
            report.add("different", f"{tar_rel}:{key}", f"the bytes at offset {offset} are not the manifest's image")
        sample = [(IMAGE_EXT, offset, size, f"{key}.{IMAGE_EXT}")]
        if labels:
            want = label_bytes(*(cols[c][i] for c in ("subset", "folder", "pid", "camid", "distractor")))
            at = next_member_offset(offset, size)
            if data[at:at + len(want)] != want or data[at - 512:at].split(b"\0", 1)[0] != f"{key}.{LABEL_EXT}".encode():
                report.add("different", f"{tar_rel}:{key}.{LABEL_EXT}", "the labels after the image are not the "
                           "manifest's")
            sample.append((LABEL_EXT, at, len(want), f"{key}.{LABEL_EXT}"))
        samples.append(sample)
    if not dst.exists(idx_rel):
        report.add("missing", idx_rel, "the DALI index of the shard")
    elif dst.read_text(idx_rel) != dali_index(samples):
        report.add("different", idx_rel, "its members are not the manifest's (offsets, sizes or names)")
