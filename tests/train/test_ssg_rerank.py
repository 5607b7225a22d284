"""sysu30k.train.ssg.rerank (sparse SSG distance, eps, DBSCAN) against the dense reference (tests/ssg_reference.py)."""

import logging
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from ssg_reference import initial_rank, reference_distance, reference_eps, reference_labels, sq_dist

import sysu30k.train.ssg.rerank as rr
from sysu30k.errors import UserError


def mixture(n: int, dim: int, clusters: int, noise: float, seed: int) -> torch.Tensor:
    """L2-normalised Gaussian mixture: ``clusters`` random unit centres plus isotropic noise."""
    g = np.random.default_rng(seed)
    c = g.standard_normal((clusters, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[g.integers(0, clusters, n)] + noise * g.standard_normal((n, dim)) / np.sqrt(dim)
    return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))


def check_against_reference(t: torch.Tensor, s, rhos=(1.6e-3, 0.05), **kw) -> rr.PairDistances:
    d = rr.ssg_distance(t, s, chunk=53, device="cpu", **kw)
    dense = reference_distance(t.numpy(), None if s is None else s.numpy(), **kw)
    assert np.abs(d.dense() - dense).max() < 1e-5
    # the stored pattern is exactly the support overlap: every unstored pair is at the Jaccard value 1
    coo = d.matrix.tocoo()
    stored = np.zeros(dense.shape, bool)
    stored[coo.row, coo.col] = True
    s_vec = d.source
    assert np.allclose(dense[~stored], ((1 - d.lam) + d.lam * (s_vec[:, None] + s_vec[None, :]))[~stored], atol=1e-12)
    assert stored.diagonal().all()
    for rho in rhos:
        eps, eps_ref = rr.select_eps(d, rho), reference_eps(dense, rho)
        assert eps == pytest.approx(eps_ref, rel=1e-7, abs=1e-9)
        labels = rr.cluster(d, eps)
        assert labels.dtype == np.int64
        assert np.array_equal(labels, reference_labels(dense, eps_ref))
    return d


@pytest.mark.parametrize("seed,n,with_source", [(0, 250, False), (0, 250, True), (1, 400, False), (1, 400, True)])
def test_matches_dense_reference(seed, n, with_source):
    t = mixture(n, 32, n // 16, 0.5, seed)
    s = mixture(150, 32, 8, 0.6, seed + 100) if with_source else None
    d = check_against_reference(t, s)
    found = rr.cluster(d, rr.select_eps(d, 0.05))
    assert found.max() >= n // 40 and (found >= 0).mean() > 0.5        # the clusters are findable
    if not with_source:
        # identical V rows give D = 0 off the diagonal: stored as explicit zeros, DBSCAN neighbours
        assert (d.matrix.data == 0).sum() > n


def test_matches_dense_reference_other_k_and_many_chunks(monkeypatch):
    # every chunked loop runs many times; k1 = 5 has round(2.5) = 2 (round half to even)
    for name, value in (("_ROW_BLOCK", 37), ("_PAIR_BLOCK", 500), ("_TRIPLES", 3000), ("_CELLS", 20_000)):
        monkeypatch.setattr(rr, name, value)
    t = mixture(300, 24, 20, 0.6, 7)
    s = mixture(100, 24, 6, 0.6, 8)
    check_against_reference(t, s, rhos=(0.01, 0.05), k1=5, k2=3, lam=0.3)
    check_against_reference(t, None, rhos=(0.01,), k1=9, k2=1)


def test_exact_ties_and_duplicates():
    # small-integer features: every distance is exact in float32 and float64, so ties are real;
    # 30 copies of one point leave some rows outside their own top-(k1+1) (an empty V row)
    g = np.random.default_rng(0)
    x = g.integers(0, 3, (300, 4)).astype(np.float32)
    x[:30] = x[0]
    x = x[g.permutation(len(x))]
    t = torch.from_numpy(x)
    idx, dist, _ = rr.knn(t, t, 21, chunk=64, device="cpu")
    assert np.array_equal(idx.numpy(), initial_rank(x)[:, :21])
    check_against_reference(t, None)


def test_knn_exact():
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(130, 32, generator=g), dim=1)
    for q, k, exclude in ((base, 21, False), (base, 21, True), (query, 7, False)):
        idx, d, rmax = rr.knn(q, base, k, chunk=97, device="cpu", exclude_self=exclude)   # 97 ∤ N
        full = torch.cdist(q.double(), base.double()) ** 2
        assert torch.allclose(rmax.double(), full.max(1).values, atol=1e-5)
        if exclude:
            full.fill_diagonal_(float("inf"))
        ref = torch.argsort(full, dim=1, stable=True)[:, :k]
        assert idx.dtype == torch.int64 and idx.shape == (len(q), k)
        assert torch.equal(idx, ref)
        assert torch.allclose(d.double(), full.gather(1, ref), atol=1e-5)
        if exclude:
            assert not (idx == torch.arange(len(q))[:, None]).any()


def test_source_term():
    t = mixture(200, 16, 10, 0.5, 1)
    s = mixture(90, 16, 5, 0.5, 2)
    ref = (1 - np.exp(-sq_dist(t.numpy(), s.numpy()))).min(1)
    got = rr.source_term(t, s, chunk=33, device="cpu")
    assert np.allclose(got, ref / ref.max(), atol=1e-6) and got.max() == 1.0
    assert np.array_equal(rr.source_term(t, None), np.zeros(200))


