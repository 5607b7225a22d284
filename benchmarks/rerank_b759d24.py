# ruff: noqa
"""The re-ranking module as of commit b759d24 (``sysu30k/evaluation/rerank.py`` there), kept only as the named
baseline of ``benchmarks/bench_knn_pass.py``; not used by the package. Its k-NN pass (``neighbours`` and what
it calls) copied verbatim, the stages after it left out (they did not change and the benchmark does not
time them), relative imports made absolute. Its own docstring follows.

k-reciprocal re-ranking of the query–gallery distances (Zhong et al. 2017), exact, at full gallery size.

The toolkits' code (torchreid ``utils/rerank.py``, fast-reid) builds (Q+G)² distance, rank and V matrices:
1.8 TB per float64 matrix at SYSU-30k's 1,000 × 479,730. Here no (Q+G)² or Q × G matrix is ever held (at
most ``chunk × (Q+G)`` similarities, a ``Q × block`` distance block, the k-NN lists and the sparse V and
pairs), and V, the query expansion and the Jaccard term are computed only for the rows and pairs that can
differ from the dense defaults. Time is that of the k-NN pass, O((Q+G)²·D): see (3) below.

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
chunked pass over all Q+G rows, (Q+G)²·D multiply-adds, which also gives every L_{k1+1} and M_x.
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

from contextlib import contextmanager

import numpy as np
import torch

from sysu30k.errors import UserError

MARGIN = 16                  # float32 candidates per row beyond the K needed, recomputed in float64
ROW_BYTES = 256 << 20        # float32 similarities per chunk of rows in the k-NN pass (4x on a GPU)
NORM_TOL = 1e-2              # |‖x‖ − 1| allowed: D = 2 − 2x·y is the squared distance of unit vectors
_SLOP = 1e-11                # added to ε: covers the float64 rounding of the recomputed values (~1e-13)
_PAIR_BYTES = 64 << 20       # gathered float64 feature rows per block of recomputed dot products


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


def _extreme(sims: list[torch.Tensor], offs: list[int], k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate indices [B, C], bound [B]): the k largest (smallest) float32 similarities of every part;
    every point left out has a float32 similarity <= (>=) the bound (-inf (+inf) when none is left out)."""
    idx, bound = [], []
    for s, off in zip(sims, offs):
        kk = min(k, s.shape[1])
        v, i = torch.topk(s, kk, dim=1, largest=largest)
        idx.append(i + off)
        inf = float("-inf") if largest else float("inf")
        bound.append(v[:, -1].double() if s.shape[1] > kk else torch.full((len(s),), inf, dtype=torch.float64,
                                                                        device=s.device))
    b = torch.stack(bound, 1)
    return torch.cat(idx, 1), (b.max(1).values if largest else b.min(1).values)


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


def neighbours(exact: list[torch.Tensor], norms: torch.Tensor, k: int, chunk: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(L_k [N, k] int64, their squared distances [N, k], row max M [N], rows certified the slow way) of the
    N points of the concatenated ``exact`` parts (one device): exact float64 rankings by (D/M, index) from one
    float32 pass."""
    device = exact[0].device
    fast = [p.float() for p in exact]
    offs = np.cumsum([0] + [len(p) for p in exact]).tolist()
    n, dim = offs[-1], exact[0].shape[1]
    eps_all = 1.01 * (dim + 2) * 2.0 ** -24 * norms * float(norms.max()) + _SLOP
    rows = chunk or int(max(16, min(4096, ROW_BYTES * (4 if device.type != "cpu" else 1) // (4 * n))))
    kc = min(n, k + MARGIN)
    nbr, sq, rmax = np.empty((n, k), np.int64), np.empty((n, k)), np.empty(n)
    slow = 0
    with _full_fp32(), torch.inference_mode():
        for pi, part in enumerate(exact):
            for a in range(0, len(part), rows):
                z = min(len(part), a + rows)
                g0, g1 = offs[pi] + a, offs[pi] + z
                x = part[a:z].double()
                sims = [fast[pi][a:z] @ f.T for f in fast]
                cand, tau = _extreme(sims, offs, kc, largest=True)
                low, tau_low = _extreme(sims, offs, 2, largest=False)
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
                for r in np.flatnonzero(~ok):
                    nbr[g0 + r], sq[g0 + r], rmax[g0 + r] = _exact_row(
                        x[r:r + 1], [s[r] for s in sims], offs, exact, float(mu[r]), cand[r:r + 1], float(eps[r]), k)
                slow += int((~ok).sum())
    return nbr, sq, rmax, slow
