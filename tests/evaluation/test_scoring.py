"""Exactness of sysu30k.evaluation.scoring against a straightforward port of the official evaluator.

The reference below follows SYSU30K.md §2.1 steps 5-8 (Using_SYSU30k_Test_Set/test_sysu_combine.py)
line by line: a full descending sort of the gallery, np.in1d junk removal, the trapezoidal AP, and the
average over ALL queries. Two documented choices are applied to it as to the code under test:
* the tie rule: the sort is a stable sort on (-score, is_true_match, gallery index) instead of the
  script's tie-agnostic ``np.argsort(score)[::-1]``;
* a query labelled -1000 has no true match (distractors never match) and no junk but label -1.
Features are on a dyadic grid so float32 dot products are exact whatever the summation order: the
reference's float64 scores and the chunked float32 products agree bit for bit, ties included.
"""

import numpy as np
import pytest
import torch

from sysu30k.evaluation import scoring
from sysu30k.evaluation.scoring import ap_from_ranks, score
from sysu30k.release.constants import DISTRACTOR_PID

# ----------------------------------------------------------------------------- the reference

in1d = getattr(np, "in1d", np.isin)     # np.in1d (the script's call) is np.isin for 1-d arrays; gone in NumPy 2.4


def ref_compute_mAP(index, good_index, junk_index):
    ap = 0
    cmc = np.zeros(len(index), np.int64)
    if good_index.size == 0:
        cmc[0] = -1
        return ap, cmc, -1, np.zeros(0)
    mask = in1d(index, junk_index, invert=True)
    index = index[mask]
    ngood = len(good_index)
    mask = in1d(index, good_index)
    rows_good = np.argwhere(mask == True).flatten()   # noqa: E712 (as the script)
    cmc[rows_good[0]:] = 1
    for i in range(ngood):
        d_recall = 1.0 / ngood
        precision = (i + 1) * 1.0 / (rows_good[i] + 1)
        if rows_good[i] != 0:
            old_precision = i * 1.0 / rows_good[i]
        else:
            old_precision = 1.0
        ap = ap + d_recall * (old_precision + precision) / 2
    return ap, cmc, rows_good[0], rows_good


def ref_evaluate(qf, ql, qc, gf, gl, gc):
    score_ = gf.astype(np.float64) @ qf.astype(np.float64)
    query_index = np.argwhere(gl == ql).flatten()
    camera_index = np.argwhere(gc == qc).flatten()
    good_index = np.setdiff1d(query_index, camera_index, assume_unique=True)
    junk_index1 = np.argwhere(gl == -1).flatten()
    junk_index2 = np.intersect1d(query_index, camera_index)
    junk_index = np.append(junk_index2, junk_index1)
    if ql == DISTRACTOR_PID:                       # documented: distractors never match
        good_index, junk_index = np.zeros(0, np.int64), junk_index1
    good_index = np.setdiff1d(good_index, junk_index)
    is_good = np.isin(np.arange(len(gl)), good_index)
    index = np.lexsort((np.arange(len(gl)), is_good, -score_))   # the tie rule (pessimistic)
    return ref_compute_mAP(index, good_index, junk_index)


def ref_all(qf, ql, qc, gf, gl, gc):
    CMC = np.zeros(len(gl))
    ap = 0.0
    aps, firsts, std = [], [], []
    for i in range(len(ql)):
        ap_tmp, CMC_tmp, first, rows_good = ref_evaluate(qf[i], ql[i], qc[i], gf, gl, gc)
        aps.append(ap_tmp)
        firsts.append(first)
        std.append(float(np.mean((np.arange(len(rows_good)) + 1) / (rows_good + 1))) if len(rows_good) else 0.0)
        if CMC_tmp[0] == -1:
            continue
        CMC = CMC + CMC_tmp
        ap += ap_tmp
    CMC = CMC / len(ql)
    return CMC, ap / len(ql), np.array(aps), np.array(firsts), np.array(std)


