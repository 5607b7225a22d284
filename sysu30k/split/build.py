"""``sysu30k split``: the official test split and a held-out validation split, built with Dask.

Input: ``DST/manifests/images.parquet`` as ``sysu30k shard`` writes it (one row group per shard, in shard
order). Output, each written atomically, the summary last:

* ``DST/manifests/split.parquet`` (table ``split``): one row per image of a split, test rows first, then
  val rows, each in shard order; filter on the ``split`` column (test|val).
* ``DST/manifests/holdout.parquet`` (table ``holdout``): the training folders taken out of training for
  the val split (role query or distractor) and their guard bands (role guard). Rewritten on every run,
  empty without ``val_folders``, so it never holds a previous run's choice; :func:`excluded_folders`
  refuses it when it disagrees with the summary (a run that died between the two writes).
* ``DST/manifests/split_summary.json``: counts, the held-out folders, every finding. No timings, so the
  same inputs and options give byte-identical outputs.

**Test split.** Queries are the ``query`` images, the gallery the ``gallery`` images, exactly as the
official evaluator walks them (SYSU30K.md §2). The invariants of :mod:`sysu30k.split.checks` are
checked, not assumed, and each broken one is logged as a warning naming up to 10 offending files;
``strict`` turns them into a :class:`UserError` and nothing is written. Expected counts (``expected``):
``"official"`` = 1,000 queries / 479,730 gallery images, and a deviation names the missing identities
(of the released range 28311..29310), the files outside it and the distractor numbers that are missing
or extra; ``"auto"`` (default) is official unless the tree ``summary.json`` names as source is a
``sysu30k synth`` tree, whose own ``synth.json`` counts are expected then; ``"none"`` or None checks no
counts; ``(Q, G)`` or ``"Q,G"`` expects those.

**Val split** (``val_folders`` = N > 0). Training folders are impure: some of folder k's images show
identities k±1 and k±2. So the N held-out folders come in contiguous blocks of at most ``val_block``
folders, each flanked by a guard band of 2 folders on each side that is excluded from training *and*
from val: no training image can then show a val identity. Block positions are drawn uniformly (seeded)
among the sorted training folders (2 blocks at least when distractors are asked). A seeded
``val_distractors`` fraction of the *blocks* (default one half; at least one, and at least one query
block) gives distractors only: every image a gallery distractor (pid -1000, camid 1). Whole blocks, so a
distractor folder is never within impurity reach of a query folder. Each folder of a query block with 2
images or more (query folder) gives ``val_queries`` queries (default 1; camid 2, pid = folder id): the
images whose seeded hash of their key is smallest, which does not depend on how shards cut the folder,
and never all of them; its other images are its true matches (gallery, camid 1). Several queries per
folder give rank-1 the resolution to rank epochs (50 queries: steps of 2 %) where few folders can be
held out. Cameras are nominal: training images carry none. Neighbouring query
folders still share some people, so val labels are as noisy as training labels (some "true matches"
show a neighbour, some of a query's person sit in the next folder); use val to rank checkpoints, not
as a test result. :func:`training_bags` gives the bags with every bag touching a held-out or guard
folder removed; :func:`excluded_folders` the folders a trainer must skip.

**Dask.** Work is partitioned by manifest row group (= shard), never by image: a partition is a run of
whole consecutive row groups (about 100,000 rows, fewer so that every worker gets two), read with
pyarrow on the workers, with row groups picked from the footer statistics (test shards for the test
split; for val only the training shards whose folder range meets a held-out folder). Per-identity/role
counts and the key-duplicate search are Dask reductions; what comes back to the client is small
(counts, the non-distractor rows, duplicated keys) except the split rows
themselves, which stream to the client one partition at a time to be written into the one Parquet file.
``scheduler=None`` starts a 2-worker ``LocalCluster`` for the call; ``"tcp://HOST:PORT"`` uses an
existing cluster (its workers must be able to import sysu30k and read DST); ``"sync"`` runs the same
graph in this process without distributed (debugging, tiny data).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import manifests
from ..errors import UserError
from ..ingest.publish import load_summary
from ..io.lock import exclusive
from ..io.storage import Storage
from ..manifests import LOCK, SPLIT_SUMMARY
from ..release.constants import (
    DISTRACTOR_PID,
    GALLERY_CAMID,
    OFFICIAL_GALLERY,
    OFFICIAL_QUERIES,
    OFFICIAL_TEST_IDS,
    QUERY_CAMID,
)
from .checks import Finding, check_counts, check_split
from .config import GUARD, SplitOptions
from .holdout import Holdout, bag_counts, choose_holdout

log = logging.getLogger("sysu30k")

SUMMARY_VERSION = 1
ROW_GROUP_ROWS = 1 << 16                  # rows per row group of split.parquet
PARTITION_ROWS = 100_000                  # rows per Dask partition, at most (whole row groups; one can be larger)
SYNTH_JSON = "synth.json"
_READ = ["key", "subset", "path", "folder", "pid", "camid", "distractor"]
_DTYPES = {"split": "str", "role": "str", "key": "str", "pid": "Int32", "camid": "Int8", "distractor": "bool",
           "folder": "Int32", "path": "str"}


# ----------------------------------------------------------------------------- reading row groups (workers)

@dataclass(frozen=True)
class _Source:
    """images.parquet as the workers open it: full fsspec URL, options (JSON), and a version token."""

    url: str
    options: str
    token: str


@functools.lru_cache(maxsize=4)
def _footer(src: _Source) -> pq.FileMetaData:
    """The footer, parsed once per worker process and file version (a 2,000-row-group footer is MBs)."""
    fs, path = fsspec.core.url_to_fs(src.url, **json.loads(src.options))
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f)


def _read_groups(src: _Source, indices: tuple[int, ...], columns: list[str]) -> pa.Table:
    """Whole row groups ``indices`` (shards) of images.parquet, ``columns`` only."""
    fs, path = fsspec.core.url_to_fs(src.url, **json.loads(src.options))
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f, metadata=_footer(src)).read_row_groups(list(indices), columns=columns)


_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype(), pa.int8(): pd.Int8Dtype()}.get


def _frame(data: dict) -> pd.DataFrame:
    """A split frame (the columns of _DTYPES, in order) from arrays or lists."""
    schema = manifests.schema("split")
    t = pa.table({c: pa.array(data[c], schema.field(c).type) if not isinstance(data[c], pa.ChunkedArray)
                  else data[c] for c in schema.names}, schema=schema)
    return t.to_pandas(types_mapper=_PANDAS_TYPES).astype(_DTYPES)


def _empty() -> pd.DataFrame:
    return _frame({c: [] for c in _DTYPES})


def _test_part(indices: tuple[int, ...], src: _Source) -> pd.DataFrame:
    """The test rows (query and gallery images) of row groups ``indices``."""
    t = _read_groups(src, indices, _READ)
    t = t.filter(pc.is_in(t["subset"], pa.array(["query", "gallery"])))
    n = t.num_rows
    return _frame({"split": pa.repeat(pa.scalar("test"), n), "role": t["subset"], "key": t["key"], "pid": t["pid"],
                   "camid": t["camid"], "distractor": t["distractor"], "folder": pa.nulls(n, pa.int32()),
                   "path": t["path"]})


def _folder_part(indices: tuple[int, ...], src: _Source) -> pd.DataFrame:
    """Images per training folder in row groups ``indices``."""
    t = _read_groups(src, indices, ["subset", "folder"])
    t = t.filter(pc.and_(pc.equal(t["subset"], "train"), pc.is_valid(t["folder"])))
    vc = pc.value_counts(t["folder"])
    return pd.DataFrame({"folder": vc.field("values").to_numpy(zero_copy_only=False).astype(np.int64),
                         "n": vc.field("counts").to_numpy(zero_copy_only=False).astype(np.int64)})


def _score(seed: int, keys) -> np.ndarray:
    """A seeded, partition-independent 63-bit hash of each key (picks the query of a val folder)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}/{k}".encode(), digest_size=8).digest(), "big") >> 1
                     for k in keys], dtype=np.int64)


