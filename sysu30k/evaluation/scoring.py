"""The official SYSU-30k scoring protocol (SYSU30K.md §2.1), exact, streamed over the gallery.

For L2-normalised features the similarity is the dot product (cosine). A :class:`Scorer` holds the
queries' features and, per query, only what exact CMC and both mAPs need: the scores of its true matches,
the number of negatives scoring at or above each of them, and its current top-10 list. Gallery features
arrive in blocks (:meth:`Scorer.add`) in any order and any split between processes, are scored against
all queries at once (one ``Q × block`` product) and dropped: the ``G × D`` gallery matrix never has to
exist, and memory is the queries' features plus a few ``Q × block`` arrays. For each query:

* **true matches** ("good") are the gallery items with the query's pid and a different camera;
  **junk** are the items with the query's pid and the same camera, plus every item labelled −1 (the
  official script's junk label; no SYSU-30k image carries it). Junk is removed from the ranking.
  Distractors (pid −1000) are ordinary negatives; they never match — a query labelled −1000 (none in
  the protocol) has no true match instead of matching every distractor, the one place where this
  differs from ``test_sysu_combine.py``.
* **Matches first.** The true matches are known from the labels before any feature is seen; their
  features are given first (:meth:`Scorer.set_matches`), so every later block only counts, for each
  query, its negatives scoring ``>=`` each true match's score. On SYSU-30k they are 1,000 images, packed
  before the distractors (their folder names sort first).
* **Ranks.** The 0-based rank of the j-th true match (in ranking order) is the number of negatives
  ranked above it plus ``j``. No sort of the gallery.
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

Every gallery item must be added exactly once (checked); the per-process states of a torchrun job are
summed and merged on rank 0 (:meth:`Scorer.reduce`), with the same result as one process: the counts
are integers and the top lists merge under the same total order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .. import manifests
from ..errors import UserError
from ..release.constants import DISTRACTOR_PID

JUNK_PID = -1              # the official script's junk label
TOP_K = 10                 # gallery keys kept per query in the per-query table
DIRECT_MAX_GOOD = 4        # up to this many true matches per query: compare directly; more: sort each block
BLOCK_BYTES = 64 << 20     # working memory of one block on the CPU (4x on a GPU)
TIE_RULE = ("pessimistic: a negative with exactly the score of a true match ranks above it; "
            "tied true matches keep gallery order")


@dataclass
class Scores:
    """The result of scoring. Arrays are per query, in query order."""

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


def auto_chunk(num_queries: int, num_gallery: int, device, budget_bytes: int = BLOCK_BYTES) -> int:
    """Gallery items per block: as many as ``budget_bytes`` allow at about 16 bytes per query and item
    (the scores, the masks, the counting comparisons), a multiple of 256 from 256 to 65,536; 4x the
    budget on a GPU. 1,000 queries on the CPU: 4,096 items per block, a 16 MB score block."""
    if torch.device(device).type != "cpu":
        budget_bytes *= 4
    fit = budget_bytes // (16 * max(num_queries, 1))
    return int(min(max(num_gallery, 1), max(256, min(65_536, fit // 256 * 256))))


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


def _all_finite(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``torch.isfinite(t).all(dim)`` of a 2-d ``t``, from sums first: a NaN or inf makes its sum NaN or inf,
    and a boolean reduction over ``t`` cost 10-30x the sum on a 2-core CPU (BENCHMARKS.md, session 9). Only a
    non-finite sum (one of those, or finite values that overflow when added) is checked element by element."""
    ok = torch.isfinite(t.sum() if dim is None else t.sum(dim))
    if dim is None:
        return ok if bool(ok) else torch.isfinite(t).all()
    suspect = torch.nonzero(~ok).flatten()
    if len(suspect):
        ok[suspect] = torch.isfinite(t.index_select(1 - dim, suspect)).all(dim)
    return ok