def check(qf, ql, qc, gf, gl, gc, chunk=7, **kw):
    s = score(torch.from_numpy(qf.astype(np.float32)), ql, qc, torch.from_numpy(gf.astype(np.float32)), gl, gc,
              chunk=chunk, **kw)
    CMC, mAP, aps, firsts, std = ref_all(qf, ql, qc, gf, gl, gc)
    k = min(20, len(gl))
    np.testing.assert_allclose(s.cmc[:k], CMC[:k], rtol=0, atol=1e-9)
    for r in (1, 5, 10, 20):
        if r <= len(gl):
            assert abs(s.summary()[f"rank{r}"] - CMC[r - 1]) < 1e-9
    assert abs(s.map_official - mAP) < 1e-9
    np.testing.assert_array_equal(s.first_rank, firsts)
    np.testing.assert_allclose(s.ap_official, aps, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s.ap_standard, std, rtol=0, atol=1e-9)
    assert abs(s.map_standard - std.sum() / len(ql)) < 1e-9
    pq = s.per_query
    assert pq.num_rows == len(ql)
    np.testing.assert_array_equal(pq["first_match_rank"].to_numpy(), firsts)
    np.testing.assert_allclose(pq["ap_official"].to_numpy(), aps, atol=1e-6)
    # the top list follows the same ranking: its first true match sits at first_match_rank
    for f, good in zip(firsts, pq["top_good"].to_pylist()):
        if 0 <= f < len(good):
            assert good.index(True) == f
        else:
            assert True not in good
    return s


def grid(rng, n, d, scale=1024):
    """Random unit-ish vectors on a 1/scale grid: float32 dot products are exact."""
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.round(x * scale) / scale


def random_case(seed, nq=37, ng=300, d=32, ids=25, cams=3, scale=1024):
    rng = np.random.default_rng(seed)
    gl = rng.integers(0, ids, ng)
    gl[rng.random(ng) < 0.3] = DISTRACTOR_PID
    gl[rng.random(ng) < 0.02] = -1
    gc = rng.integers(1, cams + 1, ng)
    ql = rng.integers(0, ids + 5, nq)            # some ids absent from the gallery: no true match
    qc = rng.integers(1, cams + 1, nq)
    gf, qf = grid(rng, ng, d, scale), grid(rng, nq, d, scale)
    # make matches findable: true matches near their query
    for i in range(nq):
        same = np.flatnonzero(gl == ql[i])
        gf[same] = np.round((gf[same] + 2 * qf[i]) / 3 * scale) / scale
    return qf, ql, qc, gf, gl, gc


# ----------------------------------------------------------------------------- random inputs

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_random_matches_reference(seed, chunk):
    check(*random_case(seed), chunk=chunk)


@pytest.mark.parametrize("direct", [0, 100])
def test_both_counting_paths(monkeypatch, direct):
    monkeypatch.setattr(scoring, "DIRECT_MAX_GOOD", direct)
    for seed in range(3):
        check(*random_case(seed, ids=8), chunk=5)     # several true matches per query


def test_coarse_grid_exact_ties():
    """Scores on a coarse grid: many exact ties between true matches, junk and negatives."""
    for seed in range(6):
        qf, ql, qc, gf, gl, gc = random_case(100 + seed, nq=23, ng=200, d=4, ids=6, cams=2, scale=2)
        check(qf, ql, qc, gf, gl, gc, chunk=4)


# ----------------------------------------------------------------------------- adversarial inputs

def test_adversarial():
    d = 8
    e = np.eye(d)
    q = np.array([e[0], e[1], e[2], e[3], e[4], e[0]])
    ql = np.array([1, 2, 3, 4, DISTRACTOR_PID, 5])
    qc = np.array([2, 2, 2, 2, 2, 2])
    g, gl, gc = [], [], []

    def add(vec, pid, cam):
        g.append(vec)
        gl.append(pid)
        gc.append(cam)

    # query 0 (pid 1): junk (same pid, same cam) ranked first, then the true match
    add(e[0], 1, 2)
    add(e[0], 1, 2)
    add(0.5 * e[0], 1, 1)
    # query 1 (pid 2): several true matches spread over the ranking, distractors scoring highest
    add(e[1], DISTRACTOR_PID, 1)
    add(e[1], DISTRACTOR_PID, 1)
    add(0.75 * e[1], 2, 1)
    add(0.5 * e[1], DISTRACTOR_PID, 1)
    add(0.5 * e[1], 2, 3)                # tied with the distractor above: ranks below it
    add(0.25 * e[1], 2, 1)
    add(0.5 * e[1], 2, 1)                # tied with the true match at 0.5, later in gallery order
    # query 2 (pid 3): no true match at all (only junk)
    add(e[2], 3, 2)
    # query 3 (pid 4): absent from the gallery
    # query 4 (pid -1000): a distractor as query never matches
    add(e[4], DISTRACTOR_PID, 1)
    # query 5 (pid 5): true match tied with everything that is orthogonal (score 0), and a -1 junk on top
    add(0.0 * e[0], 5, 1)
    add(e[0], -1, 1)
    g, gl, gc = np.array(g), np.array(gl), np.array(gc)
    for chunk in (1, 4, 64):
        s = check(q, ql, qc, g, gl, gc, chunk=chunk)
    assert s.first_rank[0] == 0 and s.ap_official[0] == 1.0
    assert s.first_rank[2] == -1 and s.first_rank[3] == -1 and s.first_rank[4] == -1
    assert s.n_good[1] == 4
    # query 5: its match has score 0 and every other valid gallery item scores >= 0: ranked last
    # every negative ties or beats it; only itself and the -1 junk excluded
    assert s.first_rank[5] == len(gl) - 2


