# ruff: noqa
"""The scorer as of commit 436eeed (``sysu30k/evaluation/scoring.py`` there), kept only as the named
baseline of ``benchmarks/bench_stream_scoring.py``; not used by the package. A verbatim copy, except for this
paragraph and its relative imports made absolute. Its own docstring follows.

The official SYSU-30k scoring protocol (SYSU30K.md §2.1), exact, in bounded memory.

For L2-normalised features the similarity is the dot product (cosine). Queries are scored in chunks:
one ``chunk × G`` similarity block at a time (CPU or GPU), never the full ``Q × G`` matrix, and the
gallery is never sorted. For each query:

* **true matches** ("good") are the gallery items with the query's pid and a different camera;
  **junk** are the items with the query's pid and the same camera, plus every item labelled −1 (the
  official script's junk label; no SYSU-30k image carries it). Junk is removed from the ranking.
  Distractors (pid −1000) are ordinary negatives; they never match — a query labelled −1000 (none in
  the protocol) has no true match instead of matching every distractor, the one place where this
  differs from ``test_sysu_combine.py``.
* **Ranks.** The 0-based rank of a true match with score ``t`` is the number of valid (non-junk)
  gallery items ranked above it, counted directly: negatives with score ``>= t`` plus true matches
  ranked above it. No sort of the gallery.
* **Tie rule (pessimistic).** The ranking is by descending score; a negative with exactly the same
  score as a true match ranks *above* it; true matches tied with each other keep gallery order. The
  same as a stable sort on ``(-score, is_true_match, gallery_index)``. (The official script uses
  ``np.argsort`` without a tie rule, so its result on ties is arbitrary; a degenerate model, with all
  scores equal, scores 0 here rather than whatever gallery order gives.)
* **CMC** from the rank r of the first true match: ``cmc[r:] += 1``.
* **AP.** ``ap_official`` is the Market-1501-style trapezoidal AP of the official script: for the
  k-th true match (k = 0, 1, ...) at rank r_k, ``AP += 1/n_good · ½ · (k/r_k [1 if r_k = 0] +
  (k+1)/(r_k+1))`` — with one true match, ``1`` if r = 0 else ``1/(2(r+1))``. ``ap_standard`` is the
  usual non-interpolated AP, the mean of the precision ``(k+1)/(r_k+1)`` at each true match (one true
  match: ``1/(r+1)``); it reads higher.
* **Averaging, as the official script:** CMC and AP are summed over the queries that have a true match
  and divided by the number of **all** queries.

Cost: one matrix product, one ``top-k`` per query (for the per-query top-10 list) and one counting pass
over the query's similarity row per true match (a candidate sort instead when a query has many).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from sysu30k import manifests
from sysu30k.errors import UserError
from sysu30k.release.constants import DISTRACTOR_PID

log = logging.getLogger("sysu30k")

JUNK_PID = -1              # the official script's junk label
TOP_K = 10                 # gallery keys kept per query in the per-query table
DIRECT_MAX_GOOD = 4        # up to this many true matches: one counting pass each; more: sort the candidates
TIE_RULE = ("pessimistic: a negative with exactly the score of a true match ranks above it; "
            "tied true matches keep gallery order")


@dataclass
class Scores:
    """The result of :func:`score`. Arrays are per query, in query order."""

    cmc: np.ndarray                 # float64 [max_rank]; cmc[k-1] = rank-k accuracy over ALL queries
    map_official: float             # Market-style trapezoidal AP (test_sysu_combine.py), mean over all queries
    map_standard: float             # non-interpolated AP, mean over all queries
    per_query: pa.Table             # schema manifests.schema("per_query")
    first_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # -1: no true match
    n_good: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ap_official: np.ndarray = field(default_factory=lambda: np.zeros(0))            # float64 (table: float32)
    ap_standard: np.ndarray = field(default_factory=lambda: np.zeros(0))
    num_gallery: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """The headline numbers: rank-1/5/10/20 (where max_rank allows), both mAPs, the counts."""
        out = {f"rank{k}": float(self.cmc[k - 1]) for k in (1, 5, 10, 20) if k <= len(self.cmc)}
        out.update({"mAP_official": float(self.map_official), "mAP_standard": float(self.map_standard),
                    "queries": int(len(self.first_rank)), "gallery": int(self.num_gallery)})
        return out


def auto_chunk(num_queries: int, num_gallery: int, device, budget_bytes: int = 384 << 20) -> int:
    """Queries per similarity block: 64 on a GPU; on the CPU as many as ``budget_bytes`` of float32
    scores allow, rounded down to a multiple of 16 (at least 16). Larger blocks are faster on the CPU (MKL
    repacks the whole gallery for every product: 64-query blocks ran about 2× slower per query than
    1,000-query ones here); 384 MB keeps the peak at a third of the dense approach's at full gallery size."""
    if torch.device(device).type != "cpu":
        return 64
    fit = budget_bytes // (4 * max(num_gallery, 1))
    return int(min(max(num_queries, 1), max(16, fit // 16 * 16)))


def ap_from_ranks(ranks: np.ndarray) -> tuple[float, float]:
    """(official trapezoidal AP, standard AP) of one query from the sorted 0-based ranks of its true
    matches after junk removal."""
    n = len(ranks)
    if n == 0:
        return 0.0, 0.0
    k = np.arange(n, dtype=np.float64)
    r = ranks.astype(np.float64)
    precision = (k + 1) / (r + 1)
    old = np.where(r != 0, k / np.where(r != 0, r, 1), 1.0)
    return float(np.sum((old + precision) / 2) / n), float(precision.mean())


class NonFiniteFeatures(UserError):
    """Feature rows with NaN or infinite values: every comparison with them is false, so they would rank first."""


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise UserError(f"{name} must be a 2-d [N, D] array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def _finite(t: torch.Tensor, keys, name: str) -> None:
    """Refuse ``t`` when a row holds NaN or inf, naming how many rows and the first one's key."""
    bad = torch.nonzero(~torch.isfinite(t).all(dim=1)).flatten()
    if len(bad):
        raise NonFiniteFeatures(f"{len(bad)} of {len(t)} {name} are not finite (NaN or inf), e.g. key "
                                f"{keys[int(bad[0])]}: nothing is scored")


def _labels(x, n: int, name: str) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).astype(np.int64).reshape(-1)
    if len(a) != n:
        raise UserError(f"{name} has {len(a)} entries for {n} feature rows")
    return a


class _Gallery:
    """Per-pid lookup of gallery indices, so a query finds its true matches and junk without a pass."""

    def __init__(self, pids: np.ndarray, camids: np.ndarray):
        self.camids = camids
        self.order = np.argsort(pids, kind="stable")          # within a pid: ascending gallery index
        self.upids, self.start, self.count = np.unique(pids[self.order], return_index=True, return_counts=True)
        self.junk_label = self.same(JUNK_PID)

    def same(self, pid: int) -> np.ndarray:
        i = np.searchsorted(self.upids, pid)
        if i < len(self.upids) and self.upids[i] == pid:
            return self.order[self.start[i]:self.start[i] + self.count[i]]
        return np.zeros(0, np.int64)

    def good_junk(self, pid: int, camid: int) -> tuple[np.ndarray, np.ndarray]:
        """(true matches, junk) of a query, both ascending gallery indices."""
        if pid == DISTRACTOR_PID:
            return np.zeros(0, np.int64), self.junk_label
        same = self.same(pid)
        cam_same = self.camids[same] == camid
        junk = np.union1d(same[cam_same], self.junk_label) if len(self.junk_label) else same[cam_same]
        good = same[~cam_same]
        if len(self.junk_label) and len(good):
            good = good[~np.isin(good, self.junk_label)]
        return good, junk


def _count_ge(row: torch.Tensor, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t (descending), the number of entries of ``row`` with value >= t."""
    if row.device.type == "cpu":
        r = row.numpy()
        if len(thresholds) <= DIRECT_MAX_GOOD:
            return np.array([np.count_nonzero(r >= t) for t in thresholds], np.int64)
        cand = np.sort(r[r >= thresholds[-1]])
        return len(cand) - np.searchsorted(cand, thresholds, side="left")
    t = torch.as_tensor(thresholds, device=row.device, dtype=row.dtype)
    if len(thresholds) <= DIRECT_MAX_GOOD:
        return (row[None, :] >= t[:, None]).sum(1).cpu().numpy()
    cand = torch.sort(row[row >= t[-1]]).values
    return len(cand) - torch.searchsorted(cand, t, right=False).cpu().numpy()


def _top_list(row: torch.Tensor, vals: np.ndarray, idx: np.ndarray, junk: np.ndarray, good: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` valid gallery indices under the tie rule, from a top-m candidate list of ``row``
    (m > k + len(junk) unless the gallery is smaller); re-gathers the ties at the boundary if needed."""
    keep = ~np.isin(idx, junk) if len(junk) else np.ones(len(idx), bool)
    v_idx, v_val = idx[keep], vals[keep]
    if len(v_idx) == 0:
        return v_idx, v_val
    kth = np.sort(v_val)[::-1][min(k, len(v_val)) - 1]
    if kth == vals.min() and len(idx) < row.shape[0]:   # ties may reach beyond the candidates
        v_idx = torch.nonzero(row >= float(kth)).flatten().cpu().numpy()
        v_val = row[torch.as_tensor(v_idx, device=row.device)].cpu().numpy()
        if len(junk):
            keep = ~np.isin(v_idx, junk)
            v_idx, v_val = v_idx[keep], v_val[keep]
    is_good = np.isin(v_idx, good)
    o = np.lexsort((v_idx, is_good, -v_val.astype(np.float64)))[:k]
    return v_idx[o], v_val[o]


def score(query_feats, query_pids, query_camids, gallery_feats, gallery_pids, gallery_camids,
          query_keys=None, gallery_keys=None, chunk: int = 64, device=None, max_rank: int = 20,
          top_k: int = TOP_K) -> Scores:
    """Score queries against a gallery with the official protocol (see the module docstring).

    Features are ``[N, D]`` tensors or arrays, expected L2-normalised (the score is their dot product);
    pids and camids are integer sequences. ``device``: where the similarity blocks are computed
    (default: the gallery's device); the gallery is moved there once. ``chunk``: queries per block
    (memory: ``chunk × G`` scores). Keys default to the row numbers as strings.
    """
    t0 = time.perf_counter()
    q = _as_tensor(query_feats, "query features")
    g = _as_tensor(gallery_feats, "gallery features")
    if q.shape[1] != g.shape[1]:
        raise UserError(f"query features are {q.shape[1]}-d but gallery features are {g.shape[1]}-d")
    if chunk < 1 or max_rank < 1:
        raise UserError("chunk and max_rank must be positive")
    nq, ng = q.shape[0], g.shape[0]
    qpid, qcam = _labels(query_pids, nq, "query pids"), _labels(query_camids, nq, "query camids")
    gpid, gcam = _labels(gallery_pids, ng, "gallery pids"), _labels(gallery_camids, ng, "gallery camids")
    qkeys = [str(i) for i in range(nq)] if query_keys is None else list(query_keys)
    gkeys = np.asarray([str(i) for i in range(ng)] if gallery_keys is None else list(gallery_keys), dtype=object)
    if len(qkeys) != nq or len(gkeys) != ng:
        raise UserError("query/gallery keys must have one entry per feature row")
    _finite(q, qkeys, "query features")
    _finite(g, gkeys, "gallery features")
    dev = torch.device(device) if device is not None else g.device
    g = g.to(dev)
    if g.dtype != q.dtype:
        q = q.to(g.dtype)
    lookup = _Gallery(gpid, gcam)

    first = np.full(nq, -1, np.int64)
    n_good = np.zeros(nq, np.int64)
    ap_off, ap_std = np.zeros(nq), np.zeros(nq)
    top_idx: list[np.ndarray] = [None] * nq
    top_val: list[np.ndarray] = [None] * nq
    with torch.inference_mode():
        for a in range(0, nq, chunk):
            b = min(nq, a + chunk)
            sims = q[a:b].to(dev) @ g.T                                   # [c, G]
            if sims.dtype not in (torch.float32, torch.float64):
                sims = sims.float()
            gj = [lookup.good_junk(int(qpid[i]), int(qcam[i])) for i in range(a, b)]
            m = min(ng, top_k + 1 + max(len(j) for _, j in gj))
            tv, ti = torch.topk(sims, m, dim=1) if m else (sims[:, :0], sims[:, :0].long())
            tv, ti = tv.cpu().numpy(), ti.cpu().numpy()
            rows = np.concatenate([np.full(len(x) + len(y), i, np.int64) for i, (x, y) in enumerate(gj)])
            cols = np.concatenate([np.concatenate([x, y]) for x, y in gj]).astype(np.int64)
            picked = sims[torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)].cpu().numpy() \
                if len(rows) else np.zeros(0, np.float32)
            pos = 0
            for i, (good, junk) in enumerate(gj):
                sg = picked[pos:pos + len(good)]
                sj = picked[pos + len(good):pos + len(good) + len(junk)]
                pos += len(good) + len(junk)
                qi = a + i
                row = sims[i]
                top_idx[qi], top_val[qi] = _top_list(row, tv[i], ti[i], junk, good, top_k)
                n_good[qi] = len(good)
                if not len(good):
                    continue
                o = np.argsort(-sg.astype(np.float64), kind="stable")      # tie rule among true matches
                sg = sg[o]
                ge_all = _count_ge(row, sg)
                ge_junk = (sj[None, :] >= sg[:, None]).sum(1) if len(sj) else 0
                ge_good = (sg[None, :] >= sg[:, None]).sum(1)
                ranks = ge_all - ge_junk - ge_good + np.arange(len(sg))
                first[qi] = ranks[0]
                ap_off[qi], ap_std[qi] = ap_from_ranks(ranks)
            del sims, row          # no view may keep this block alive while the next one is computed

    cmc = np.zeros(max_rank)
    hit = first[(first >= 0) & (first < max_rank)]
    np.add.at(cmc, hit, 1)
    cmc = np.cumsum(cmc) / max(nq, 1)
    per_query = _per_query_table(qkeys, qpid, qcam, first, n_good, ap_off, ap_std, top_idx, top_val, gkeys, gpid,
                                 gcam)
    return Scores(cmc=cmc, map_official=float(ap_off.sum() / max(nq, 1)), map_standard=float(ap_std.sum() / max(nq, 1)),
                  per_query=per_query, first_rank=first, n_good=n_good, ap_official=ap_off, ap_standard=ap_std,
                  num_gallery=ng, seconds=time.perf_counter() - t0)


def _per_query_table(qkeys, qpid, qcam, first, n_good, ap_off, ap_std, top_idx, top_val, gkeys, gpid,
                     gcam) -> pa.Table:
    """The per-query results in the ``per_query`` schema."""
    nq = len(qkeys)
    lens = np.array([len(t) for t in top_idx], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    flat_idx = np.concatenate(top_idx).astype(np.int64) if nq else np.zeros(0, np.int64)
    flat_val = np.concatenate(top_val).astype(np.float32) if nq else np.zeros(0, np.float32)
    qrow = np.repeat(np.arange(nq), lens)
    flat_good = (gpid[flat_idx] == qpid[qrow]) & (gcam[flat_idx] != qcam[qrow]) & (qpid[qrow] != DISTRACTOR_PID) \
        & (gpid[flat_idx] != JUNK_PID)
    schema = manifests.schema("per_query")
    cols = {
        "key": pa.array(qkeys, pa.string()),
        "pid": pa.array(qpid.astype(np.int32)),
        "camid": pa.array(qcam.astype(np.int8)),
        "first_match_rank": pa.array(first),
        "n_good": pa.array(n_good.astype(np.int32)),
        "ap_official": pa.array(ap_off.astype(np.float32)),
        "ap_standard": pa.array(ap_std.astype(np.float32)),
        "top_keys": pa.ListArray.from_arrays(offsets, pa.array(gkeys[flat_idx].tolist(), pa.string())),
        "top_scores": pa.ListArray.from_arrays(offsets, pa.array(flat_val)),
        "top_good": pa.ListArray.from_arrays(offsets, pa.array(flat_good)),
    }
    return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)