def _val_part(indices: tuple[int, ...], src: _Source, roles: dict[int, str], seed: int) -> pd.DataFrame:
    """Rows of held-out folders in row groups ``indices``, all gallery for now, with their query score."""
    t = _read_groups(src, indices, ["key", "subset", "path", "folder"])
    t = t.filter(pc.and_(pc.equal(t["subset"], "train"), pc.is_in(t["folder"], pa.array(list(roles), pa.int32()))))
    folder = t["folder"].to_numpy(zero_copy_only=False).astype(np.int64)
    is_query = np.array([roles[f] == "query" for f in folder], dtype=bool)
    n = len(folder)
    out = _frame({"split": pa.repeat(pa.scalar("val"), n), "role": pa.repeat(pa.scalar("gallery"), n),
                  "key": t["key"], "pid": np.where(is_query, folder, DISTRACTOR_PID),
                  "camid": np.full(n, GALLERY_CAMID), "distractor": ~is_query, "folder": folder, "path": t["path"]})
    out["score"] = _score(seed, out["key"])
    return out


def _query_cutoffs(scores: pd.DataFrame, per_folder: int) -> dict[int, int]:
    """Per query folder, the highest score that still makes a query: its ``per_folder`` lowest scores, at most
    all but one image (which stays its true match)."""
    out = {}
    for folder, s in scores.groupby("folder")["score"]:
        ranked = np.sort(s.to_numpy(dtype=np.int64))
        out[int(folder)] = int(ranked[max(0, min(per_folder, len(ranked) - 1) - 1)])
    return out


