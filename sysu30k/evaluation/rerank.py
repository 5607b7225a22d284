"""k-reciprocal re-ranking of the query–gallery distances (Zhong et al. 2017), exact, at full gallery size.

The toolkits' code (torchreid ``utils/rerank.py``, fast-reid) builds (Q+G)² distance, rank and V matrices:
1.8 TB per float64 matrix at SYSU-30k's 1,000 × 479,730. Here no (Q+G)² or Q × G matrix is ever held (at
most a ``block × block`` tile of float32 similarities, a ``Q × block`` distance block, the k-NN lists and
the sparse V and pairs), and V, the query expansion and the Jaccard term are computed only for the rows and
pairs that can differ from the dense defaults. Time is that of the k-NN pass, O((Q+G)²·D): see (3) below.

**Distance.** D(x, y) = max(0, 2 − 2·x·y) — ‖x − y‖² for the L2-normalised features the evaluator
uses; the official score is x·y, so with λ = 1 the ranking is the plain one. M_x = max_y D(x, y) over
all Q+G points; d̃(x, y) = D(x, y) / M_x (the original's normalisation; its "column max" of a symmetric
matrix is the row max). L_K(x): the first K points of x's ranking by (d̃, index) — the stable argsort.

**The algorithm** (unchanged): R(x) = {f ∈ L_{k1+1}(x) : x ∈ L_{k1+1}(f)}; R_h(c) likewise with
h = round(k1/2)+1; E(x) = R(x) ∪ every R_h(c), c ∈ R(x), with |R_h(c) ∩ R(x)| > ⅔|R_h(c)|;
V_x = exp(−d̃(x, ·)) on E(x), normalised to sum 1; V'_x = mean of V_y over y ∈ L_{k2}(x) (V' = V when
k2 = 1); m(i, j) = Σ_k min(V'_ik, V'_jk); d_J = 1 − m/(2−m); final = (1−λ)·d_J + λ·d̃(i, j).

**Which rows are needed (and why they suffice).** d_J(i, j) < 1 only where supp V'_i meets supp V'_j.
(1) supp V'_i = ∪ E(y), y ∈ L_{k2}(i): E of the set A = ∪_i L_{k2}(i) gives the queries' columns S.
(2) If k ∈ E(y) then y ∈ L_{k1+1}(k) (k ∈ R(y) is reciprocal) or y ∈ L_{k1+1}(c) for some c ∈ L_h(k)
(k ∈ R_h(c) gives c ∈ L_h(k), and c ∈ R(y) gives y ∈ L_{k1+1}(c)). So every V row that is nonzero on S
belongs to B⁺ = ∪_{k∈S} L_{k1+1}(k) ∪ L_{k1+1}(L_h(k)), found from forward lists; V on A ∪ B⁺ is every
V value on S. (3) V'_j on S is the mean of those rows over L_{k2}(j), so j needs a Jaccard value only if
L_{k2}(j) meets B = {y ∈ B⁺ : E(y) ∩ S ≠ ∅}. That is a reverse-neighbour condition: whether y is among j's
k2 nearest depends on j's k2-th distance, i.e. on j's whole row, so every point's L_{k2} is needed — one
pass over the block pairs of all Q+G rows, each pair multiplied once since the matrix is symmetric,
(Q+G)²·D/2 multiply-adds, which also gives every L_{k1+1} and M_x. A tile keeps only the similarities
that beat a row's or a column's current K-th (or 2nd lowest) value, so the per-element cost is the
product and one masked compare.
(4) Every other pair has d_J = 1, final = (1−λ) + λ·d̃(i, j), computed block by block from the features.

**Exact.** The pass multiplies in float32 (no float64 copy of the gallery) and certifies: per row the
top K+16 and the 2 lowest candidates are recomputed in float64; a float32 dot product is within
ε = 1.01·(D+2)·2⁻²⁴·‖x‖·max‖y‖ of the exact one (the standard bound, with the rounding of float64 inputs
to float32), so a row whose float32 margin exceeds ε has exactly the float64 L_K and M_x, and any other
row recomputes every point within ε of its cuts. All later arithmetic is float64. The result is the
dense algorithm in float64 up to the rounding of the dot products (their summation order, ~1e-16).
The query expansion sums its k2 rows in index order, so points with the same k2 neighbours get
bit-identical V' rows and exactly tied distances, which the scorer's tie rule then orders.

**Scoring.** :func:`score_distances` feeds minus the distances to :class:`scoring.Scorer` unchanged: its
query features are the Q×Q identity and a gallery block's "features" are the block's score columns, so its
dot product returns them exactly (e_i·s = s_i); the cost is Q² multiply-adds per gallery item.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import UserError
from ..io.device import resolve_device
from .config import RERANK_DEFAULT
from .scoring import TOP_K, Scorer, Scores, auto_chunk

log = logging.getLogger("sysu30k")

MARGIN = 16                  # float32 candidates per row beyond the K needed, recomputed in float64
BLOCK = 8192                 # rows per block of the k-NN pass: a block pair is one float32 product (2x on a GPU)
NORM_TOL = 1e-2              # |‖x‖ − 1| allowed: D = 2 − 2x·y is the squared distance of unit vectors
_SLOP = 1e-11                # added to ε: covers the float64 rounding of the recomputed values (~1e-13)
SAME_POINT = 1e-6            # a row max below this: all features are one point, their distances rounding noise
_PAIR_BYTES = 64 << 20       # gathered float64 feature rows per block of recomputed dot products
_ROW_BLOCK = 1024            # rows per vectorised k-reciprocal step
_CERT_ROWS = 4096            # rows per step of the float64 certificate
_SLOW_BYTES = 256 << 20      # float32 similarities of the rows certified the slow way, made together
_TRIPLES = 1 << 22           # (query, column, gallery) triples per Jaccard chunk
_CELLS = 1 << 22             # query rows × candidate gallery items per Jaccard accumulator


@dataclass
class Reranked:
    """The re-ranked distances of every query to every gallery item: d_J is stored for the pairs whose
    V' supports overlap; every other pair has d_J = 1 and is computed from the features when asked."""

    query: torch.Tensor      # [Q, D] float64 on ``device``
    gallery: torch.Tensor    # [G, D] as given (CPU)
    qmax: np.ndarray         # M_i: each query's largest squared distance to the Q+G points (float64)
    jaccard: sp.csc_matrix   # [Q, G] d_J of the overlapping pairs
    lam: float
    device: torch.device
    stats: dict = field(default_factory=dict)   # set sizes and seconds per stage

    def distances(self, gidx) -> np.ndarray:
        """The final distances [Q, len(gidx)] (float64) of every query to the gallery items ``gidx``."""
        gidx = np.asarray(gidx, np.int64).reshape(-1)
        with torch.inference_mode():
            g = self.gallery[torch.as_tensor(gidx)].to(self.device, torch.float64)
            d = (2 - 2 * (self.query @ g.T)).clamp_(min=0)
            od = (d / torch.as_tensor(self.qmax, device=self.device)[:, None]).cpu().numpy()
        out = 1.0 * (1 - self.lam) + od * self.lam
        sub = self.jaccard[:, gidx].tocoo()
        out[sub.row, sub.col] = sub.data * (1 - self.lam) + od[sub.row, sub.col] * self.lam
        return out


