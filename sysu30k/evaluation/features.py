"""Features: extraction as the official evaluator makes them, and the feature Parquet file format.

Extraction (SYSU30K.md §2.1 step 4): the loader resizes to 256×128 (bicubic) and hands out uint8
images and their horizontally flipped copies; they are normalised with the ImageNet mean and std on the
device, ``f = model(x) + model(flip(x))``, then L2-normalised. Flip and normalisation can be turned off.

File format (table ``features`` of manifests/schema.toml): columns ``key`` (string), ``pid`` (int32,
−1000 for a distractor), ``camid`` (int8) and ``feature`` (list<float32>, one length for the whole
file). ``pid``/``camid`` may be null or absent; :func:`join_split` then takes them from
``DST/manifests/split.parquet``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .. import manifests
from ..errors import UserError
from ..io.progress import progress
from ..io.storage import Storage

log = logging.getLogger("sysu30k")
MAX_LIST_VALUES = 1 << 28           # values per written batch (list offsets are int32)


@dataclass
class FeatureSet:
    """Features of one role (query or gallery) with their labels; pids/camids None when the file had none."""

    keys: list[str]
    pids: np.ndarray | None
    camids: np.ndarray | None
    feats: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)


Batch = tuple[torch.Tensor, list[str], np.ndarray, np.ndarray]


def iter_features(model: torch.nn.Module, loader, device, flip: bool = True, normalize: bool = True,
                  dtype: torch.dtype = torch.float32) -> Iterator[Batch]:
    """Embed the valid images of ``loader`` (an :class:`~sysu30k.loader.EvalLoader`) with ``model``, batch
    by batch: ``(feats [n, D] float32 on the CPU, keys, pids, camids)``. Damaged images and padding slots
    are dropped (and logged at the end). ``dtype`` is the compute dtype on ``device`` (e.g.
    ``torch.bfloat16``: the model runs under autocast, its weights stay float32); features are summed,
    normalised and returned in float32."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dropped: list[str] = []
    total = sum(map(len, loader.catalog)) if hasattr(loader, "catalog") else None   # an EvalLoader's images
    try:
        with torch.inference_mode(), progress(total, "features", "img") as bar:
            for batch in loader:
                valid = batch.valid.numpy().astype(bool)
                dropped += [k for k, ok in zip(batch.keys, valid) if not ok and k]
                bar.update(sum(map(bool, batch.keys)))           # damaged images too, not padding slots
                if not valid.any():
                    continue
                b = batch.to(device)
                with autocast(device, dtype):
                    f = _embed(model, b.images).float()
                    if flip:
                        other = b.flipped if b.flipped is not None else torch.flip(b.images, dims=[3])
                        f = f + _embed(model, other).float()
                if normalize:
                    f = torch.nn.functional.normalize(f, dim=1)
                idx = torch.from_numpy(np.flatnonzero(valid))
                yield (f[idx.to(f.device)].cpu(), [batch.keys[i] for i in idx.tolist()],
                       batch.pid[idx].numpy().astype(np.int64) if batch.pid is not None else np.full(len(idx), -1),
                       batch.camid[idx].numpy().astype(np.int64) if batch.camid is not None else np.full(len(idx), -1))
    finally:
        model.train(was_training)
        if dropped:
            log.warning("feature extraction skipped %d damaged image(s), e.g. %s", len(set(dropped)),
                        ", ".join(sorted(set(dropped))[:5]))