def test_distractor_query_and_junk_label():
    g = np.array([[1.0, 0], [1.0, 0], [0, 1.0]])
    gl = np.array([DISTRACTOR_PID, -1, 7])
    gc = np.array([1, 1, 1])
    q = np.array([[1.0, 0], [1.0, 0]])
    s = check(q, np.array([DISTRACTOR_PID, 7]), np.array([2, 2]), g, gl, gc, chunk=1)
    assert s.n_good.tolist() == [0, 1]
    assert s.first_rank.tolist() == [-1, 1]          # the -1 item is junk, the distractor ranks above
    assert s.cmc[0] == 0.0 and s.cmc[1] == 0.5        # averaged over ALL queries


def test_degenerate_all_equal_scores_rank_last():
    rng = np.random.default_rng(0)
    g = np.ones((50, 4)) / 2
    gl = rng.integers(0, 5, 50)
    gc = np.ones(50, int)
    ql = np.arange(5)
    s = check(np.ones((5, 4)) / 2, ql, np.full(5, 2), g, gl, gc, chunk=2)
    assert s.cmc[0] == 0.0 or (gl == gl[0]).all()


# ----------------------------------------------------------------------------- formulas and API

@pytest.mark.parametrize("r", [0, 1, 2, 9, 100])
def test_single_ground_truth_ap(r):
    off, std = ap_from_ranks(np.array([r]))
    assert off == pytest.approx(1.0 if r == 0 else 1 / (2 * (r + 1)), abs=1e-12)
    assert std == pytest.approx(1 / (r + 1), abs=1e-12)
    # and through score(): one true match below r negatives
    g = np.array([[1.0, 0, 0, 0]] * r + [[0.5, 0, 0, 0]])
    s = score(torch.tensor([[1.0, 0, 0, 0]]), [3], [2], torch.tensor(g, dtype=torch.float32),
              [DISTRACTOR_PID] * r + [3], [1] * (r + 1), chunk=1)
    assert s.first_rank[0] == r
    assert s.map_official == pytest.approx(1.0 if r == 0 else 1 / (2 * (r + 1)), abs=1e-12)
    assert s.map_standard == pytest.approx(1 / (r + 1), abs=1e-12)


def test_summary_and_per_query_schema():
    from sysu30k import manifests

    qf, ql, qc, gf, gl, gc = random_case(3)
    s = score(torch.tensor(qf, dtype=torch.float32), ql, qc, torch.tensor(gf, dtype=torch.float32), gl, gc,
              query_keys=[f"q{i}" for i in range(len(ql))], gallery_keys=[f"g{i}" for i in range(len(gl))])
    assert set(s.summary()) == {"rank1", "rank5", "rank10", "rank20", "mAP_official", "mAP_standard", "queries",
                                "gallery"}
    assert s.summary()["queries"] == len(ql) and s.summary()["gallery"] == len(gl)
    assert s.per_query.schema.equals(manifests.schema("per_query"), check_metadata=False)
    assert s.per_query["key"][0].as_py() == "q0"
    tops = s.per_query["top_keys"].to_pylist()
    assert all(len(t) == 10 and all(k.startswith("g") for k in t) for t in tops)
    scores = s.per_query["top_scores"].to_pylist()
    assert all(a >= b for row in scores for a, b in zip(row, row[1:]))


def test_bad_inputs():
    from sysu30k.errors import UserError

    with pytest.raises(UserError, match="-d"):
        score(torch.zeros(2, 3), [1, 2], [1, 1], torch.zeros(4, 5), [1] * 4, [2] * 4)
    with pytest.raises(UserError, match="entries"):
        score(torch.zeros(2, 3), [1], [1, 1], torch.zeros(4, 3), [1] * 4, [2] * 4)