def _mark_queries(part: pd.DataFrame, cutoffs: dict[int, int]) -> pd.DataFrame:
    """Make the images of each query folder scoring at most its cutoff its queries (camid QUERY_CAMID)."""
    part = part.copy()
    # In int64 throughout: a pandas map of the 63-bit scores gives float64 as soon as a partition holds a
    # folder without a query (a distractor folder), and float64 keeps only 53 bits of them.
    folders = part["folder"].to_numpy(dtype=np.int64, na_value=-1)
    wanted = np.fromiter((cutoffs.get(int(f), -1) for f in folders), dtype=np.int64, count=len(folders))
    pick = ((part["score"].to_numpy(dtype=np.int64) <= wanted) & (wanted >= 0)
            & ~part["distractor"].to_numpy(dtype=bool))
    part.loc[pick, "role"] = "query"
    part.loc[pick, "camid"] = QUERY_CAMID
    return part[list(_DTYPES)]


def _distractor_numbers(part: pd.DataFrame) -> pd.Series:
    """K of every ``0000others_c1_K.jpg`` distractor of a partition (-1 when the name has no number)."""
    d = part[part["distractor"]]
    k = d["path"].str.extract(r"_c\d+_(\d+)\.[A-Za-z]+$", expand=False)
    return pd.to_numeric(k, errors="coerce").fillna(-1).astype(np.int64)


# ----------------------------------------------------------------------------- running (client)

class _Runner:
    """Computes Dask collections on a distributed Client, or in this process (``client`` None)."""

    def __init__(self, client=None):
        self.client = client
        self.workers = len(client.scheduler_info(n_workers=-1)["workers"]) if client is not None else 1

    def batches(self, groups: list[_Group]) -> list[tuple[int, ...]]:
        """Partitions of whole row groups: about PARTITION_ROWS rows, and 2 per worker at least."""
        total = sum(g.rows for g in groups)
        return _batches(groups, max(1, min(PARTITION_ROWS, math.ceil(total / (2 * max(1, self.workers))))))

    def persist(self, df):
        return self.client.persist(df) if self.client is not None else df.persist(scheduler="sync")

    def compute(self, *objs) -> list:
        import dask

        if self.client is not None:
            return self.client.compute(list(objs), sync=True)
        return list(dask.compute(*objs, scheduler="sync"))

    def partitions(self, df) -> Iterator[pd.DataFrame]:
        """The partitions of ``df`` in order, one at a time."""
        parts = df.to_delayed()
        if self.client is None:
            for p in parts:
                yield p.compute(scheduler="sync")
            return
        futures = self.client.compute(parts)
        for fut in futures:                           # the client holds one partition at a time
            yield fut.result()
            fut.release()