def _finite(t: torch.Tensor, keys, name: str, rows: int = 4096) -> None:
    """Refuse ``t`` when a row holds NaN or inf, naming how many rows and the first one's key. Checked
    ``rows`` at a time: a whole-matrix ``isfinite`` made temporaries of 1.6× the features."""
    bad = torch.cat([torch.nonzero(~_all_finite(t[a:a + rows], 1)).flatten() + a
                     for a in range(0, len(t), rows)] or [torch.zeros(0, dtype=torch.long)])
    if len(bad):
        raise NonFiniteFeatures(f"{len(bad)} of {len(t)} {name} are not finite (NaN or inf), e.g. key "
                                f"{keys[int(bad[0])]}: nothing is scored")


def _labels(x, n: int | None, name: str) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).astype(np.int64).reshape(-1)
    if n is not None and len(a) != n:
        raise UserError(f"{name} has {len(a)} entries for {n} feature rows")
    return a


def _count_at_least(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``[Q, J]`` int64: in each row of ``scores``, how many are ``>=`` each of the row's ``J`` thresholds. On
    the CPU through NumPy, whose boolean count ran 6-15x faster than torch's (the same integers)."""
    if scores.device.type != "cpu":
        return (scores[:, :, None] >= thr[:, None, :]).sum(1)
    s, t = scores.numpy(), thr.numpy()
    return torch.from_numpy(np.stack([np.count_nonzero(s >= t[:, j:j + 1], axis=1) for j in range(t.shape[1])], 1)
                            .astype(np.int64))


def _ranked(score: np.ndarray, good: np.ndarray, gidx: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Row by row, the first ``k`` columns in ranking order: descending score, a negative before a tied
    true match, then ascending gallery index (padding: score -inf, index -1, sorts last)."""
    order = np.lexsort((gidx, good, -score), axis=-1)[:, :k]
    return tuple(np.take_along_axis(a, order, axis=1) for a in (score, good, gidx))


class Scorer:
    """The streaming state of one scoring run (see the module docstring): queries' features, labels of
    the whole gallery, and per query the counts and the top list. Gallery features come in blocks:
    :meth:`add_matches` with the items :attr:`matched` names first, then :meth:`add` for the rest."""

    def __init__(self, query_feats, query_pids, query_camids, gallery_pids, gallery_camids, query_keys=None,
                 gallery_keys=None, device=None, max_rank: int = 20, top_k: int = TOP_K):
        q = _as_tensor(query_feats, "query features")
        if max_rank < 1 or top_k < 0:
            raise UserError("max_rank must be positive and top_k not negative")
        nq = q.shape[0]
        self.qpid, self.qcam = _labels(query_pids, nq, "query pids"), _labels(query_camids, nq, "query camids")
        self.gpid = _labels(gallery_pids, None, "gallery pids")
        ng = len(self.gpid)
        self.gcam = _labels(gallery_camids, ng, "gallery camids")
        self.qkeys = [str(i) for i in range(nq)] if query_keys is None else list(query_keys)
        self.gkeys = np.asarray([str(i) for i in range(ng)] if gallery_keys is None else list(gallery_keys),
                                dtype=object)
        if len(self.qkeys) != nq or len(self.gkeys) != ng:
            raise UserError("query/gallery keys must have one entry per feature row")
        _finite(q, self.qkeys, "query features")
        self.device = torch.device(device) if device is not None else q.device
        self.q = q.to(self.device)
        self.max_rank, self.top_k = max_rank, top_k
        t = lambda a: torch.as_tensor(a, device=self.device)
        self._qpid, self._qcam, self._gpid, self._gcam = t(self.qpid), t(self.qcam), t(self.gpid), t(self.gcam)
        self._qvalid = t(self.qpid != DISTRACTOR_PID)
        wanted = self.qpid[(self.qpid != DISTRACTOR_PID) & (self.qpid != JUNK_PID)]
        same_pid = np.isin(self.gpid, wanted)
        self.matched = np.flatnonzero(same_pid & (self.gpid != JUNK_PID))
        self._special = same_pid | (self.gpid == JUNK_PID)        # some query's match or junk
        self._good_score = np.zeros((nq, 0))
        self._good_gidx = np.zeros((nq, 0), np.int64)
        self.n_good = np.zeros(nq, np.int64)
        self._thr = torch.zeros((nq, 0), dtype=self._score_dtype(), device=self.device)
        self.counts = torch.zeros((nq, 0), dtype=torch.int64, device=self.device)
        self.seen = np.zeros(ng, np.int32)
        self.top_score = np.full((nq, top_k), -np.inf)
        self.top_gidx = np.full((nq, top_k), -1, np.int64)
        self._ready = len(self.matched) == 0
        self._t0 = time.perf_counter()

    @property
    def num_gallery(self) -> int:
        return len(self.gpid)

    def _score_dtype(self) -> torch.dtype:
        return self.q.dtype if self.q.dtype in (torch.float32, torch.float64) else torch.float32

    def _block(self, gidx, feats) -> tuple[np.ndarray, torch.Tensor]:
        gidx = np.asarray(gidx, np.int64).reshape(-1)
        f = _as_tensor(feats, "gallery features")
        if f.shape[0] != len(gidx):
            raise UserError(f"{f.shape[0]} gallery feature rows for {len(gidx)} gallery indices")
        if f.shape[1] != self.q.shape[1]:
            raise UserError(f"query features are {self.q.shape[1]}-d but gallery features are {f.shape[1]}-d")
        if len(gidx) and (gidx.min() < 0 or gidx.max() >= self.num_gallery):
            raise ValueError(f"gallery index out of range 0..{self.num_gallery - 1}")
        return gidx, f.to(self.device, dtype=self.q.dtype)

    def _sims(self, f: torch.Tensor, gidx: np.ndarray) -> torch.Tensor:
        """The block's scores [Q, B]; a gallery row with NaN or inf gives non-finite scores, so checking
        the scores (Q × B values) finds it without a pass over the B × D features."""
        s = self.q @ f.T
        s = s if s.dtype == self._score_dtype() else s.to(self._score_dtype())
        if len(self.qpid) and not bool(_all_finite(s)):
            _finite(f, self.gkeys[gidx], "gallery features of a block")
            first = int(torch.nonzero(~_all_finite(s, 0))[0])
            raise NonFiniteFeatures(f"the scores of gallery item {self.gkeys[gidx[first]]} overflow: the features "
                                    "are not L2-normalised")
        return s

    def _masks(self, gidx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(true match, junk) of every query and block item, [Q, B] bool."""
        i = torch.as_tensor(gidx, device=self.device)
        gp, gc = self._gpid[i], self._gcam[i]
        same = (self._qpid[:, None] == gp[None, :]) & self._qvalid[:, None]
        same_cam = self._qcam[:, None] == gc[None, :]
        junk_label = (gp == JUNK_PID)[None, :]
        return same & ~same_cam & ~junk_label, (same & same_cam) | junk_label

    def add_matches(self, gidx, feats, count: bool = True) -> None:
        """The features of exactly the items :attr:`matched` names, before any other block: their
        scores become each query's thresholds; then they are scored like any block (``count=False``: by
        another process of the same job)."""
        gidx, f = self._block(gidx, feats)
        if self._ready and len(self.matched):
            raise ValueError("add_matches was already called")
        if not np.array_equal(np.sort(gidx), self.matched):
            raise ValueError("add_matches needs the features of exactly the gallery items Scorer.matched names")
        with torch.inference_mode():
            sims = self._sims(f, gidx)
            good, _ = self._masks(gidx)
        g = good.cpu().numpy()
        s = np.where(g, sims.cpu().numpy().astype(np.float64), -np.inf)
        self.n_good = g.sum(1).astype(np.int64)
        j = int(self.n_good.max(initial=0))
        score, _, at = _ranked(s, ~g, np.broadcast_to(gidx, s.shape), j)     # true matches first, in ranking order
        present = np.arange(j)[None, :] < self.n_good[:, None]
        thr = np.where(present, score, np.inf)
        self._good_score, self._good_gidx = np.where(present, score, -np.inf), np.where(present, at, -1)
        self._thr = torch.as_tensor(thr, dtype=self._score_dtype(), device=self.device)
        self.counts = torch.zeros((len(self.qpid), j), dtype=torch.int64, device=self.device)
        self._ready = True
        if count:
            self._score(gidx, f, sims)

    def add(self, gidx, feats) -> None:
        """Score one block of gallery items (indices into the gallery labels, any order)."""
        if not self._ready:
            raise ValueError("add_matches (the items Scorer.matched names) must come before any other block")
        self._score(*self._block(gidx, feats))

    def _score(self, gidx: np.ndarray, f: torch.Tensor, sims: torch.Tensor | None = None) -> None:
        np.add.at(self.seen, gidx, 1)
        if not len(gidx):
            return
        with torch.inference_mode():
            neg = self._sims(f, gidx) if sims is None else sims
            sub = np.flatnonzero(self._special[gidx])        # the few columns that are some query's match or junk
            if len(sub):
                good, junk = self._masks(gidx[sub])
                cols = torch.as_tensor(sub, device=self.device)
                neg[:, cols] = neg[:, cols].masked_fill(good | junk, -torch.inf)     # negatives only, in place
            if self.counts.shape[1]:
                if self.counts.shape[1] <= DIRECT_MAX_GOOD:
                    self.counts += _count_at_least(neg, self._thr)
                else:
                    ordered = torch.sort(neg, dim=1).values
                    self.counts += neg.shape[1] - torch.searchsorted(ordered, self._thr.contiguous())
            if self.top_k:
                self._merge_top(neg, gidx)

    def _merge_top(self, neg: torch.Tensor, gidx: np.ndarray) -> None:
        """Merge the block's first ``top_k`` negatives (exactly, ties at the boundary included) into each
        query's running list of negatives (the true matches join it in :meth:`result`)."""
        k = min(self.top_k, neg.shape[1])
        vals, pos = torch.topk(neg, min(k + 1, neg.shape[1]), dim=1)     # the (k+1)-th tells a tie at the k-th
        kth = vals[:, k - 1:k]
        crosses = vals[:, k] >= kth[:, 0] if vals.shape[1] > k else torch.zeros_like(kth[:, 0], dtype=torch.bool)
        split_tie = torch.nonzero(crosses & torch.isfinite(kth[:, 0])).flatten().tolist()
        vals, pos = vals[:, :k], pos[:, :k]
        score = vals.cpu().numpy().astype(np.float64)
        idx = gidx[pos.cpu().numpy()]
        for r in split_tie:                      # rare: a tie crosses the k-th place, gather all of it
            cols = torch.nonzero(neg[r] >= kth[r]).flatten()
            row = neg[r, cols].cpu().numpy().astype(np.float64)[None]
            sc, _, i = _ranked(row, np.zeros(row.shape, bool), gidx[cols.cpu().numpy()][None], k)
            score[r], idx[r] = sc[0], i[0]
        self._keep_top(np.concatenate([self.top_score, score], 1), np.concatenate([self.top_gidx, idx], 1))

    def _keep_top(self, score: np.ndarray, gidx: np.ndarray) -> None:
        """The first ``top_k`` of these negatives per query, in ranking order; -inf (masked) entries as -1."""
        self.top_score, _, top_gidx = _ranked(score, np.zeros(score.shape, bool), gidx, self.top_k)
        self.top_gidx = np.where(np.isfinite(self.top_score), top_gidx, -1)

    def reduce(self) -> None:
        """Sum the states of all ranks of a torch.distributed job (call on every rank; rank 0 then holds
        the job's result). A no-op in a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        counts, seen = self.counts.to(dev), torch.from_numpy(self.seen).to(dev)
        dist.all_reduce(counts)
        dist.all_reduce(seen)
        self.counts, self.seen = counts.to(self.device), seen.cpu().numpy()
        parts = []
        for a in (self.top_score, self.top_gidx):
            t = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
            got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(got, t)
            parts.append(np.concatenate([x.cpu().numpy() for x in got], 1))
        self._keep_top(*parts)

    def result(self) -> Scores:
        """The scores, once every gallery item was added exactly once."""
        if not self._ready or (self.seen != 1).any():
            never, twice = np.flatnonzero(self.seen == 0), np.flatnonzero(self.seen > 1)
            if len(twice):
                raise ValueError(f"{len(twice)} gallery item(s) were scored twice, e.g. {self.gkeys[twice[0]]}")
            raise UserError(f"{len(never)} of {self.num_gallery} gallery item(s) were never scored, e.g. "
                            f"{self.gkeys[never[0]]}: a score over part of the gallery is not the gallery's")
        nq = len(self.qpid)
        counts = self.counts.cpu().numpy()
        first = np.full(nq, -1, np.int64)
        ap_off, ap_std = np.zeros(nq), np.zeros(nq)
        for i in np.flatnonzero(self.n_good):
            ranks = counts[i, :self.n_good[i]] + np.arange(self.n_good[i])
            first[i] = ranks[0]
            ap_off[i], ap_std[i] = ap_from_ranks(ranks)
        cmc = np.zeros(self.max_rank)
        np.add.at(cmc, first[(first >= 0) & (first < self.max_rank)], 1)
        cmc = np.cumsum(cmc) / max(nq, 1)
        top_score, _, top_gidx = _ranked(np.concatenate([self.top_score, self._good_score], 1),
                                         np.concatenate([np.zeros(self.top_gidx.shape, bool), self._good_gidx >= 0], 1),
                                         np.concatenate([self.top_gidx, self._good_gidx], 1), self.top_k)
        top_gidx = np.where(np.isfinite(top_score), top_gidx, -1)
        keep = top_gidx >= 0
        top_idx = [row[m] for row, m in zip(top_gidx, keep)]
        top_val = [row[m] for row, m in zip(top_score, keep)]
        per_query = _per_query_table(self.qkeys, self.qpid, self.qcam, first, self.n_good, ap_off, ap_std, top_idx,
                                     top_val, self.gkeys, self.gpid, self.gcam)
        return Scores(cmc=cmc, map_official=float(ap_off.sum() / max(nq, 1)),
                      map_standard=float(ap_std.sum() / max(nq, 1)), per_query=per_query, first_rank=first,
                      n_good=self.n_good, ap_official=ap_off, ap_standard=ap_std, num_gallery=self.num_gallery,
                      seconds=time.perf_counter() - self._t0)


def score(query_feats, query_pids, query_camids, gallery_feats, gallery_pids, gallery_camids,
          query_keys=None, gallery_keys=None, chunk: int | None = None, device=None, max_rank: int = 20,
          top_k: int = TOP_K) -> Scores:
    """Score queries against a gallery held in memory with the official protocol (see the module docstring).

    Features are ``[N, D]`` tensors or arrays, expected L2-normalised (the score is their dot product);
    pids and camids are integer sequences. ``device``: where the blocks are scored (default: the
    gallery's device). ``chunk``: gallery items per block (default :func:`auto_chunk`). Keys default to
    the row numbers as strings.
    """
    g = _as_tensor(gallery_feats, "gallery features")
    s = Scorer(query_feats, query_pids, query_camids, gallery_pids, gallery_camids, query_keys, gallery_keys,
               device=device if device is not None else g.device, max_rank=max_rank, top_k=top_k)
    if g.shape[0] != s.num_gallery:
        raise UserError(f"gallery pids has {s.num_gallery} entries for {g.shape[0]} feature rows")
    _finite(g, s.gkeys, "gallery features")               # the whole file's count, before any block
    if chunk is not None and chunk < 1:
        raise UserError("chunk must be positive")
    chunk = chunk or auto_chunk(len(s.qpid), s.num_gallery, s.device)
    m = torch.as_tensor(s.matched)
    s.add_matches(s.matched, g[m])
    rest = np.setdiff1d(np.arange(s.num_gallery), s.matched)
    with torch.inference_mode():        # one block buffer, reused: fresh blocks cost 4x the copy in page faults
        buf = torch.empty((min(chunk, len(rest)), g.shape[1]), dtype=g.dtype, device=g.device)
        for a in range(0, len(rest), chunk):
            block = rest[a:a + chunk]
            s.add(block, torch.index_select(g, 0, torch.as_tensor(block, device=g.device), out=buf[:len(block)]))
    return s.result()


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
