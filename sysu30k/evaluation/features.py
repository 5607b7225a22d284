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
    ``torch.float16`` on a GPU); features are accumulated in float32."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dropped: list[str] = []
    try:
        with torch.inference_mode():
            for batch in loader:
                valid = batch.valid.numpy().astype(bool)
                dropped += [k for k, ok in zip(batch.keys, valid) if not ok and k]
                if not valid.any():
                    continue
                b = batch.to(device, dtype=dtype)
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


def read_features(path, storage: Storage | None = None) -> FeatureSet:
    """Read a feature file; checks the columns and that every vector has the same length."""
    store, rel = (storage, str(path)) if storage is not None else _local(path)
    if not store.exists(rel):
        raise UserError(f"no feature file at {path}")
    try:
        table = store.read_table(rel)
    except (UserError, OSError):
        raise UserError(f"{path} is not a Parquet feature file (damaged, or another format)") from None
    names = set(table.column_names)
    for need in ("key", "feature"):
        if need not in names:
            raise UserError(f"{path} has no {need!r} column (need key, feature[, pid, camid])")
    vec = table["feature"].combine_chunks()
    if not (pa.types.is_list(vec.type) or pa.types.is_large_list(vec.type)
            or pa.types.is_fixed_size_list(vec.type)):
        raise UserError(f"{path}: column 'feature' must be a list of floats, not {vec.type}")
    n = len(vec)
    if vec.null_count:
        raise UserError(f"{path}: {vec.null_count} row(s) have no feature vector")
    lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
    if n and (lengths.min() != lengths.max()):
        raise UserError(f"{path}: feature vectors have different lengths ({lengths.min()}..{lengths.max()})")
    d = int(lengths[0]) if n else 0
    flat = pc.list_flatten(vec).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    with warnings.catch_warnings():          # Arrow's buffer is read-only; a copy would double the peak memory
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        feats = torch.from_numpy(np.ascontiguousarray(flat).reshape(n, d))
    if not pa.types.is_string(table.schema.field("key").type) and not pa.types.is_large_string(
            table.schema.field("key").type):
        raise UserError(f"{path}: column 'key' must hold strings, not {table.schema.field('key').type}")
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

    return FeatureSet(keys, labels("pid"), labels("camid"), feats)


def join_split(fs: FeatureSet, dst: Storage, split: str, role: str, path: str = "") -> FeatureSet:
    """Fill in missing pids/camids of ``fs`` from ``DST/manifests/split.parquet`` (rows of ``split``)."""
    if fs.pids is not None and fs.camids is not None:
        return fs
    rel = manifests.relpath("split")
    if not dst.exists(rel):
        raise UserError(f"{path or 'a feature file'} has no pid/camid and {dst.url} has no {rel} to join with "
                        f"(run `sysu30k split` first)")
    t = dst.read_table(rel, columns=["split", "role", "key", "pid", "camid"],
                     filters=[("split", "=", split), ("role", "=", role)])
    lookup = {k: (p, c) for k, p, c in zip(t["key"].to_pylist(), t["pid"].to_pylist(), t["camid"].to_pylist())}
    missing = [k for k in fs.keys if k not in lookup]
    if missing:
        raise UserError(f"{len(missing)} key(s) of {path or role} are not {role} images of the {split} split of "
                        f"{rel}, e.g. {missing[0]}")
    if len(fs.keys) != len(lookup):                 # keys are unique (read_features), so some images are absent
        absent = next(k for k in lookup if k not in set(fs.keys))
        raise UserError(f"{path or role} has features of {len(fs.keys)} of the {len(lookup)} {role} images of the "
                        f"{split} split, e.g. not {absent}: a score over part of the split is not the split's")
    pids = np.array([lookup[k][0] if lookup[k][0] is not None else -1 for k in fs.keys], np.int64)
    cams = np.array([lookup[k][1] if lookup[k][1] is not None else -1 for k in fs.keys], np.int64)
    return FeatureSet(fs.keys, fs.pids if fs.pids is not None else pids,
                      fs.camids if fs.camids is not None else cams, fs.feats)


def _local(path) -> tuple[Storage, str]:
    """A Storage for the folder of ``path`` and the file name (a local path or an fsspec URL)."""
    s = str(path)
    head, _, name = s.rstrip("/").rpartition("/")
    return Storage(head or "."), name