@contextlib.contextmanager
def _runner(scheduler: str | None, workers: int) -> Iterator[_Runner]:
    if scheduler == "sync":
        yield _Runner()
        return
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        with client:
            run = _Runner(client)
            log.info("split: on %s (%d workers)", scheduler, run.workers)
            yield run
        return
    log.info("split: starting a local Dask cluster of %d workers", workers)
    # dashboard ":0": the scheduler's HTTP server takes a free port (None would still try 8787 and warn)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield _Runner(client)


# ----------------------------------------------------------------------------- inputs and options

@dataclass(frozen=True)
class _Group:
    index: int
    rows: int
    subset: str | None          # None: no statistics, so any subset
    folders: tuple[int, int] | None


def _batches(groups: list[_Group], target_rows: int) -> list[tuple[int, ...]]:
    """Consecutive row groups (whole shards) joined into partitions of about ``target_rows`` rows.

    A partition is never a part of a shard; joining the small ones keeps per-task overhead (a task
    costs milliseconds on the scheduler and the worker) small next to the work when shards are small.
    """
    out: list[tuple[int, ...]] = []
    cur: list[int] = []
    rows = 0
    for g in groups:
        cur.append(g.index)
        rows += g.rows
        if rows >= target_rows:
            out.append(tuple(cur))
            cur, rows = [], 0
    if cur:
        out.append(tuple(cur))
    return out


def _row_groups(md: pq.FileMetaData) -> list[_Group]:
    names = md.schema.to_arrow_schema().names
    si, fi = names.index("subset"), names.index("folder")
    out = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        s, f = rg.column(si).statistics, rg.column(fi).statistics
        subset = s.min if s is not None and s.has_min_max and s.min == s.max else None
        folders = (int(f.min), int(f.max)) if f is not None and f.has_min_max else None
        out.append(_Group(i, rg.num_rows, subset, folders))
    return out


