"""Exactness of sysu30k.evaluation.rerank against the dense torchreid algorithm (rerank_reference.py) and the
same scorer, on clustered unit vectors where re-ranking changes the rankings; ties; hostile inputs."""

from functools import lru_cache

import numpy as np
import pytest
import rerank_reference as ref
import torch

from sysu30k.errors import UserError
from sysu30k.evaluation.rerank import neighbours, rerank, rerank_score, score_distances
from sysu30k.evaluation.scoring import score
from sysu30k.release.constants import DISTRACTOR_PID

MAX_DEV = 1e-12


@lru_cache
def data(seed: int, nq: int, ng: int, noise: float = 1.0, dim: int = 32, ids: int = 120):
    """Clustered L2-normalised float64 features: one cluster per identity plus distractor clusters
    (pid -1000); queries come from the identities, four cameras. Noise 1: wide clusters that re-ranking
    helps; 0.5: tight ones, where most pairs keep d_J = 1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids + ids // 4, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    qc = rng.integers(0, ids, nq)
    gc = rng.integers(0, len(centres), ng)
    x = centres[np.concatenate([qc, gc])] + noise / np.sqrt(dim) * rng.standard_normal((nq + ng, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gpid = np.where(gc < ids, gc, DISTRACTOR_PID)
    return x[:nq], qc, rng.integers(0, 4, nq), x[nq:], gpid, rng.integers(0, 4, ng)


@lru_cache
def dense(seed: int, nq: int, ng: int, noise: float, k1: int, k2: int, lam: float) -> np.ndarray:
    qf, _, _, gf, _, _ = data(seed, nq, ng, noise)
    return ref.re_ranking(*ref.dense_inputs(qf, gf), k1=k1, k2=k2, lambda_value=lam)


def ranking(d: np.ndarray) -> np.ndarray:
    return np.lexsort((np.broadcast_to(np.arange(d.shape[1]), d.shape), d), axis=1)


def labels(seed: int, nq: int, ng: int, noise: float) -> tuple:
    _, qp, qc, _, gp, gc = data(seed, nq, ng, noise)
    return qp, qc, gp, gc


def assert_same_scores(a, b) -> None:
    assert np.array_equal(a.cmc, b.cmc) and np.array_equal(a.first_rank, b.first_rank)
    assert abs(a.map_official - b.map_official) < 1e-9 and abs(a.map_standard - b.map_standard) < 1e-9
    assert np.abs(a.ap_official - b.ap_official).max() < 1e-9 and np.abs(a.ap_standard - b.ap_standard).max() < 1e-9
    assert a.per_query.column("top_keys").to_pylist() == b.per_query.column("top_keys").to_pylist()


def check(seed: int, nq: int, ng: int, noise: float = 1.0, k1: int = 20, k2: int = 6, lam: float = 0.3):
    """The sparse distances, rankings and metrics against the dense ones; returns (the sparse result, the dense
    distances, the scores)."""
    qf, _, _, gf, _, _ = data(seed, nq, ng, noise)
    r = rerank(qf, gf, k1, k2, lam, device="cpu")
    got, want = r.distances(np.arange(ng)), dense(seed, nq, ng, noise, k1, k2, lam)
    stored = r.jaccard.tocoo()
    assert np.abs(got - want).max() < MAX_DEV
    assert np.abs(got[stored.row, stored.col] - want[stored.row, stored.col]).max() < MAX_DEV
    assert np.array_equal(ranking(got), ranking(want))
    lab = labels(seed, nq, ng, noise)
    scores = score_distances(r.distances, *lab)
    assert_same_scores(scores, score_distances(lambda g: want[:, g], *lab))
    return r, want, scores


@pytest.mark.parametrize("seed", [0, 1])
def test_the_paper_defaults_match_the_dense_algorithm_and_change_the_ranking(seed):
    nq, ng = 100, 2000
    r, want, scores = check(seed, nq, ng)
    qf, qp, qc, gf, gp, gc = data(seed, nq, ng)
    plain = 2 - 2 * qf @ gf.T
    moved = (ranking(want)[:, :10] != ranking(plain)[:, :10]).any(1).mean()
    assert moved > 0.5                                    # re-ranking changes most top-10 lists here
    plain_scores = score(qf, qp, qc, gf, gp, gc)
    assert not np.array_equal(scores.first_rank, plain_scores.first_rank)
    assert scores.map_standard > plain_scores.map_standard + 0.1      # as in the paper, on clustered features


@pytest.mark.parametrize("k1,k2,lam", [(5, 1, 0.3), (10, 3, 0.5), (4, 12, 0.3), (1, 2, 0.3), (20, 6, 0.0),
                                       (20, 6, 1.0)])
def test_parameter_variants_match_the_dense_algorithm(k1, k2, lam):
    check(2, 50, 800, 0.5, k1, k2, lam)


def test_lambda_one_is_the_plain_ranking():
    qf, qp, qc, gf, gp, gc = data(3, 50, 800)
    assert_same_scores(rerank_score(qf, qp, qc, gf, gp, gc, lam=1.0)[0], score(qf, qp, qc, gf, gp, gc))


def test_lambda_zero_ties_are_broken_by_the_scorers_rule():
    r, _, _ = check(2, 50, 800, 0.5, 20, 6, 0.0)
    d = r.distances(np.arange(800))
    assert (d == 1).sum(1).min() > 50                     # the non-overlapping items all tie at d_J = 1
    tied = sum(int((row < 1).sum()) - len(np.unique(row[row < 1])) for row in d)
    assert tied > 0                                       # and items with equal V' rows tie exactly


def test_only_the_neighbourhoods_of_the_queries_are_computed():
    qf, _, _, gf, _, _ = data(0, 100, 2000, 0.5)
    one = rerank(qf[:1], gf, device="cpu")
    assert one.stats["v_rows"] < 500 and one.stats["candidates"] < 500 and 0 < one.jaccard.nnz < 500
    assert 0 < rerank(qf, gf, device="cpu").jaccard.nnz < 0.2 * 100 * 2000


def dyadic(n: int, rng) -> np.ndarray:
    """Unit vectors with four entries ±1/2 out of 16: every dot product is a multiple of 1/4, exact in float32
    whatever the summation order, so distances tie everywhere; some rows are repeated."""
    x = np.zeros((n, 16))
    for row in x:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    x[rng.integers(0, n, n // 10)] = x[rng.integers(0, n, n // 10)]
    return x


def test_ties_follow_the_stable_argsort_through_the_float64_certificate():
    rng = np.random.default_rng(5)
    qf, gf = dyadic(30, rng), dyadic(400, rng)
    gf[:5] = qf[:5]                                        # queries with a copy in the gallery
    x = np.concatenate([qf, gf])
    d = np.maximum(0, 2 - 2 * x @ x.T)
    od = d / d.max(1, keepdims=True)
    nbr, sq, rmax, slow = neighbours([torch.from_numpy(qf), torch.from_numpy(gf)],
                                     torch.linalg.vector_norm(torch.from_numpy(x), dim=1), 21, chunk=64)
    assert slow > 0                                        # ties at the cut: the float32 margin cannot decide
    assert np.array_equal(nbr, np.argsort(od, axis=1, kind="stable")[:, :21])
    assert np.array_equal(sq, np.take_along_axis(d, nbr, 1)) and np.array_equal(rmax, d.max(1))
    want = ref.re_ranking(*ref.dense_inputs(qf, gf))
    assert np.abs(rerank(qf, gf, device="cpu").distances(np.arange(400)) - want).max() < MAX_DEV


def test_float32_features_give_the_float64_result():
    qf, _, _, gf, _, _ = data(3, 50, 800)
    q32, g32 = qf.astype(np.float32), gf.astype(np.float32)
    want = ref.re_ranking(*ref.dense_inputs(q32, g32))
    got = rerank(torch.from_numpy(q32), torch.from_numpy(g32), device="cpu").distances(np.arange(800))
    assert np.abs(got - want).max() < MAX_DEV and np.array_equal(ranking(got), ranking(want))


@pytest.mark.parametrize("change,message", [
    (lambda q, g: (np.where(np.arange(len(q))[:, None] == 3, np.nan, q), g), "1 of 10 query features are not finite"),
    (lambda q, g: (q, np.where(np.arange(len(g))[:, None] == 7, np.inf, g)), "gallery features are not finite"),
    (lambda q, g: (2 * q, g), "query features are not L2-normalised"),
    (lambda q, g: (q, g[:0]), "nothing to re-rank: 10 queries and 0 gallery items"),
    (lambda q, g: (q[:0], g), "nothing to re-rank: 0 queries"),
    (lambda q, g: (q, g[:, :8] / np.linalg.norm(g[:, :8], axis=1, keepdims=True)),
     "query features are 32-d but gallery features are 8-d"),
    (lambda q, g: (q, g[0]), "gallery features must be a 2-d"),
    (lambda q, g: (q[:1].repeat(10, 0), q[:1].repeat(40, 0)), "the same point"),
])
def test_hostile_features_are_one_line_errors(change, message):
    qf, _, _, gf, _, _ = data(0, 10, 40)
    with pytest.raises(UserError, match=message) as e:
        rerank(*change(qf, gf), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,message", [
    (dict(k1=50), "k1 must be between 1 and 49"), (dict(k1=0), "k1 must be between 1 and 49"),
    (dict(k2=51), "k2 must be between 1 and 50"), (dict(k2=0), "k2 must be between 1 and 50"),
    (dict(lam=1.5), r"lam must be in \[0, 1\]"), (dict(lam=float("nan")), r"lam must be in \[0, 1\]"),
    (dict(k1=20.0), "k1 and k2 must be integers"), (dict(chunk=0), "chunk must be positive"),
])
def test_parameters_out_of_range_are_one_line_errors(kw, message):
    qf, _, _, gf, _, _ = data(0, 10, 40)
    with pytest.raises(UserError, match=message) as e:
        rerank(qf, gf, **{"device": "cpu", **kw})
    assert "\n" not in str(e.value)


def test_the_largest_parameters_still_match_the_dense_algorithm():
    qf, _, _, gf, _, _ = data(0, 10, 40)
    got = rerank(qf, gf, k1=49, k2=50, device="cpu").distances(np.arange(40))
    assert np.abs(got - ref.re_ranking(*ref.dense_inputs(qf, gf), k1=49, k2=50)).max() < MAX_DEV


def test_gallery_labels_must_match_the_features():
    qf, qp, qc, gf, gp, gc = data(0, 10, 40)
    with pytest.raises(UserError, match="gallery pids has 39 entries for 40 feature rows"):
        rerank_score(qf, qp, qc, gf, gp[:39], gc[:39])