def test_finiteness_from_sums_is_the_element_check():
    """The non-finite checks decide from sums first: NaN, inf, inf - inf and finite values whose sum overflows
    give the element-wise answer; huge finite features are not called non-finite, their scores overflow."""
    from sysu30k.errors import UserError
    from sysu30k.evaluation.scoring import _all_finite

    rng = np.random.default_rng(7)
    t = torch.from_numpy(rng.standard_normal((40, 30)).astype(np.float32))
    t[3, 4], t[7, 0], t[11] = float("nan"), float("inf"), 3e38           # row 11: finite, its sum overflows
    t[20, :2] = torch.tensor([float("inf"), -float("inf")])
    t[:, 25] = 3e38                                                       # a column whose sum overflows
    for dim in (None, 0, 1):
        want = torch.isfinite(t).all() if dim is None else torch.isfinite(t).all(dim)
        assert torch.equal(_all_finite(t, dim), want), dim
    assert bool(_all_finite(torch.full((4, 4), 3e38)))
    q = torch.nn.functional.normalize(torch.ones(2, 8), dim=1)
    g = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    g[17] = 3e38                                                          # finite, but q . g[17] is not
    with pytest.raises(UserError, match="the scores of gallery item 17 overflow"):
        score(q, [1, 2], [1, 1], g, [1, 2] + [-1000] * 28, [2] * 30, chunk=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("direct", [0, 100])
def test_gpu_matches_reference(monkeypatch, direct):
    monkeypatch.setattr(scoring, "DIRECT_MAX_GOOD", direct)
    for seed in range(3):
        check(*random_case(seed, ids=8), chunk=5, device="cuda")
    check(*random_case(100, nq=23, ng=200, d=4, ids=6, cams=2, scale=2), chunk=4, device="cuda")


def test_auto_chunk_fits_budget():
    """A CPU block holds about the budget (16 bytes per query and item), in multiples of 256 items, never more
    items than the gallery has; the full SYSU-30k test set gets 4,096-item blocks (a 16 MB score block)."""
    from sysu30k.evaluation.scoring import BLOCK_BYTES, auto_chunk

    full = auto_chunk(1000, 479_730, "cpu")
    assert full == 4096 and full * 1000 * 16 <= BLOCK_BYTES
    assert auto_chunk(50, 300, "cpu") == 300
    assert auto_chunk(100_000, 479_730, "cpu") == 256
    assert auto_chunk(1000, 479_730, "cpu", budget_bytes=1 << 30) % 256 == 0
    assert abs(auto_chunk(1000, 479_730, "cuda") - 4 * full) <= 256


# ----------------------------------------------------------------------------- streaming blocks

def _stream(case, blocks, rng, device="cpu"):
    """Score ``case`` through a Scorer: the matched items first, then the rest in ``blocks`` random pieces in a
    random order."""
    from sysu30k.evaluation.scoring import Scorer

    qf, ql, qc, gf, gl, gc = case
    s = Scorer(torch.from_numpy(qf.astype(np.float32)), ql, qc, gl, gc, device=device)
    s.add_matches(s.matched, torch.from_numpy(gf[s.matched].astype(np.float32)))
    rest = rng.permutation(np.setdiff1d(np.arange(len(gl)), s.matched))
    for part in np.array_split(rest, blocks):
        s.add(part, torch.from_numpy(gf[part].astype(np.float32)))
    return s


@pytest.mark.parametrize("seed", range(4))
def test_streamed_blocks_in_any_order_match_the_reference(seed):
    """Gallery blocks of any size in any order give the reference's numbers and top lists."""
    rng = np.random.default_rng(seed)
    case = random_case(seed, ids=8 if seed % 2 else 25)
    want = check(*case, chunk=300)
    for blocks in (1, 5, 97):
        got = _stream(case, blocks, rng).result()
        np.testing.assert_array_equal(got.first_rank, want.first_rank)
        np.testing.assert_array_equal(got.ap_official, want.ap_official)
        assert got.per_query["top_keys"].to_pylist() == want.per_query["top_keys"].to_pylist()


def test_streaming_refuses_missing_duplicate_and_early_blocks():
    """An item never added, an item added twice, or a block before the matches: refused, never scored."""
    from sysu30k.errors import UserError
    from sysu30k.evaluation.scoring import Scorer

    qf, ql, qc, gf, gl, gc = random_case(3)
    g = torch.from_numpy(gf.astype(np.float32))
    s = Scorer(torch.from_numpy(qf.astype(np.float32)), ql, qc, gl, gc)
    rest = np.setdiff1d(np.arange(len(gl)), s.matched)
    with pytest.raises(ValueError, match="must come before"):
        s.add(rest[:3], g[rest[:3]])
    with pytest.raises(ValueError, match="exactly the gallery items"):
        s.add_matches(s.matched[1:], g[s.matched[1:]])
    s.add_matches(s.matched, g[s.matched])
    s.add(rest[:-1], g[rest[:-1]])
    with pytest.raises(UserError, match="1 of 300 gallery item.*never scored"):
        s.result()
    s.add(rest[-2:], g[rest[-2:]])
    with pytest.raises(ValueError, match="scored twice"):
        s.result()
    with pytest.raises(UserError, match="not finite"):
        s.add(rest[:1], torch.full((1, g.shape[1]), float("nan")))