def parse_expected(value) -> tuple[str, tuple[int, int] | None]:
    """(mode, counts) of an ``expected`` option: auto, official, none/None, (Q, G) or "Q,G"."""
    if value is None or value == "none":
        return "none", None
    if value == "official":
        return "official", (OFFICIAL_QUERIES, OFFICIAL_GALLERY)
    if value == "auto":
        return "auto", None
    try:
        q, g = (int(x) for x in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UserError(f"--expect takes auto, official, none or QUERIES,GALLERY, not {value!r}") from None
    if q < 0 or g < 0:
        raise UserError("--expect counts must not be negative")
    return "counts", (q, g)


def _resolve_expected(value, shard_summary: dict) -> tuple[str, tuple[int, int] | None]:
    mode, counts = parse_expected(value)
    if mode != "auto":
        return mode, counts
    source = shard_summary.get("source")
    try:
        src = Storage(source)
        if src.exists(SYNTH_JSON):
            c = json.loads(src.read_text(SYNTH_JSON))["counts"]
            return "synth", (int(c["query_images"]), int(c["gallery_images"]))
    except Exception as exc:   # an unreachable or moved source: the release is the default
        log.info("split: cannot look at the source %s (%s); expecting the official counts", source, exc)
    return "official", (OFFICIAL_QUERIES, OFFICIAL_GALLERY)


# ----------------------------------------------------------------------------- one split

@dataclass
class _Built:
    rows: object                          # persisted Dask frame of the split rows
    counts: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


def _reduce(run: _Runner, rows) -> tuple[pd.DataFrame, dict]:
    """The rows every invariant needs (see split_checks) and the counts, from a persisted split frame."""
    vc = rows["key"].value_counts(split_out=1)   # a tree reduction: no shuffle
    keep = ((rows["role"] == "query") | ~rows["distractor"] | (rows["pid"] != DISTRACTOR_PID) | rows["pid"].isna())
    dup_keys, sizes, small = run.compute(vc[vc > 1], rows.groupby(["role", "distractor"]).size(split_out=1),
                                         rows[keep])
    if len(dup_keys):                            # rare: add every row of a duplicated key
        (more,) = run.compute(rows[~keep & rows["key"].isin(list(dup_keys.index))])
        small = pd.concat([small, more])
    sizes = {(r, bool(d)): int(n) for (r, d), n in sizes.items()}
    counts = {"queries": sum(n for (r, _), n in sizes.items() if r == "query"),
              "gallery": sum(n for (r, _), n in sizes.items() if r == "gallery"),
              "true_matches": sizes.get(("gallery", False), 0), "distractors": sizes.get(("gallery", True), 0)}
    q = small[(small["role"] == "query") & small["pid"].notna() & ~small["distractor"]]
    counts["identities"] = int(q["pid"].nunique())
    return small, counts


def _build_test(run: _Runner, dd, src: _Source, groups: list[_Group], expect_mode: str,
                expected: tuple[int, int] | None) -> _Built:
    parts = run.batches([g for g in groups if g.subset in ("query", "gallery", None)])
    rows = run.persist(dd.from_map(_test_part, parts, args=[src], meta=_empty(), label="test-rows")
                       if parts else dd.from_pandas(_empty(), npartitions=1))
    small, counts = _reduce(run, rows)
    findings = check_split(small, "test")
    if expected is not None and (counts["queries"], counts["gallery"]) != expected:
        (numbers,) = run.compute(rows.map_partitions(_distractor_numbers, meta=("path", "int64")))
        findings += check_counts("test", counts["queries"], counts["gallery"], expected, small,
                                 OFFICIAL_TEST_IDS if expect_mode == "official" else None, numbers.to_numpy())
    return _Built(rows, counts, findings)


def _build_val(run: _Runner, dd, src: _Source, groups: list[_Group], holdout: Holdout, seed: int,
               per_folder: int) -> _Built:
    roles = holdout.roles()
    lo, hi = min(roles), max(roles)
    parts = run.batches([g for g in groups if g.subset in ("train", None)
                         and (g.folders is None or (g.folders[0] <= hi and g.folders[1] >= lo))])
    meta = _empty().assign(score=pd.Series([], dtype="int64"))
    raw = run.persist(dd.from_map(_val_part, parts, args=[src, roles, seed], meta=meta, label="val-rows"))
    (scores,) = run.compute(raw[~raw["distractor"]][["folder", "score"]])     # the query folders' images only
    rows = run.persist(raw.map_partitions(_mark_queries, _query_cutoffs(scores, per_folder), meta=_empty()))
    small, counts = _reduce(run, rows)
    return _Built(rows, counts, check_split(small, "val", per_folder))


# ----------------------------------------------------------------------------- the whole command



_D = SplitOptions          # the defaults of build_splits are the declarations of the options


def build_splits(dst_url: str, val_folders: int = _D.val_folders, seed: int = _D.seed, scheduler: str | None = None,
                 strict: bool = _D.strict, expected=_D.expected, val_block: int = _D.val_block,
                 val_distractors: float = _D.val_distractors, val_queries: int = _D.val_queries,
                 workers: int = _D.workers, storage_options: dict | None = None) -> dict:
    """Build the test (and, with ``val_folders``, the val) split of DST; returns the summary.

    See the module doc for the outputs, ``expected``, ``scheduler`` and the val rules. Raises UserError
    when DST holds no complete ``sysu30k shard`` output, for impossible options, and under ``strict``
    when an invariant is broken (then nothing is written).
    """
    import dask.dataframe as dd

    if val_folders < 0:
        raise UserError("--val-folders must not be negative")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    dst = Storage(dst_url, storage_options)
    with exclusive(dst, LOCK, "sysu30k split"):     # one writer per DST
        images_rel = manifests.relpath("images")
        if not dst.exists(images_rel):
            raise UserError(f"{dst.url} has no {images_rel}: run `sysu30k shard SRC DST` first")
        shard_summary = load_summary(dst)
        if shard_summary is None:
            raise UserError(f"{dst.url} has no manifests/summary.json: `sysu30k shard` did not finish; rerun it")
        expect_mode, expected_counts = _resolve_expected(expected, shard_summary)
        info = dst.fs.info(dst.path(images_rel))
        src = _Source(dst.fs.unstrip_protocol(dst.path(images_rel)), json.dumps(storage_options or {}, sort_keys=True),
                      f"{info.get('size')}-{info.get('mtime') or info.get('ETag') or info.get('LastModified')}")
        try:
            with dst.open(images_rel) as f:
                md = pq.read_metadata(f)
        except pa.ArrowInvalid as exc:
            raise UserError(f"{dst.url}/{images_rel} is damaged (not a readable Parquet file: "
                            f"{str(exc).splitlines()[0]}); rerun `sysu30k shard` with --overwrite") from None
        groups = _row_groups(md)
        log.info("split: %s has %d rows in %d row groups; expecting %s", images_rel, md.num_rows, len(groups),
                 "no particular counts" if expected_counts is None
                 else f"{expected_counts[0]:,} / {expected_counts[1]:,} ({expect_mode})")
        with _runner(scheduler, workers) as run:
            test = _build_test(run, dd, src, groups, expect_mode, expected_counts)
            holdout, val = Holdout(), None
            if val_folders:
                train = run.batches([g for g in groups if g.subset in ("train", None)])
                if not train:
                    raise UserError("--val-folders needs training images, and DST holds none")
                (fc,) = run.compute(dd.from_map(_folder_part, train, args=[src], label="folder-counts",
                                                meta=pd.DataFrame({"folder": pd.Series([], dtype="int64"),
                                                                   "n": pd.Series([], dtype="int64")}))
                                    .groupby("folder")["n"].sum(split_out=1))
                holdout = choose_holdout({int(k): int(v) for k, v in fc.items()}, val_folders, seed, val_block,
                                         val_distractors)
                val = _build_val(run, dd, src, groups, holdout, seed, val_queries)
            findings = test.findings + (val.findings if val else [])
            for f in findings:
                log.warning("split: %s", f.line())
            if findings and strict:
                raise UserError(f"{len(findings)} split invariant(s) broken (--strict; nothing written): "
                                + " | ".join(f.line() for f in findings[:3]))
            _write_split(dst, run, [test] + ([val] if val else []))
        bags_kept, bags_total = bag_counts(dst, holdout.excluded())
        dst.write_atomic(manifests.relpath("holdout"), _parquet_bytes(holdout.table()))
        summary = {
            "version": SUMMARY_VERSION,
            "images": {"rows": md.num_rows, "row_groups": len(groups), "bytes": info.get("size")},
            "expected": {"mode": expect_mode, "queries": expected_counts[0] if expected_counts else None,
                         "gallery": expected_counts[1] if expected_counts else None},
            "splits": {"test": test.counts, **({"val": val.counts} if val else {})},
            "val": {"folders": val_folders, "seed": seed, "block": val_block, "guard": GUARD,
                    "distractor_fraction": val_distractors, "queries_per_folder": val_queries,
                    "blocks": [list(b) for b in holdout.blocks],
                    "query_folders": list(holdout.query), "distractor_folders": list(holdout.distractor),
                    "guard_folders": list(holdout.guard)},
            "training_bags": {"kept": bags_kept, "excluded": bags_total - bags_kept},
            "findings": [f.as_dict() for f in findings],
            "ok": not findings,
            "manifests": {t: manifests.relpath(t) for t in ("split", "holdout")},
        }
        dst.write_atomic(SPLIT_SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
        return summary


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _write_split(dst: Storage, run: _Runner, built: list[_Built]) -> None:
    schema = manifests.schema("split")
    with dst.open_atomic(manifests.relpath("split")) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        buf: list[pa.Table] = []
        pending, written = 0, False
        for b in built:
            for part in run.partitions(b.rows):
                buf.append(pa.Table.from_pandas(part[schema.names], schema=schema, preserve_index=False))
                pending += len(part)
                if pending >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(buf), row_group_size=pending)
                    buf, pending, written = [], 0, True
        if pending or not written:
            writer.write_table(pa.concat_tables(buf) if buf else schema.empty_table(), row_group_size=max(pending, 1))
