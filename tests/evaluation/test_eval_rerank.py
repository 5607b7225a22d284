"""``sysu30k eval --rerank``: the re-ranked metrics beside the plain ones in metrics.json, equal to the dense
algorithm's; the optional K1,K2,LAMBDA value; one-line refusals where re-ranking cannot run or a value is wrong."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cli as subprocess_cli
from rerank_reference import dense_inputs, re_ranking

from sysu30k.cli import cli
from sysu30k.errors import UserError
from sysu30k.evaluation import score, write_features
from sysu30k.evaluation.config import EvalOptions
from sysu30k.evaluation.rerank import score_distances
from sysu30k.release.constants import DISTRACTOR_PID


@pytest.fixture
def files(tmp_path):
    """Feature files of 25 queries (two true matches each, other cameras) and 400 gallery items, clustered so
    that re-ranking changes rankings."""
    rng = np.random.default_rng(7)
    nq, ng, d = 25, 400, 16
    ids = rng.standard_normal((nq, d))
    qf = ids + 0.9 * rng.standard_normal((nq, d))
    gf = rng.standard_normal((ng, d))
    gf[:2 * nq] = np.repeat(ids, 2, 0) + 0.9 * rng.standard_normal((2 * nq, d))
    gl = np.full(ng, DISTRACTOR_PID)
    gl[:2 * nq] = np.repeat(np.arange(nq), 2)
    qf, gf = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (qf, gf))
    qf, gf = qf.astype(np.float32), gf.astype(np.float32)
    ql, qc, gc = np.arange(nq), np.zeros(nq, np.int64), rng.integers(1, 4, ng)
    write_features(tmp_path / "query.parquet", [f"q{i}" for i in range(nq)], ql, qc, qf)
    write_features(tmp_path / "gallery.parquet", [f"g{i}" for i in range(ng)], gl, gc, gf)
    return tmp_path, (qf, ql, qc, gf, gl, gc)


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=True)


def feature_args(tmp, out="run"):
    return ["--query-features", tmp / "query.parquet", "--gallery-features", tmp / "gallery.parquet",
            "--out", tmp / out]


def dense_summary(qf, ql, qc, gf, gl, gc, k1, k2, lam):
    want = re_ranking(*dense_inputs(qf.astype(np.float64), gf.astype(np.float64)), k1, k2, lam)
    return score_distances(lambda g: want[:, g], ql, qc, gl, gc).summary()


def test_bare_flag_uses_the_papers_defaults_and_matches_the_dense_algorithm(files):
    tmp, data = files
    r = run("eval", *feature_args(tmp), "--rerank")
    assert r.exit_code == 0, r.output
    assert "re-ranked (k1=20, k2=6, lambda=0.3" in r.output
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    qf, ql, qc, gf, gl, gc = data
    plain = score(torch.from_numpy(qf), ql, qc, torch.from_numpy(gf), gl, gc).summary()
    assert m["metrics"] == pytest.approx(plain, abs=1e-12)           # the plain metrics stay where they were
    rr = m["rerank"]
    assert (rr["k1"], rr["k2"], rr["lambda"]) == (20, 6, 0.3)
    assert rr["metrics"] == pytest.approx(dense_summary(*data, 20, 6, 0.3), abs=1e-12)
    assert rr["metrics"] != m["metrics"]                              # re-ranking changed something here
    assert len(rr["cmc"]) == 20 and rr["cmc"][0] == pytest.approx(rr["metrics"]["rank1"])
    assert set(rr["stages_s"]) == {"knn", "v", "jaccard", "score"} and rr["sets"]["pairs"] > 0


def test_explicit_parameters_are_the_ones_used(files):
    tmp, data = files
    r = run("eval", *feature_args(tmp), "--rerank", "8,3,0.5", "--json")
    assert r.exit_code == 0, r.output
    rr = json.loads(r.output)["rerank"]
    assert (rr["k1"], rr["k2"], rr["lambda"]) == (8, 3, 0.5)
    assert rr["metrics"] == pytest.approx(dense_summary(*data, 8, 3, 0.5), abs=1e-12)
    # λ = 1 is the plain ranking: the same metrics as without re-ranking
    r = run("eval", *feature_args(tmp, "run1"), "--rerank", "20,6,1", "--json")
    m = json.loads(r.output)
    assert m["rerank"]["metrics"] == pytest.approx(m["metrics"], abs=1e-12)


def test_without_the_flag_there_is_no_rerank_section(files):
    tmp, _ = files
    r = run("eval", *feature_args(tmp), "--json")
    assert r.exit_code == 0, r.output
    assert "rerank" not in json.loads(r.output)


@pytest.mark.parametrize("value, needle", [
    ("20,6", "K1,K2,LAMBDA"), ("20,6,nan", "LAMBDA in [0, 1]"), ("0,6,0.3", "K1 >= 1"), ("20,6,1.5", "[0, 1]"),
    ("a,b,c", "two integers and a number"), ("20.5,6,0.3", "two integers"), ("20,0,0.3", "K2 >= 1"),
])
def test_bad_values_are_one_line_errors(files, value, needle):
    tmp, _ = files
    r = run("eval", *feature_args(tmp), "--rerank", value)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp / "run").exists()


def test_the_value_is_optional_only_after_dst(files):
    tmp, _ = files
    p = subprocess_cli("eval", "--rerank", tmp / "nodst", *feature_args(tmp), quiet=False, timeout=120)
    assert p.returncode == 2 and "give DST before --rerank" in p.stderr, p.stderr


def test_library_callers_meet_the_same_checks():
    assert EvalOptions(rerank="20, 6, 0.3").rerank == (20, 6, 0.3)
    assert EvalOptions(rerank=[10, 2, 0]).rerank == (10, 2, 0.0)
    for bad in ((20, 6, 2.0), (20, 6), "x", (True, 6, 0.3)):
        with pytest.raises(UserError):
            EvalOptions(rerank=bad)


def test_refused_where_the_features_would_be_streamed(files):
    tmp, _ = files
    r = run("eval", *feature_args(tmp), "--rerank", "--memory-budget", "1000")
    assert isinstance(r.exception, UserError) and "raise --memory-budget" in str(r.exception), r.output
    assert "\n" not in str(r.exception) and not (tmp / "run" / "metrics.json").exists()
    # without --rerank the same budget streams the gallery file and scores it
    assert run("eval", *feature_args(tmp), "--memory-budget", "1000").exit_code == 0


def test_unnormalised_features_are_refused(files):
    tmp, (qf, ql, qc, gf, gl, gc) = files
    write_features(tmp / "gallery.parquet", [f"g{i}" for i in range(len(gl))], gl, gc, 3 * gf)
    r = run("eval", *feature_args(tmp), "--rerank")
    assert isinstance(r.exception, UserError) and "\n" not in str(r.exception), r.output
    assert "normalised" in str(r.exception) or "norm" in str(r.exception)


def test_checkpoint_eval_reranks_the_extracted_features(packed_split, tmp_path):
    from sysu30k.evaluation import read_features
    from sysu30k.evaluation.rerank import rerank_score
    from sysu30k.evaluation.run import by_role, split_roles
    from sysu30k.io.storage import Storage
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=32)
    ckpt = tmp_path / "net_0.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": build_model(cfg).state_dict()}, ckpt)
    args = ("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--height", 64,
            "--width", 32, "--json")
    r = run(*args, "--rerank", "--no-normalize")
    assert isinstance(r.exception, UserError) and "drop --no-normalize" in str(r.exception)
    r = run(*args, "--rerank", "5,2,0.3")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    q, g = by_role(read_features(tmp_path / "eval-test" / m["features"]), split_roles(Storage(str(packed_split)),
                                                                                      "test"))
    assert len(q) == m["metrics"]["queries"] and len(g) == m["metrics"]["gallery"]
    want, _ = rerank_score(q.feats, q.pids, q.camids, g.feats, g.pids, g.camids, 5, 2, 0.3)
    assert m["rerank"]["metrics"] == pytest.approx(want.summary(), abs=1e-12)