def test_overlap_against_brute_force(monkeypatch):
    monkeypatch.setattr(rr, "_TRIPLES", 50)
    monkeypatch.setattr(rr, "_CELLS", 300)
    g = np.random.default_rng(5)
    v = sp.random(60, 60, density=0.08, random_state=5, format="csr")
    v.data = g.random(v.nnz) + 0.01
    v = v.tolil()
    v[[3, 17, 40], :] = 0                                       # empty rows
    v = v.tocsr()
    v.eliminate_zeros()
    m = rr._overlap(v)
    dense = v.toarray()
    ref = np.minimum(dense[:, None, :], dense[None, :, :]).sum(2)
    assert np.allclose(m.toarray(), ref)
    coo = m.tocoo()
    off = coo.row != coo.col
    assert (coo.data[off] > 0).all() and (ref[~np.eye(60, dtype=bool)] > 0).sum() == off.sum()
    # an empty row keeps its diagonal, explicitly 0 (its D there is the unstored value, not "no entry")
    assert all(m[i, i] == 0 and m[i].nnz == 1 for i in (3, 17, 40))


@pytest.mark.parametrize("first_pairs", [1 << 20, 2])
def test_eps_fallback_merges_unstored_pairs(caplog, monkeypatch, first_pairs):
    monkeypatch.setattr(rr, "_FALLBACK_PAIRS", first_pairs)      # 2: many rounds of growing the enumeration
    t = mixture(200, 32, 12, 0.5, 3)
    s = mixture(100, 32, 10, 0.6, 103)
    for source, rho in ((None, 0.3), (None, 1.0), (s, 0.1), (s, 0.6)):
        # no source: fewer stored pairs than m; with source: the m-th smallest stored one exceeds the floor
        d = rr.ssg_distance(t, source, device="cpu")
        dense = reference_distance(t.numpy(), None if source is None else source.numpy())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sysu30k"):
            eps = rr.select_eps(d, rho)
        assert "merging in the smallest unstored pairs" in caplog.text
        assert eps == pytest.approx(reference_eps(dense, rho), rel=1e-7)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sysu30k"):
        rr.select_eps(d, 0.01)
    assert "unstored" not in caplog.text


def test_cluster_refuses_eps_at_the_floor():
    t = mixture(200, 32, 12, 0.5, 3)
    d = rr.ssg_distance(t, mixture(100, 32, 10, 0.6, 103), k1=2, k2=1, device="cpu")
    eps = rr.select_eps(d, 1.0)
    assert eps >= d.floor
    with pytest.raises(UserError, match="reaches the Jaccard floor.*lower rho"):
        rr.cluster(d, eps)
    with pytest.raises(UserError, match="lower rho"):
        rr.cluster(d, d.floor)
    below = np.nextafter(d.floor, 0)
    assert np.array_equal(rr.cluster(d, below), reference_labels(d.dense(), below))


@pytest.mark.parametrize("call,match", [
    (lambda t: rr.ssg_distance(t[:20]), "k1 must be"),
    (lambda t: rr.ssg_distance(t, k1=0), "k1 must be"),
    (lambda t: rr.ssg_distance(t, k2=22), "k2 must be"),
    (lambda t: rr.ssg_distance(t, lam=1.0), "lam must be"),
    (lambda t: rr.ssg_distance(t[0]), "2-d"),
    (lambda t: rr.ssg_distance(t[:, :0]), "2-d"),
    (lambda t: rr.ssg_distance(torch.where(t > 0.3, float("nan"), t)), "NaN"),
    (lambda t: rr.ssg_distance(t, t[:, :4]), "source features are 4-d"),
    (lambda t: rr.ssg_distance(t, torch.full_like(t, float("inf"))), "source features contain"),
    (lambda t: rr.ssg_distance(t[:1].repeat(40, 1)), "identical"),
    (lambda t: rr.knn(t, t, 41), "k must be"),
    (lambda t: rr.knn(t, t, 40, exclude_self=True), "k must be"),
    (lambda t: rr.knn(t[:5], t, 3, exclude_self=True), "exclude_self"),
    (lambda t: rr.knn(t, t, 3, chunk=0), "chunk"),
    (lambda t: rr.select_eps(rr.ssg_distance(t), 0.0), "rho must be"),
    (lambda t: rr.select_eps(rr.ssg_distance(t), 1e-5), "raise rho"),
    (lambda t: rr.cluster(rr.ssg_distance(t), 0.0), "eps must be"),
    (lambda t: rr.cluster(rr.ssg_distance(t), 0.1, min_samples=0), "min_samples"),
])
def test_bad_inputs(call, match):
    with pytest.raises(UserError, match=match):
        call(mixture(40, 8, 3, 0.5, 0))


def test_no_dense_matrix_at_20k():
    n = 20_000
    t = mixture(n, 64, n // 16, 0.5, 11)
    tracemalloc.start()
    try:
        d = rr.ssg_distance(t, chunk=2048, device="cpu")
        eps = rr.select_eps(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # numpy/scipy peak (torch's chunk × N blocks are not traced: 2048 × N float32 here) far below one
    # N×N float32 matrix (1.6 GB): an eighth of it
    assert peak < n * n * 4 / 8
    assert d.matrix.nnz < 0.02 * n * n
    labels = rr.cluster(d, eps)
    assert labels.max() > n // 64 and len(labels) == n