def _features(x, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the features as a CPU tensor, their float64 norms); refuses non-finite or non-unit rows."""
    t = torch.as_tensor(x)
    if t.dim() != 2 or t.shape[1] < 1:
        raise UserError(f"{name} must be a 2-d [N, D] array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    t = t.cpu()
    norms = torch.cat([torch.linalg.vector_norm(t[a:a + 4096].double(), dim=1) for a in range(0, len(t), 4096)]
                      or [torch.zeros(0, dtype=torch.float64)])
    bad = torch.nonzero(~torch.isfinite(norms)).flatten()
    if len(bad):
        raise UserError(f"{len(bad)} of {len(t)} {name} are not finite (NaN or inf), e.g. row {int(bad[0])}")
    off = torch.nonzero((norms - 1).abs() > NORM_TOL).flatten()
    if len(off):
        raise UserError(f"{name} are not L2-normalised (row {int(off[0])} has norm {float(norms[off[0]]):.4g}): "
                        "re-ranking needs the squared distance of unit vectors")
    return t, norms


@contextmanager
def _full_fp32():
    """float32 matrix products in full float32 (no TF32 or bfloat16 passes), as the error bound assumes."""
    prec, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _gather(parts: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (global indices over the concatenated parts) as float64, shape ``idx.shape + (D,)``."""
    flat = idx.reshape(-1)
    out = torch.empty(len(flat), parts[0].shape[1], dtype=torch.float64, device=idx.device)
    off = 0
    for p in parts:
        at = torch.nonzero((flat >= off) & (flat < off + len(p))).flatten()
        out.index_copy_(0, at, p.index_select(0, flat[at] - off).double())
        off += len(p)
    return out.reshape(*idx.shape, -1)