def extract_features(model: torch.nn.Module, loader, device, flip: bool = True, normalize: bool = True,
                     dtype: torch.dtype = torch.float32):
    """All of :func:`iter_features` at once: ``(feats [N, D], keys, pids, camids)`` in loader order."""
    parts = list(iter_features(model, loader, device, flip, normalize, dtype))
    if not parts:
        return torch.zeros(0, 0), [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (torch.cat([p[0] for p in parts]), [k for p in parts for k in p[1]],
            np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for a half-precision ``dtype`` (inputs and weights stay float32), off for float32."""
    return torch.autocast(device.type, dtype=dtype if dtype != torch.float32 else None,
                          enabled=dtype != torch.float32)


def _embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):             # a model left in training mode by its own forward
        out = out.get("embedding", out.get("feat"))
    return out.flatten(1)


# ----------------------------------------------------------------------------- the Parquet format

class FeatureWriter:
    """A feature file written batch by batch (atomically: it appears, complete, when the ``with`` block
    ends without an error). ``pids``/``camids`` None: a keys-only file."""

    def __init__(self, path, storage: Storage | None = None, metadata: dict | None = None):
        self.store, self.rel = (storage, str(path)) if storage is not None else _local(path)
        schema = manifests.schema("features")
        if metadata:
            schema = schema.with_metadata({**schema.metadata, **{str(k).encode(): str(v).encode()
                                                                 for k, v in metadata.items()}})
        self.schema, self.dim, self.rows = schema, None, 0

    def __enter__(self) -> FeatureWriter:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(self.store.open_atomic(self.rel))
            self._writer = pq.ParquetWriter(f, self.schema, compression="zstd")
            stack.callback(self._writer.close)            # the footer first, then the rename
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write(self, keys, pids, camids, feats) -> None:
        """Append rows: ``feats`` [n, D] (D the same for the whole file)."""
        feats = np.ascontiguousarray(feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats,
                                     dtype=np.float32)
        if feats.ndim != 2:
            raise UserError(f"features must be [N, D], got shape {feats.shape}")
        n, d = feats.shape
        if self.dim is not None and d != self.dim:
            raise UserError(f"features are {d}-d after {self.dim}-d ones: one length per file")
        self.dim = d
        keys = [str(k) for k in keys]
        if len(keys) != n:
            raise UserError(f"{len(keys)} keys for {n} feature rows")

        def column(values, typ):
            if values is None:
                return pa.nulls(n, typ)
            a = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
            if len(a) != n:
                raise UserError(f"{len(a)} labels for {n} feature rows")
            return pa.array(a.astype(typ.to_pandas_dtype()), typ)

        pid_col, cam_col = column(pids, pa.int32()), column(camids, pa.int8())
        step = max(1, min(n, MAX_LIST_VALUES // max(d, 1)))
        for a in range(0, max(n, 1), step):
            b = min(n, a + step)
            offsets = pa.array(np.arange(0, (b - a) * d + 1, d, dtype=np.int32) if b > a else np.zeros(1, np.int32))
            vec = pa.ListArray.from_arrays(offsets, pa.array(feats[a:b].reshape(-1)))
            self._writer.write_table(pa.table([pa.array(keys[a:b], pa.string()), pid_col[a:b], cam_col[a:b], vec],
                                              schema=self.schema))
        self.rows += n


def write_features(path, keys, pids, camids, feats, storage: Storage | None = None,
                   metadata: dict | None = None) -> None:
    """Write a feature file in one go (atomically). ``pids``/``camids`` may be None (keys-only file)."""
    with FeatureWriter(path, storage, metadata) as w:
        w.write(keys, pids, camids, feats)


def merge_features(store: Storage, parts: list[str], rel: str, order: list[str], group_bytes: int = 64 << 20) -> None:
    """Write the rows of the feature files ``parts`` to ``rel`` (atomically) with their keys in ``order``
    and the first part's schema and metadata, reading the parts by row group, a few held at a time (as
    written by :class:`FeatureWriter`: a batch each), never a whole file. The parts must hold exactly the
    keys of ``order``, each once."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(FeatureFile(p, store)) for p in parts]
        where: dict[str, tuple[int, int, int]] = {}
        for i, f in enumerate(files):
            for r, keys in enumerate(f.group_keys()):
                for j, k in enumerate(keys):
                    where.setdefault(k, (i, r, j))
        rows = sum(f.rows for f in files)
        if not (len(where) == rows == len(order) == len(set(order)) and all(k in where for k in order)):
            raise UserError(f"the parts of {store.path(rel)} do not hold each image of the split once: was another "
                            "job writing the same feature file?")
        cached: collections.OrderedDict[tuple[int, int], pa.Table] = collections.OrderedDict()

        def group(i: int, r: int) -> pa.Table:
            if (i, r) not in cached:
                cached[(i, r)] = files[i].group(r)
                if len(cached) > 2 * len(files) + 2:          # the parts are read about in order
                    cached.popitem(last=False)
            cached.move_to_end((i, r))
            return cached[(i, r)]

        step = max(1, group_bytes * max(rows, 1) // max(sum(f.nbytes for f in files), 1))
        with store.open_atomic(rel) as out, pq.ParquetWriter(out, files[0].schema, compression="zstd") as writer:
            for a in range(0, len(order), step):
                at = [where[k] for k in order[a:a + step]]
                pieces, first = [], 0
                for j in range(1, len(at) + 1):
                    if j == len(at) or at[j][:2] != at[first][:2]:
                        pieces.append(group(*at[first][:2]).take([x[2] for x in at[first:j]]))
                        first = j
                writer.write_table(pa.concat_tables(pieces))


def read_features(path, storage: Storage | None = None) -> FeatureSet:
    """Read a feature file; checks the columns and that every vector has the same length."""
    store, rel = (storage, str(path)) if storage is not None else _local(path)
    if not store.exists(rel):
        raise UserError(f"no feature file at {path}")
    try:
        table = store.read_table(rel)
    except (UserError, OSError):
        raise UserError(f"{path} is not a Parquet feature file (damaged, or another format)") from None
    _check_columns(table.schema, path)
    vec = table["feature"].combine_chunks()
    stats = _VectorStats()
    flat = stats.add(vec)
    fault = stats.fault(path)
    if fault is not None:
        raise fault
    with warnings.catch_warnings():          # Arrow's buffer is read-only; a copy would double the peak memory
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        feats = torch.from_numpy(np.ascontiguousarray(flat))
    keys, pids, camids = _keys_and_labels(table, path)
    return FeatureSet(keys, pids, camids, feats)


def _check_columns(schema: pa.Schema, path) -> None:
    """Refuse a file without the key and feature columns, or whose feature column is not a list."""
    for need in ("key", "feature"):
        if need not in schema.names:
            raise UserError(f"{path} has no {need!r} column (need key, feature[, pid, camid])")
    typ = schema.field("feature").type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise UserError(f"{path}: column 'feature' must be a list of floats, not {typ}")


@dataclass
class _VectorStats:
    """What :func:`read_features` refuses about the feature column (rows without a vector, vectors of
    different lengths, rows with NaN or inf), counted over the batches of a file in file order."""

    rows: int = 0
    nulls: int = 0
    lo: int | None = None
    hi: int | None = None
    nonfinite: int = 0
    first_nonfinite: int = -1

    def add(self, vec: pa.Array, finite: bool = False) -> np.ndarray | None:
        """Count one batch of the feature column; returns its float32 ``[n, D]`` values while the file has
        no fault so far (None once it has one). ``finite``: also count the rows with NaN or inf."""
        n, start = len(vec), self.rows
        self.rows += n
        self.nulls += vec.null_count
        if n and vec.null_count < n:
            span = pc.min_max(pc.list_value_length(vec))
            lo, hi = span["min"].as_py(), span["max"].as_py()
            self.lo = lo if self.lo is None else min(lo, self.lo)
            self.hi = hi if self.hi is None else max(hi, self.hi)
        if self.nulls or self.lo != self.hi:
            return None
        d = self.lo or 0
        flat = pc.list_flatten(vec).to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d)
        if finite:
            bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
            if len(bad) and self.first_nonfinite < 0:
                self.first_nonfinite = start + int(bad[0])
            self.nonfinite += len(bad)
        return flat

    def fault(self, path, keys=None, name: str = "gallery features") -> UserError | None:
        """The error the in-memory path raises first for what was counted (None: nothing wrong); with
        ``keys``, rows with NaN or inf too, in :func:`~sysu30k.evaluation.scoring.score`'s words."""
        if self.nulls:
            return UserError(f"{path}: {self.nulls} row(s) have no feature vector")
        if self.lo != self.hi:
            return UserError(f"{path}: feature vectors have different lengths ({self.lo}..{self.hi})")
        if keys is not None and self.nonfinite:
            from .scoring import NonFiniteFeatures

            return NonFiniteFeatures(f"{self.nonfinite} of {self.rows} {name} are not finite (NaN or inf), e.g. "
                                     f"key {keys[self.first_nonfinite]}: nothing is scored")
        return None


def _keys_and_labels(table: pa.Table, path) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """The keys (strings, none missing, each once) and the pid/camid columns (None when absent or all
    null) of a feature table; any other column may be left out of ``table``."""
    n = table.num_rows
    names = set(table.column_names)
    typ = table.schema.field("key").type
    if not pa.types.is_string(typ) and not pa.types.is_large_string(typ):
        raise UserError(f"{path}: column 'key' must hold strings, not {typ}")
    if table["key"].null_count:
        raise UserError(f"{path}: {table['key'].null_count} row(s) have no key")
    keys = table["key"].to_pylist()
    if len(set(keys)) != n:
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise UserError(f"{path}: {n - len(set(keys))} duplicate key(s), e.g. {dup}: each image must appear once")

    def labels(name):
        if name not in names or table[name].null_count == n:
            return None
        col = table[name]
        if col.null_count:
            raise UserError(f"{path}: column {name!r} is null in {col.null_count} of {n} rows (all or none)")
        return col.to_numpy().astype(np.int64)

    return keys, labels("pid"), labels("camid")


class FeatureFile:
    """A feature file read a batch of rows at a time, for a gallery too large to hold: its labels whole,
    its vectors in gallery blocks. Every refusal is the one :func:`read_features` gives for the same file."""

    def __init__(self, path, storage: Storage | None = None, read_rows: int = 1024):
        self.path = path
        store, rel = (storage, str(path)) if storage is not None else _local(path)
        if not store.exists(rel):
            raise UserError(f"no feature file at {path}")
        self._stack = contextlib.ExitStack()
        try:        # local files by path (see Storage._read_table); buffered: pages, not whole column chunks
            source = store.path(rel) if store.local else self._stack.enter_context(store.open(rel))
            self._pf = pq.ParquetFile(source, buffer_size=1 << 23)
        except (pa.ArrowInvalid, OSError):
            self._stack.close()
            raise UserError(f"{path} is not a Parquet feature file (damaged, or another format)") from None
        self._stack.callback(self._pf.close)
        _check_columns(self._pf.schema_arrow, path)
        self.rows, self.read_rows = self._pf.metadata.num_rows, read_rows

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def nbytes(self) -> int:
        """The bytes its vectors take in memory as float32 (from the file's footer, nothing read)."""
        md = self._pf.metadata
        leaf = next(i for i in range(md.num_columns) if md.schema.column(i).path.startswith("feature."))
        return 4 * sum(md.row_group(r).column(leaf).num_values for r in range(md.num_row_groups))

    @property
    def schema(self) -> pa.Schema:
        """The file's Arrow schema, its metadata included."""
        return self._pf.schema_arrow

    def group_keys(self) -> list[list[str]]:
        """The keys of each row group, in file order."""
        return [self._pf.read_row_group(r, columns=["key"]).column(0).to_pylist()
                for r in range(self._pf.num_row_groups)]

    def group(self, r: int) -> pa.Table:
        """Row group ``r``, every column."""
        return self._pf.read_row_group(r)

    def labels(self) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
        """Keys, pids and camids (None when absent), checked as :func:`read_features` checks them."""
        names = [c for c in ("key", "pid", "camid") if c in self._pf.schema_arrow.names]
        try:
            return _keys_and_labels(self._pf.read(columns=names), self.path)
        except UserError as exc:
            raise self.fault() or exc from None

    def fault(self, keys=None) -> UserError | None:
        """Read the whole feature column for what :func:`read_features` (and, with ``keys``, the in-memory
        scorer's finiteness check) would refuse first; None when nothing."""
        stats = _VectorStats()
        for batch in self._pf.iter_batches(self.read_rows, columns=["feature"]):
            stats.add(batch.column(0), finite=keys is not None)
        return stats.fault(self.path, keys)

    def _batches(self, row_groups: list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 [n, D] values)`` in file order (only ``row_groups`` when given); a fault
        ends them with the error :meth:`fault` names."""
        md = self._pf.metadata
        groups = range(md.num_row_groups) if row_groups is None else row_groups
        starts = np.concatenate([[0], np.cumsum([md.row_group(r).num_rows for r in range(md.num_row_groups)])])
        stats = _VectorStats()
        for r in groups:
            start = int(starts[r])
            for batch in self._pf.iter_batches(self.read_rows, row_groups=[r], columns=["feature"]):
                flat = stats.add(batch.column(0))
                if flat is None:                  # the whole file's numbers, as read_features gives them
                    raise self.fault() or stats.fault(self.path)
                yield start, flat
                start += len(flat)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """The vectors of ``rows`` (ascending row numbers, at least one), reading only the row groups that
        hold them."""
        md = self._pf.metadata
        starts = np.cumsum([md.row_group(r).num_rows for r in range(md.num_row_groups)])
        groups = sorted(set(np.searchsorted(starts, rows, side="right").tolist()))
        out: torch.Tensor | None = None
        for start, flat in self._batches(groups):
            if out is None:
                out = torch.empty(len(rows), flat.shape[1])
            a, b = np.searchsorted(rows, [start, start + len(flat)])
            out[a:b] = torch.from_numpy(flat[rows[a:b] - start])
        return out

    def blocks(self, rows: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row numbers, vectors)`` of ``rows`` (ascending) in blocks of ``size``, the last one shorter:
        the blocks :func:`~sysu30k.evaluation.scoring.score` makes of a gallery held in memory, in one buffer
        that the next block overwrites (as there)."""
        at = 0
        buf: torch.Tensor | None = None
        for start, flat in self._batches():
            a, b = np.searchsorted(rows, [start, start + len(flat)])
            while a < b:
                if buf is None:
                    buf = torch.empty(min(size, len(rows)), flat.shape[1])
                fill, n = at % size, min(size, len(rows) - at + at % size)     # n: this block's length
                m = min(b - a, n - fill)
                buf[fill:fill + m] = torch.from_numpy(flat[rows[a:a + m] - start])
                a, at = a + m, at + m
                if at % size == 0 or at == len(rows):
                    yield rows[at - n:at], buf[:n]

def join_split(fs: FeatureSet, dst: Storage, split: str, role: str, path: str = "") -> FeatureSet:
    """Fill in missing pids/camids of ``fs`` from ``DST/manifests/split.parquet`` (rows of ``split``)."""
    if fs.pids is not None and fs.camids is not None:
        return fs
    pids, cams = join_labels(fs.keys, fs.pids, fs.camids, dst, split, role, path)
    return FeatureSet(fs.keys, pids, cams, fs.feats)


def join_labels(keys: list[str], pids: np.ndarray | None, camids: np.ndarray | None, dst: Storage, split: str,
                role: str, path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The pids and camids of ``keys`` (unique), each taken from the split manifest where it is None; the
    keys must be exactly the ``role`` images of ``split``."""
    rel = manifests.relpath("split")
    if not dst.exists(rel):
        raise UserError(f"{path or 'a feature file'} has no pid/camid and {dst.url} has no {rel} to join with "
                        f"(run `sysu30k split` first)")
    t = dst.read_table(rel, columns=["split", "role", "key", "pid", "camid"],
                     filters=[("split", "=", split), ("role", "=", role)])
    lookup = {k: (p, c) for k, p, c in zip(t["key"].to_pylist(), t["pid"].to_pylist(), t["camid"].to_pylist())}
    missing = [k for k in keys if k not in lookup]
    if missing:
        raise UserError(f"{len(missing)} key(s) of {path or role} are not {role} images of the {split} split of "
                        f"{rel}, e.g. {missing[0]}")
    if len(keys) != len(lookup):                    # keys are unique (read_features), so some images are absent
        have = set(keys)
        absent = next(k for k in lookup if k not in have)
        raise UserError(f"{path or role} has features of {len(keys)} of the {len(lookup)} {role} images of the "
                        f"{split} split, e.g. not {absent}: a score over part of the split is not the split's")
    joined = [np.array([lookup[k][i] if lookup[k][i] is not None else -1 for k in keys], np.int64) for i in (0, 1)]
    return (pids if pids is not None else joined[0]), (camids if camids is not None else joined[1])


def _local(path) -> tuple[Storage, str]:
    """A Storage for the folder of ``path`` and the file name (a local path or an fsspec URL)."""
    s = str(path)
    head, _, name = s.rstrip("/").rpartition("/")
    return Storage(head or "."), name
