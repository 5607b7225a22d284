"""SSG's clustering distance (k-reciprocal Jaccard + source proximity), its DBSCAN eps and DBSCAN, without
an N×N matrix.

The original code (SSG ``reid/rerank.py``, after Zhong et al. 2017) builds dense N×N distance, rank and
V matrices; at N = 100k that is 40 GB per float32 matrix. Here (spec: docs SSG.md §2.3-2.4):

* **k-NN**: chunked ``q @ t.T`` + ``torch.topk`` (GPU or CPU) gives the exact top-(k1+1) lists and the
  exact row max of the squared distance in one pass. Ties are broken by index, as a stable argsort would.
* **V** (k-reciprocal sets with the 2/3 expansion, weights ``exp(-d/rowmax)``) and the query expansion
  are sparse (about 20 and a few hundred entries per row); the weights of the few expansion members
  that are not in a row's own k-NN list come from the dot products of those pairs.
* **Jaccard**: ``m(i,j) = Σ_k min(V_ik, V_jk)`` is nonzero only where the supports of rows i and j
  overlap; it is accumulated chunk by chunk over the CSC columns of V, and only those pairs (plus the
  diagonal) are stored. Every other pair has d_J = 1, so ``D = (1-λ) + λ(s_i+s_j) >= floor``.
* **Zeros.** Rows i, j whose query expansions average the same V rows have d_J = 0 exactly, but the
  float sum gives ±1e-16, and the dense code's "drop the zeros" before eps then depends on rounding
  (eps moved by 10% in a test without source features). d_J < ``JACCARD_ZERO`` (1e-10, far above the
  summation noise and far below any d_J that comes from a real difference of V rows) is therefore
  set to 0, here and in the test reference.
* **eps** (mean of the ρ-fraction smallest strict-upper nonzero distances) is exact over stored and
  unstored pairs; **DBSCAN** runs on the sparse matrix and equals the dense result whenever
  ``eps < floor`` (checked: otherwise a ``UserError``).

The result equals the dense algorithm up to float rounding: distances are float32 on the device, the
rest float64.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ...errors import UserError
from ...io.device import resolve_device

log = logging.getLogger("sysu30k")

_ROW_BLOCK = 1024            # rows per vectorised k-reciprocal step (B × 21 × 11 × 21 booleans)
_PAIR_BLOCK = 1 << 22        # feature values gathered per block of pair distances
_TRIPLES = 1 << 20           # (i, k, j) triples per Jaccard chunk
_CELLS = 1 << 22             # chunk rows × N accumulator cells per Jaccard chunk (32 MB float64)
_FALLBACK_PAIRS = 1 << 20    # pairs enumerated first when eps needs unstored pairs (then 4× each round)
JACCARD_ZERO = 1e-10         # d_J below this is summation noise of m = 1 (identical V rows) and counts as 0


@dataclass
class PairDistances:
    """The SSG distance D = (1-λ)·d_J + λ·(s_i+s_j), stored for pairs whose V supports overlap."""

    matrix: sp.csr_matrix    # N×N, D for stored pairs (support overlap) and the diagonal; sorted column indices
    source: np.ndarray       # s (normalised source term per image), zeros without source features
    lam: float
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage of ssg_distance

    @property
    def floor(self) -> float:
        """A lower bound of D over every unstored pair: (1-λ) + 2λ·min(s)."""
        return float((1 - self.lam) + self.lam * (2 * self.source.min()))

    def dense(self) -> np.ndarray:
        """The full N×N D (for small N and tests only)."""
        s = self.source
        full = 1.0 * (1 - self.lam) + (s[:, None] + s[None, :]) * self.lam
        coo = self.matrix.tocoo()
        full[coo.row, coo.col] = coo.data
        return full


def _features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise UserError(f"{name} must be a non-empty 2-d [N, D] array, got shape {tuple(t.shape)}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{name} contain NaN or infinite values")
    return t


def knn(query: torch.Tensor, base: torch.Tensor, k: int, chunk: int = 4096, device=None,
        exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [Nq,k] int64, squared distances [Nq,k], row max squared distance [Nq]) — exact, returned on the CPU.

    Squared distance ‖q‖²+‖b‖²−2q·b (float32, clamped at 0), ascending, ties by base index.
    ``exclude_self``: query row i is base row i and is left out of its list (not of the row max).
    Memory: ``chunk × Nb`` float32 on the device.
    """
    q, b = _features(query, "query features"), _features(base, "base features")
    if q.shape[1] != b.shape[1]:
        raise UserError(f"query features are {q.shape[1]}-d but base features are {b.shape[1]}-d")
    if exclude_self and q.shape[0] != b.shape[0]:
        raise UserError("exclude_self needs the query rows to be the base rows")
    avail = b.shape[0] - int(exclude_self)
    if not 1 <= k <= avail:
        raise UserError(f"k must be between 1 and {avail} (the base rows{' other than self' if exclude_self else ''}),"
                        f" got {k}")
    if chunk < 1:
        raise UserError(f"chunk must be positive, got {chunk}")
    dev = resolve_device(device)
    nq = q.shape[0]
    kk = min(k + 1, avail)        # one more than asked: a tie across the cut shows as val[k] == val[k-1]
    idx = torch.empty(nq, k, dtype=torch.int64)
    dist = torch.empty(nq, k, dtype=torch.float32)
    rmax = torch.empty(nq, dtype=torch.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False      # TF32 would round the distances to ~1e-3
    try:
        with torch.inference_mode():
            b = b.to(dev)
            bn = (b * b).sum(1)
            for a in range(0, nq, chunk):
                z = min(nq, a + chunk)
                qc = q[a:z].to(dev)
                d = torch.addmm(bn, qc, b.T, alpha=-2).add_((qc * qc).sum(1)[:, None]).clamp_(min=0)
                rmax[a:z] = d.max(1).values.cpu()
                if exclude_self:
                    r = torch.arange(z - a, device=dev)
                    d[r, r + a] = float("inf")
                val, ind = torch.topk(d, kk, dim=1, largest=False)
                if kk > k:           # topk picks arbitrarily among tied values: sort those rows stably
                    tied = torch.nonzero(val[:, k] == val[:, k - 1]).flatten()
                    if len(tied):
                        sv, si = torch.sort(d[tied], dim=1, stable=True)
                        val[tied], ind[tied] = sv[:, :kk], si[:, :kk]
                ind, o = torch.sort(ind[:, :k], dim=1)                       # order: distance, then index
                val, o2 = torch.sort(val[:, :k].gather(1, o), dim=1, stable=True)
                idx[a:z], dist[a:z] = ind.gather(1, o2).cpu(), val.cpu()
                del d
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return idx, dist, rmax


def source_term(target: torch.Tensor, source: torch.Tensor | None, chunk: int = 4096, device=None) -> np.ndarray:
    """s_i = min over source features of 1 − exp(−‖t_i − s‖²), divided by its max (float64); zeros without
    source features."""
    t = _features(target, "target features")
    if source is None:
        return np.zeros(t.shape[0])
    _, d, _ = knn(t, _features(source, "source features"), 1, chunk=chunk, device=device)
    s = 1 - np.exp(-d[:, 0].double().numpy())
    top = s.max()
    return s / top if top > 0 else s


def _reciprocal(nbr: np.ndarray, width: int) -> np.ndarray:
    """[N, width] bool: row i is among the first ``width`` neighbours of its p-th neighbour."""
    out = np.empty((len(nbr), width), dtype=bool)
    for a in range(0, len(nbr), _ROW_BLOCK):
        f = nbr[a:a + _ROW_BLOCK, :width]
        out[a:a + len(f)] = (nbr[f, :width] == np.arange(a, a + len(f))[:, None, None]).any(2)
    return out


def _expansion_pairs(nbr: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols), sorted and unique: the expanded k-reciprocal set E(i) of every row."""
    n = len(nbr)
    h = int(np.around(k1 / 2.0)) + 1
    r_full = _reciprocal(nbr, k1 + 1)
    r_half = _reciprocal(nbr, h)
    keys = []
    for a in range(0, n, _ROW_BLOCK):
        f = nbr[a:a + _ROW_BLOCK]                                    # forward lists [B, K]
        rm = r_full[a:a + len(f)]                                     # R(i) as a mask over f
        rc = nbr[f, :h]                                               # candidates' lists [B, K, H]
        rcm = r_half[f] & rm[:, :, None]                              # R(c) as a mask over rc
        member = ((rc[..., None] == f[:, None, None, :]) & rm[:, None, None, :]).any(3)
        inter = (member & rcm).sum(2)
        size = rcm.sum(2)
        accept = rm & (inter > 2 / 3 * size)
        take = rcm & accept[:, :, None]
        rows = np.arange(a, a + len(f), dtype=np.int64)
        keys.append(np.unique(np.concatenate([np.broadcast_to(rows[:, None], f.shape)[rm] * n + f[rm],
                                              np.broadcast_to(rows[:, None, None], rc.shape)[take] * n + rc[take]])))
    key = np.concatenate(keys)                                        # blocks are row ranges: sorted
    return key // n, key % n


def _pair_sqdist(t: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Squared distances (float32, clamped at 0) of the given pairs of rows of ``t``, as in :func:`knn`."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, _PAIR_BLOCK // t.shape[1])
    with torch.inference_mode():
        tn = (t * t).sum(1)
        for a in range(0, len(rows), step):
            r = torch.from_numpy(rows[a:a + step]).to(t.device)
            c = torch.from_numpy(cols[a:a + step]).to(t.device)
            d = tn[r] + tn[c] - 2 * (t[r] * t[c]).sum(1)
            out[a:a + len(r)] = d.clamp_(min=0).cpu().numpy()
    return out


def _expansion_sqdist(t: torch.Tensor, nbr: np.ndarray, nbr_sq: np.ndarray, rows: np.ndarray,
                      cols: np.ndarray) -> np.ndarray:
    """Squared distances of the pairs (rows, cols): from the k-NN lists where the pair is in them (about 98%),
    else from the features of the pair."""
    n = len(nbr)
    key = (np.arange(n, dtype=np.int64)[:, None] * n + nbr).ravel()
    order = np.argsort(key)
    key = key[order]
    want = rows * n + cols
    pos = np.minimum(np.searchsorted(key, want), len(key) - 1)
    found = key[pos] == want
    out = np.empty(len(rows), dtype=np.float32)
    out[found] = nbr_sq.ravel()[order[pos[found]]]
    out[~found] = _pair_sqdist(t, rows[~found], cols[~found])
    return out


def _csr(n: int, counts: np.ndarray, cols: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
    """CSR from the entries per row and the (column-sorted) entries; explicit zeros are kept."""
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    itype = np.int32 if max(len(cols), n) < 2**31 else np.int64
    return sp.csr_matrix((data, cols.astype(itype, copy=False), indptr.astype(itype, copy=False)), shape=(n, n))


def _overlap(v: sp.csr_matrix) -> sp.csr_matrix:
    """m(i,j) = Σ_k min(V_ik, V_jk) for every pair whose supports overlap, plus an explicit 0 on the diagonal
    of an empty row. Vectorised per chunk of rows over V's CSC columns."""
    n = v.shape[0]
    csc = v.tocsc()
    csc.sort_indices()
    colcount = np.diff(csc.indptr)
    per_entry = colcount[v.indices].astype(np.int64)
    cum = np.zeros(len(per_entry) + 1, dtype=np.int64)
    np.cumsum(per_entry, out=cum[1:])
    row_cum = cum[v.indptr]                                          # triples before each row
    max_rows = max(1, _CELLS // n)
    counts, cols, vals = [], [], []
    a = 0
    while a < n:
        z = int(np.searchsorted(row_cum, row_cum[a] + _TRIPLES, side="right")) - 1
        z = min(n, a + max_rows, max(z, a + 1))
        e0, e1 = v.indptr[a], v.indptr[z]
        ks, cnt = v.indices[e0:e1], per_entry[e0:e1]
        pos = np.repeat(csc.indptr[ks].astype(np.int64) - (cum[e0:e1] - cum[e0]), cnt) + np.arange(cum[e1] - cum[e0])
        key = np.repeat(np.repeat(np.arange(z - a, dtype=np.int64) * n, np.diff(v.indptr[a:z + 1])), cnt)
        key += csc.indices[pos]
        acc = np.bincount(key, weights=np.minimum(np.repeat(v.data[e0:e1], cnt), csc.data[pos]),
                          minlength=(z - a) * n)
        del key, pos
        nz = np.flatnonzero(acc)
        empty = np.flatnonzero(v.indptr[a + 1:z + 1] == v.indptr[a:z])
        if len(empty):
            nz = np.union1d(nz, empty * n + a + empty)
        counts.append(np.bincount(nz // n, minlength=z - a))
        cols.append((nz % n).astype(np.int32))
        vals.append(acc[nz])
        a = z
    return _csr(n, np.concatenate(counts), np.concatenate(cols), np.concatenate(vals))


def ssg_distance(target: torch.Tensor, source: torch.Tensor | None = None, k1: int = 20, k2: int = 6,
                 lam: float = 0.1, chunk: int = 4096, device=None) -> PairDistances:
    """SSG's re-ranked distance between the target features (rows L2-normalised), sparse and exact.

    ``source``: source-domain features for the λ term (None: s = 0). ``chunk``: query rows per k-NN block.
    """
    t0 = time.perf_counter()
    t = _features(target, "target features")
    n = t.shape[0]
    if not 1 <= k1 < n:
        raise UserError(f"k1 must be between 1 and N-1 = {n - 1} (the target images), got {k1}")
    if not 1 <= k2 <= k1 + 1:
        raise UserError(f"k2 must be between 1 and k1+1 = {k1 + 1}, got {k2}")
    if not 0 <= lam < 1:
        raise UserError(f"lam must be in [0, 1), got {lam}")
    src = None if source is None else _features(source, "source features")
    if src is not None and src.shape[1] != t.shape[1]:
        raise UserError(f"source features are {src.shape[1]}-d but target features are {t.shape[1]}-d")
    timings = {}
    dev = resolve_device(device)
    t = t.to(dev)
    nbr_t, sq_t, rmax_t = knn(t, t, k1 + 1, chunk=chunk, device=dev)
    nbr, rmax = nbr_t.numpy(), rmax_t.double().numpy()
    if rmax.min() <= 1e-5 * float((t * t).sum(1).max()):        # every distance is float32 rounding noise
        raise UserError("all target features are identical (up to float32 rounding)")
    timings["knn"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    s = source_term(t, src, chunk=chunk, device=dev)
    timings["source"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    rows, cols = _expansion_pairs(nbr, k1)
    w = np.exp(-(_expansion_sqdist(t, nbr, sq_t.numpy(), rows, cols).astype(np.float64) / rmax[rows]))
    v = _csr(n, np.bincount(rows, minlength=n), cols, w / np.bincount(rows, weights=w, minlength=n)[rows])
    q = sp.csr_matrix((np.full(n * k2, 1.0 / k2), nbr[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n))
    vq = (q @ v).tocsr()
    vq.sort_indices()
    timings["v_qe"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    matrix = _overlap(vq)
    m = matrix.data
    d = 1 - m / (2 - m)                                             # Jaccard distance
    d[d < JACCARD_ZERO] = 0.0
    d *= 1 - lam
    pair_s = np.repeat(s, np.diff(matrix.indptr))
    pair_s += s[matrix.indices]
    pair_s *= lam
    d += pair_s
    matrix.data = d
    timings["jaccard"] = time.perf_counter() - t3
    log.debug("ssg_distance: N=%d, V nnz %d, QE nnz %d, stored pairs %d, %s", n, v.nnz, vq.nnz, matrix.nnz,
              ", ".join(f"{k} {x:.2f} s" for k, x in timings.items()))
    return PairDistances(matrix=matrix, source=s, lam=float(lam), timings=timings)


def _pairs_below(ss: np.ndarray, x: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), a < b: every pair of positions in the ascending ``ss`` with ss[b] <= x - ss[a]."""
    n = len(ss)
    cnt = np.maximum(np.searchsorted(ss, x - ss, side="right") - np.arange(1, n + 1), 0)
    a = np.repeat(np.arange(n), cnt)
    b = a + 1 + np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return a, b


def _pair_sum_at(ss: np.ndarray, count: int) -> float:
    """The smallest pair-sum bound x (binary search) for which :func:`_pairs_below` gives >= ``count`` pairs."""
    n = len(ss)
    lo, hi = 0.0, 2 * float(ss[-1])
    for _ in range(64):
        mid = (lo + hi) / 2
        got = np.maximum(np.searchsorted(ss, mid - ss, side="right") - np.arange(1, n + 1), 0).sum()
        lo, hi = (lo, mid) if got >= count else (mid, hi)
    return hi


def _with_unstored(d: PairDistances, m: int, part: np.ndarray) -> np.ndarray:
    """The m smallest nonzero D over all pairs i < j, given ``part``, the m smallest stored nonzero ones (or all).

    Unstored pairs have D = (1-λ) + λ(s_i+s_j), increasing in s_i+s_j: all pairs with s_i+s_j up to a bound x
    are enumerated (vectorised, over the sorted s), the stored ones dropped. Every pair left out has
    D >= (1-λ) + λx, so the m smallest are final once the m-th is below that; else x grows (4× the pairs).
    """
    mat, n, lam = d.matrix, d.matrix.shape[0], d.lam
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(mat.indptr))
    upper = mat.indices > rows
    stored = rows[upper] * n + mat.indices[upper]                    # sorted: CSR order, i < j
    order = np.argsort(d.source, kind="stable")
    ss = d.source[order]
    total = n * (n - 1) // 2
    want = min(total, _FALLBACK_PAIRS)
    while True:
        x = _pair_sum_at(ss, want)
        a, b = _pairs_below(ss, x)
        i, j = order[a], order[b]
        key = np.minimum(i, j) * n + np.maximum(i, j)
        pos = np.minimum(np.searchsorted(stored, key), max(len(stored) - 1, 0))
        new = stored[pos] != key if len(stored) else np.ones(len(key), dtype=bool)
        cand = np.concatenate([part, 1.0 * (1 - lam) + (ss[a][new] + ss[b][new]) * lam])
        if len(cand) >= m:
            top = np.partition(cand, m - 1)[:m]
            if len(a) == total or top.max() < (1 - lam) + lam * x * (1 - 1e-12):
                return top
        want = min(total, 4 * want)


def select_eps(d: PairDistances, rho: float = 1.6e-3) -> float:
    """DBSCAN eps as SSG: the mean of the round(ρ·#pairs) smallest nonzero D over pairs i < j (stored or not)."""
    if not 0 < rho <= 1:
        raise UserError(f"rho must be in (0, 1], got {rho}")
    mat, n = d.matrix, d.matrix.shape[0]
    rows = np.repeat(np.arange(n), np.diff(mat.indptr))
    vals = mat.data[mat.indices > rows]
    zeros = int(np.count_nonzero(vals == 0))
    vals = vals[vals != 0]
    pairs = n * (n - 1) // 2 - zeros
    m = int(np.round(rho * pairs))
    if m < 1:
        raise UserError(f"rho={rho} selects no pair among the {pairs} nonzero pair distances; raise rho")
    floor = d.floor
    part = vals if len(vals) <= m else np.partition(vals, m - 1)[:m]
    if len(part) == m and part.max() <= floor:
        return float(part.mean())
    log.info("select_eps: the %d smallest pair distances reach the Jaccard floor %.4f (%d stored nonzero pairs); "
             "merging in the smallest unstored pairs", m, floor, len(vals))
    return float(_with_unstored(d, m, part).mean())


def cluster(d: PairDistances, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN(eps, min_samples, precomputed) on the sparse D: int64 labels, -1 for outliers.

    Equal to DBSCAN on the dense D because every pair with D <= eps is stored (eps < floor, checked).
    """
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import sort_graph_by_row_values

    if not 0 < eps < float("inf"):
        raise UserError(f"eps must be positive and finite, got {eps}")
    if min_samples < 1:
        raise UserError(f"min_samples must be at least 1, got {min_samples}")
    if eps >= d.floor:
        raise UserError(f"eps {eps:.4f} reaches the Jaccard floor {d.floor:.4f} (the distance of pairs with no "
                        "shared k-reciprocal neighbours), where the sparse DBSCAN would differ from the dense one; "
                        "lower rho")
    graph = sort_graph_by_row_values(d.matrix, copy=True, warn_when_not_sorted=False)
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph).astype(np.int64)