def _dots(x: torch.Tensor, parts: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """float64 x_r · p_{idx[r, c]} for rows x [B, D] and indices idx [B, C], in blocks of rows."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    step = max(1, _PAIR_BYTES // (8 * max(1, idx.shape[1]) * x.shape[1]))
    for a in range(0, len(x), step):
        out[a:a + step] = (_gather(parts, idx[a:a + step]) * x[a:a + step, None, :]).sum(-1)
    return out


def _rank(idx: np.ndarray, d: np.ndarray, rmax: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each row's candidates by (d / row max, index): (indices, squared distances)."""
    o = np.lexsort((idx, d / rmax[:, None]), axis=1)[:, :k]
    return np.take_along_axis(idx, o, 1), np.take_along_axis(d, o, 1)


def _exact_row(x: torch.Tensor, sims: list[torch.Tensor], offs: list[int], parts: list[torch.Tensor], mu: float,
               cand: torch.Tensor, eps: float, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One row whose float32 margins are within ε of a cut: recompute in float64 every point that float32
    cannot rule out, first for the row max, then for the first k (the module docstring's certificate)."""
    def within(test) -> torch.Tensor:
        return torch.cat([torch.nonzero(test(s)).flatten() + off for s, off in zip(sims, offs)])[None]

    low = within(lambda s: s <= mu + eps)
    rmax = max(0.0, float(2 - 2 * _dots(x, parts, low).min()))
    if rmax == 0:
        raise UserError("all query and gallery features are the same point (up to rounding): nothing to rank")
    d = (2 - 2 * _dots(x, parts, cand)).clamp_(min=0).cpu().numpy()
    _, dk = _rank(cand.cpu().numpy(), d, np.array([rmax]), k)
    theta = 1 - float(dk.max()) / 2 - eps
    top = within(lambda s: s >= theta)
    d = (2 - 2 * _dots(x, parts, top)).clamp_(min=0).cpu().numpy()
    nbr, sq = _rank(top.cpu().numpy(), d, np.array([rmax]), k)
    return nbr[0], sq[0], rmax


def _blocks(parts: list[torch.Tensor], size: int) -> list[tuple[int, torch.Tensor]]:
    """(global offset, rows) of consecutive pieces of at most ``size`` rows, none spanning two parts, each
    part cut into pieces of equal size (within one row): no small last piece with loose first lists."""
    out, off = [], 0
    for p in parts:
        step = -(-len(p) // -(-len(p) // size)) if len(p) else size
        out += [(off + a, p[a:a + step]) for a in range(0, len(p), step)]
        off += len(p)
    return out


def _merge(vals: torch.Tensor, idx: torch.Tensor, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor,
           largest: bool) -> None:
    """Fold candidates (row r, column c, similarity v) into the running per-row lists ``vals``/``idx``
    (each row's k best, best first), in place: one top-k over each touched row's list and its new entries."""
    if len(r) == 0:
        return
    k = vals.shape[1]
    o = torch.argsort(r, stable=True)
    r, c, v = r[o], c[o], v[o]
    u, counts = torch.unique_consecutive(r, return_counts=True)
    at = torch.repeat_interleave(torch.arange(len(u), device=r.device), counts)
    col = k + torch.arange(len(r), device=r.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    width = k + int(counts.max())
    pool = torch.full((len(u), width), float("-inf") if largest else float("inf"), device=r.device)
    ids = torch.full((len(u), width), -1, dtype=torch.int64, device=r.device)
    pool[:, :k], ids[:, :k] = vals[u], idx[u]
    pool[at, col], ids[at, col] = v, c
    best = torch.topk(pool, k, dim=1, largest=largest)
    vals[u], idx[u] = best.values, ids.gather(1, best.indices)


def _candidates(fast: list[torch.Tensor], block: int, kc: int) -> tuple[torch.Tensor, ...]:
    """(top indices [N, kc], their bound [N], lowest indices [N, 2], their bound [N]) from float32 similarities
    of every pair, each block pair multiplied once (the matrix is symmetric): every point outside a row's top
    (lowest) list has a float32 similarity <= (>=) its bound, -inf (+inf) when no point is left out."""
    device = fast[0].device
    n = sum(len(p) for p in fast)
    top = torch.full((n, kc), float("-inf"), device=device)
    top_i = torch.full((n, kc), -1, dtype=torch.int64, device=device)
    low = torch.full((n, 2), float("inf"), device=device)
    low_i = torch.full((n, 2), -1, dtype=torch.int64, device=device)
    blocks = _blocks(fast, block)
    for g0, x in blocks:                                        # each row's own block first: full lists
        s = x @ x.T
        kk, kl = min(kc, len(x)), min(2, len(x))
        v, i = torch.topk(s, kk, dim=1)
        top[g0:g0 + len(x), :kk], top_i[g0:g0 + len(x), :kk] = v, i + g0
        v, i = torch.topk(s, kl, dim=1, largest=False)
        low[g0:g0 + len(x), :kl], low_i[g0:g0 + len(x), :kl] = v, i + g0
    buf = torch.empty(block * block, device=device)             # reused tiles: no page faults per pair
    mask, tmp = (torch.empty(block * block, dtype=torch.bool, device=device) for _ in range(2))
    for bi, (g0, x) in enumerate(blocks):
        for g1, y in blocks[bi + 1:]:
            shape = (len(x), len(y))
            s = torch.matmul(x, y.T, out=buf[:len(x) * len(y)].view(shape))
            m, t = mask[:s.numel()].view(shape), tmp[:s.numel()].view(shape)
            tr, tc = top[g0:g0 + len(x), -1].contiguous(), top[g1:g1 + len(y), -1].contiguous()
            lr, lc = low[g0:g0 + len(x), -1].contiguous(), low[g1:g1 + len(y), -1].contiguous()
            torch.gt(s, tr[:, None], out=m)                     # only what can enter a row's or a column's list
            for op, bound in ((torch.gt, tc[None, :]), (torch.lt, lr[:, None]), (torch.lt, lc[None, :])):
                m.logical_or_(op(s, bound, out=t))
            i, j = m.nonzero(as_tuple=True)
            v = s[i, j]
            for vals, ids, br, bc, largest in ((top, top_i, tr, tc, True), (low, low_i, lr, lc, False)):
                a, b = (v > br[i], v > bc[j]) if largest else (v < br[i], v < bc[j])
                _merge(vals, ids, torch.cat([g0 + i[a], g1 + j[b]]), torch.cat([g1 + j[a], g0 + i[b]]),
                       torch.cat([v[a], v[b]]), largest)
    full_top, full_low = n > kc, n > 2
    tau = top[:, -1].double() if full_top else torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    tau_low = low[:, -1].double() if full_low else torch.full((n,), float("inf"), dtype=torch.float64,
                                                               device=device)
    return top_i, tau, low_i, tau_low


def neighbours(exact: list[torch.Tensor], norms: torch.Tensor, k: int, chunk: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(L_k [N, k] int64, their squared distances [N, k], row max M [N], rows certified the slow way) of the
    N points of the concatenated ``exact`` parts (one device): exact float64 rankings by (D/M, index) from one
    float32 pass over the block pairs (``chunk`` rows a block)."""
    device = exact[0].device
    fast = [p.float() for p in exact]
    offs = np.cumsum([0] + [len(p) for p in exact]).tolist()
    n, dim = offs[-1], exact[0].shape[1]
    eps_all = 1.01 * (dim + 2) * 2.0 ** -24 * norms * float(norms.max()) + _SLOP
    kc = min(n, k + MARGIN)
    nbr, sq, rmax = np.empty((n, k), np.int64), np.empty((n, k)), np.empty(n)
    slow_rows, slow_mu = [np.zeros(0, np.int64)], [np.zeros(0)]
    with _full_fp32(), torch.inference_mode():
        cands, taus, lows, tau_lows = _candidates(fast, chunk or BLOCK * (2 if device.type != "cpu" else 1), kc)
        for g0, part in _blocks(exact, _CERT_ROWS):
            g1 = g0 + len(part)
            x = part.double()
            cand, tau, low, tau_low = cands[g0:g1], taus[g0:g1], lows[g0:g1], tau_lows[g0:g1]
            eps = eps_all[g0:g1].to(device)
            mu = _dots(x, exact, low).min(1).values
            ok = (tau_low - eps > mu).cpu().numpy()
            m = (2 - 2 * mu).clamp_(min=0).cpu().numpy()
            ci = cand.cpu().numpy()
            d = (2 - 2 * _dots(x, exact, cand)).clamp_(min=0).cpu().numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                nb, dd = _rank(ci, d, m, k)
            theta = 1 - dd.max(1) / 2 - eps.cpu().numpy()
            ok &= (tau.cpu().numpy() < theta) & (m > 0)
            nbr[g0:g1], sq[g0:g1], rmax[g0:g1] = nb, dd, m
            bad = np.flatnonzero(~ok)
            slow_rows.append(g0 + bad)
            slow_mu.append(mu.cpu().numpy()[bad])
        rows = np.concatenate(slow_rows)
        mus = np.concatenate(slow_mu)
        step = max(1, _SLOW_BYTES // (4 * n))         # slow rows whose float32 similarities are made at once
        for a in range(0, len(rows), step):
            r = torch.as_tensor(rows[a:a + step], device=device)
            x = _gather(exact, r)
            sims = [x.float() @ f.T for f in fast]     # the float32 rows of the pass, for these rows only
            for i, g in enumerate(rows[a:a + step].tolist()):
                nbr[g], sq[g], rmax[g] = _exact_row(x[i:i + 1], [s_[i] for s_ in sims], offs, exact,
                                                    float(mus[a + i]), cands[g:g + 1], float(eps_all[g]), k)
    return nbr, sq, rmax, len(rows)


def _expansion(nbr: np.ndarray, rows: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into ``rows``, columns), sorted by both: the expanded k-reciprocal set E(x) of every row."""
    n = len(nbr)
    kf, h = k1 + 1, int(np.around(k1 / 2.0)) + 1
    keys = []
    for a in range(0, len(rows), _ROW_BLOCK):
        x = rows[a:a + _ROW_BLOCK]
        f = nbr[x, :kf]                                                      # L_{k1+1}(x)        [B, kf]
        rm = (nbr[f, :kf] == x[:, None, None]).any(2)                        # R(x) as a mask over f
        rc = nbr[f, :h]                                                      # L_h(c), c in f     [B, kf, h]
        rcm = (nbr[rc, :h] == f[:, :, None, None]).any(3) & rm[:, :, None]   # R_h(c) over rc, c in R(x)
        member = ((rc[..., None] == f[:, None, None, :]) & rm[:, None, None, :]).any(3)
        accept = rm & ((member & rcm).sum(2) > 2.0 / 3 * rcm.sum(2))
        take = rcm & accept[:, :, None]
        pos = np.arange(a, a + len(x), dtype=np.int64)
        keys.append(np.unique(np.concatenate([np.broadcast_to(pos[:, None], f.shape)[rm] * n + f[rm],
                                              np.broadcast_to(pos[:, None, None], rc.shape)[take] * n + rc[take]])))
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    return key // n, key % n


def _pair_sq(rows: np.ndarray, cols: np.ndarray, nbr: np.ndarray, sq: np.ndarray, exact: list[torch.Tensor]
             ) -> np.ndarray:
    """Squared distances of the pairs (rows, cols): from the k-NN lists where the pair is in them, else from
    the features in float64."""
    n = len(nbr)
    own = np.unique(rows)
    key = (own[:, None] * n + nbr[own]).ravel()
    order = np.argsort(key)
    key = key[order]
    want = rows * n + cols
    pos = np.minimum(np.searchsorted(key, want), len(key) - 1)
    found = key[pos] == want
    out = np.empty(len(rows))
    out[found] = sq[own].ravel()[order[pos[found]]]
    miss = np.flatnonzero(~found)
    step = max(1, _PAIR_BYTES // (16 * exact[0].shape[1]))
    with torch.inference_mode():
        for a in range(0, len(miss), step):
            m = miss[a:a + step]
            r, c = (torch.as_tensor(v, device=exact[0].device) for v in (rows[m], cols[m]))
            s = (_gather(exact, r) * _gather(exact, c)).sum(1)
            out[m] = (2 - 2 * s).clamp_(min=0).cpu().numpy()
    return out


def _expansion_lists(nbr: np.ndarray, rows: np.ndarray, k2: int) -> np.ndarray:
    """[len(rows), k2]: the points whose V rows each row's V' averages, in index order (itself when k2 = 1)."""
    return rows[:, None] if k2 == 1 else np.sort(nbr[rows, :k2], axis=1)


def _averaged(lists: np.ndarray, vrows: np.ndarray, v: sp.csr_matrix, k2: int) -> sp.csr_matrix:
    """V' = the mean of the V rows named in ``lists`` (rows of V: ``vrows``, sorted), summed in index order;
    points outside ``vrows`` have no V entry on the columns that matter and are left out of the sum."""
    pos = np.searchsorted(vrows, lists)
    ok = pos < len(vrows)
    ok[ok] = vrows[pos[ok]] == lists[ok]
    sel = sp.csr_matrix((np.ones(int(ok.sum())), pos[ok], np.concatenate([[0], np.cumsum(ok.sum(1))])),
                        shape=(len(lists), len(vrows)))
    out = (sel @ v).tocsr()
    out.sort_indices()
    out.data /= k2
    return out


def _min_sums(a: sp.csr_matrix, b: sp.csc_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of a, row of b, m) for every pair with m = Σ_k min(a_k, b_k) > 0, each sum in ascending k."""
    nb = b.shape[0]
    per_entry = np.diff(b.indptr)[a.indices].astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(per_entry)])
    row_cum = cum[a.indptr]
    max_rows = max(1, _CELLS // max(nb, 1))
    out_i, out_j, out_m = [], [], []
    r = 0
    while r < a.shape[0]:
        z = int(np.searchsorted(row_cum, row_cum[r] + _TRIPLES, side="right")) - 1
        z = min(a.shape[0], r + max_rows, max(z, r + 1))
        e0, e1 = a.indptr[r], a.indptr[z]
        cnt = per_entry[e0:e1]
        pos = np.repeat(b.indptr[a.indices[e0:e1]] - (cum[e0:e1] - cum[e0]), cnt) + np.arange(cum[e1] - cum[e0])
        key = np.repeat(np.repeat(np.arange(z - r, dtype=np.int64) * nb, np.diff(a.indptr[r:z + 1])), cnt)
        key += b.indices[pos]
        acc = np.bincount(key, weights=np.minimum(np.repeat(a.data[e0:e1], cnt), b.data[pos]),
                          minlength=(z - r) * nb)
        nz = np.flatnonzero(acc)
        out_i.append(r + nz // nb)
        out_j.append(nz % nb)
        out_m.append(acc[nz])
        r = z
    return tuple(np.concatenate(x) if x else np.zeros(0) for x in (out_i, out_j, out_m))


_K1, _K2, _LAM = RERANK_DEFAULT


def rerank(query_feats, gallery_feats, k1: int = _K1, k2: int = _K2, lam: float = _LAM, device=None,
           chunk: int | None = None) -> Reranked:
    """k-reciprocal re-ranking of L2-normalised query and gallery features ([Q, D], [G, D] tensors or arrays)
    with the paper's defaults, exactly as the dense algorithm (module docstring) without its (Q+G)² matrices.

    ``device``: where the k-NN pass multiplies (default: the GPU when there is one). ``chunk``: rows per
    block of that pass (default :data:`BLOCK`, twice that on a GPU: a 256 MB or 1 GB float32 tile).
    """
    q, qn = _features(query_feats, "query features")
    g, gn = _features(gallery_feats, "gallery features")
    if len(q) == 0 or len(g) == 0:
        raise UserError(f"nothing to re-rank: {len(q)} queries and {len(g)} gallery items")
    if q.shape[1] != g.shape[1]:
        raise UserError(f"query features are {q.shape[1]}-d but gallery features are {g.shape[1]}-d")
    nq, n = len(q), len(q) + len(g)
    if not all(isinstance(k, int | np.integer) and not isinstance(k, bool) for k in (k1, k2)):
        raise UserError(f"k1 and k2 must be integers, got {k1!r} and {k2!r}")
    if not 1 <= k1 <= n - 1:
        raise UserError(f"k1 must be between 1 and {n - 1} (the queries and gallery items but one), got {k1}")
    if not 1 <= k2 <= n:
        raise UserError(f"k2 must be between 1 and {n} (the queries and gallery items), got {k2}")
    if not 0 <= lam <= 1:
        raise UserError(f"lam must be in [0, 1], got {lam}")
    if chunk is not None and chunk < 1:
        raise UserError(f"chunk must be positive, got {chunk}")
    dev = resolve_device(device)
    exact = [q.to(dev), g.to(dev)]
    stats: dict = {}
    t0 = time.perf_counter()
    nbr, sq, rmax, slow = neighbours(exact, torch.cat([qn, gn]), max(k1 + 1, k2), chunk)
    if rmax.min() < SAME_POINT:
        raise UserError("all query and gallery features are the same point (up to rounding): nothing to rank")
    stats["knn_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()                                     # (1)-(3) of the module docstring
    h = int(np.around(k1 / 2.0)) + 1
    a_rows = np.unique(_expansion_lists(nbr, np.arange(nq), k2))                # A
    s_cols = np.unique(_expansion(nbr, a_rows, k1)[1])                         # S
    b_plus = np.unique(np.concatenate([nbr[s_cols, :k1 + 1].ravel(), nbr[nbr[s_cols, :h], :k1 + 1].ravel()]))
    vrows = np.union1d(a_rows, b_plus)                                         # A ∪ B⁺: the V rows needed
    er, ec = _expansion(nbr, vrows, k1)
    w = np.exp(-(_pair_sq(vrows[er], ec, nbr, sq, exact) / rmax[vrows[er]]))
    v = sp.csr_matrix((w / np.bincount(er, weights=w, minlength=len(vrows))[er], ec,
                       np.concatenate([[0], np.cumsum(np.bincount(er, minlength=len(vrows)))])), shape=(len(vrows), n))
    vq = _averaged(_expansion_lists(nbr, np.arange(nq), k2), vrows, v, k2)
    in_s = np.zeros(n, bool)
    in_s[vq.indices] = True
    keep = in_s[ec]                                              # V on the columns S only
    vs = sp.csr_matrix((v.data[keep], ec[keep], np.concatenate([[0], np.cumsum(np.bincount(er[keep],
                       minlength=len(vrows)))])), shape=v.shape)
    in_b = np.zeros(n, bool)                                     # B: V rows that are nonzero on S
    in_b[vrows[np.diff(vs.indptr) > 0]] = True
    lists = _expansion_lists(nbr, np.arange(nq, n), k2)
    cand = nq + np.flatnonzero(in_b[lists].any(1))               # gallery items whose V' can meet a query's
    vj = _averaged(lists[cand - nq], vrows, vs, k2)
    stats.update(v_rows=len(vrows), support=int(in_s.sum()), b_rows=int(in_b.sum()), candidates=len(cand),
                 slow_rows=slow, v_s=time.perf_counter() - t1)

    t2 = time.perf_counter()
    qi, jpos, m = _min_sums(vq, vj.tocsc())
    jac = sp.csc_matrix((1 - m / (2 - m), (qi, cand[jpos] - nq)), shape=(nq, len(g)))
    stats.update(pairs=int(jac.nnz), jaccard_s=time.perf_counter() - t2)
    log.debug("rerank: Q=%d G=%d %s", nq, len(g), stats)
    return Reranked(query=exact[0].double(), gallery=g, qmax=rmax[:nq].copy(), jaccard=jac, lam=float(lam),
                    device=dev, stats=stats)


def score_distances(distances: Callable[[np.ndarray], np.ndarray], query_pids, query_camids, gallery_pids,
                    gallery_camids, query_keys=None, gallery_keys=None, chunk: int | None = None,
                    max_rank: int = 20, top_k: int = TOP_K) -> Scores:
    """Score a query–gallery distance (smaller ranks first) with the official protocol of :class:`Scorer`.

    ``distances(gidx)`` returns the [Q, len(gidx)] distances to those gallery items; it is called block by
    block (``chunk`` items, default :func:`scoring.auto_chunk`), so the Q × G matrix never has to exist.
    The per-query table's scores are minus the distances.
    """
    nq = len(np.asarray(query_pids).reshape(-1))
    s = Scorer(torch.eye(nq, dtype=torch.float64), query_pids, query_camids, gallery_pids, gallery_camids,
               query_keys, gallery_keys, device="cpu", max_rank=max_rank, top_k=top_k)
    if chunk is not None and chunk < 1:
        raise UserError("chunk must be positive")
    chunk = chunk or auto_chunk(nq, s.num_gallery, "cpu")
    s.add_matches(s.matched, -distances(s.matched).T)
    rest = np.setdiff1d(np.arange(s.num_gallery), s.matched)
    for a in range(0, len(rest), chunk):
        block = rest[a:a + chunk]
        s.add(block, -distances(block).T)
    return s.result()


def rerank_score(query_feats, query_pids, query_camids, gallery_feats, gallery_pids, gallery_camids,
                 k1: int = _K1, k2: int = _K2, lam: float = _LAM, query_keys=None, gallery_keys=None, device=None,
                 chunk: int | None = None, max_rank: int = 20, top_k: int = TOP_K) -> tuple[Scores, dict]:
    """:func:`scoring.score` on the re-ranked distances (:func:`rerank`): the same metrics and tie rule;
    returns (scores, :attr:`Reranked.stats` with the scoring time as ``score_s``)."""
    if len(np.asarray(gallery_pids).reshape(-1)) != len(gallery_feats):
        raise UserError(f"gallery pids has {len(np.asarray(gallery_pids).reshape(-1))} entries for "
                        f"{len(gallery_feats)} feature rows")
    r = rerank(query_feats, gallery_feats, k1, k2, lam, device=device, chunk=chunk)
    t0 = time.perf_counter()
    s = score_distances(r.distances, query_pids, query_camids, gallery_pids, gallery_camids, query_keys,
                        gallery_keys, max_rank=max_rank, top_k=top_k)
    return s, {**r.stats, "score_s": time.perf_counter() - t0}
