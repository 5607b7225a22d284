"""Test helper: a plain dense numpy (float64) transcription of SSG's clustering distance, eps and DBSCAN
(SSG ``reid/rerank.py`` and ``generate_selflabel``, after Zhong et al. 2017), written literally with
N×N matrices and per-row loops, to check the sparse ``sysu30k.train.ssg.rerank`` against. Ranks use a stable
argsort, so ties go to the lower index. One deliberate change: d_J below 1e-10 (float noise where it is
mathematically 0) is set to 0 rather than only its negative values, as ``sysu30k.train.ssg.rerank`` does."""

from __future__ import annotations

import numpy as np


def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """‖a_i‖² + ‖b_j‖² − 2 a_i·b_j in float64, clamped at 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0)


def initial_rank(target: np.ndarray) -> np.ndarray:
    """Every row's neighbours by ascending squared distance (stable: ties by index)."""
    return np.argsort(sq_dist(target, target), axis=1, kind="stable")


def reference_distance(target, source=None, k1: int = 20, k2: int = 6, lam: float = 0.1) -> np.ndarray:
    """The dense N×N SSG distance D = (1-λ)·Jaccard + λ·(s_i + s_j)."""
    target = np.asarray(target, np.float64)
    n = target.shape[0]
    original_dist = sq_dist(target, target)
    rank = np.argsort(original_dist, axis=1, kind="stable")
    original_dist = original_dist / original_dist.max(axis=1, keepdims=True)

    V = np.zeros((n, n))
    for i in range(n):
        forward = rank[i, :k1 + 1]
        backward = rank[forward, :k1 + 1]
        fi = np.where(backward == i)[0]
        k_reciprocal = forward[fi]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            cf = rank[candidate, :int(np.around(k1 / 2.0)) + 1]
            cb = rank[cf, :int(np.around(k1 / 2.0)) + 1]
            rc = cf[np.where(cb == candidate)[0]]
            if len(np.intersect1d(rc, k_reciprocal)) > 2 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)

    V_qe = np.zeros_like(V)
    for i in range(n):
        V_qe[i] = np.mean(V[rank[i, :k2]], axis=0)
    V = V_qe

    invIndex = [np.where(V[:, k] != 0)[0] for k in range(n)]
    jaccard = np.zeros((n, n))
    for i in range(n):
        temp_min = np.zeros(n)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[k] for k in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[indImages[j]] += np.minimum(V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    jaccard[jaccard < 1e-10] = 0.0     # the original clamps at 0; below 1e-10 is float noise of m = 1 (as rerank.py)

    if source is None:
        s = np.zeros(n)
    else:
        s = (1 - np.exp(-sq_dist(target, source))).min(axis=1)
        s = s / s.max()
    source_dist = np.zeros((n, n))
    for i in range(n):
        source_dist[i, :] = s + s[i]
    return jaccard * (1 - lam) + source_dist * lam


def reference_eps(dist: np.ndarray, rho: float = 1.6e-3) -> float:
    """Mean of the round(ρ·#pairs) smallest nonzero strict-upper-triangle distances."""
    tri = np.triu(dist, 1)
    tri = tri[np.nonzero(tri)]
    tri = np.sort(tri, axis=None)
    top = np.round(rho * tri.size).astype(int)
    return float(tri[:top].mean())


def reference_labels(dist: np.ndarray, eps: float, min_samples: int = 4) -> np.ndarray:
    """sklearn DBSCAN on the dense precomputed matrix."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)
