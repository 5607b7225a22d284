"""``sysu30k eval``: feature files in, run folder out (metrics.json, per-query Parquet, PNGs), --compare,
user errors; plus a checkpoint end to end on the tiny packed tree (features through the loader, cache)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, pack_synth
from conftest import cli as subprocess_cli
from PIL import Image

from sysu30k import manifests
from sysu30k.cli import cli
from sysu30k.evaluation import read_features, score, write_features
from sysu30k.release.constants import DISTRACTOR_PID


def make_features(rng, nq=12, ng=80, d=16):
    ql = np.arange(100, 100 + nq)
    gl = np.full(ng, DISTRACTOR_PID)
    gl[:nq] = ql                                       # one true match each, as SYSU-30k
    gl[nq:nq + 3] = ql[:3]                              # and a few extra for the first queries
    qf = rng.standard_normal((nq, d))
    gf = rng.standard_normal((ng, d))
    gf[:nq] = qf + 0.8 * rng.standard_normal((nq, d))
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    return (qf.astype(np.float32), ql, np.full(nq, 2), gf.astype(np.float32), gl, np.full(ng, 1))


@pytest.fixture
def feats(tmp_path):
    rng = np.random.default_rng(0)
    qf, ql, qc, gf, gl, gc = make_features(rng)
    qkeys = [f"q{i:03d}" for i in range(len(ql))]
    gkeys = [f"g{i:03d}" for i in range(len(gl))]
    write_features(tmp_path / "query.parquet", qkeys, ql, qc, qf)
    write_features(tmp_path / "gallery.parquet", gkeys, gl, gc, gf)
    return tmp_path, (qf, ql, qc, gf, gl, gc, qkeys, gkeys)


def run(*args):
    r = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=True)
    return r


def cli_main(*args, cwd=None):
    """The real entry point, not quieted (user errors: one line, exit 2)."""
    return subprocess_cli(*args, quiet=False, cwd=cwd, timeout=120)


def assert_png(path: Path, min_w=200, min_h=150):
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h
        assert len(np.unique(np.asarray(im.convert("L")))) > 5      # not a blank canvas


def test_roundtrip_feature_file(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.standard_normal((7, 5)).astype(np.float32)
    write_features(tmp_path / "f.parquet", list("abcdefg"), np.arange(7), np.ones(7), f)
    t = pq.read_table(tmp_path / "f.parquet")
    assert t.schema.equals(manifests.schema("features"), check_metadata=False)
    fs = read_features(tmp_path / "f.parquet")
    assert fs.keys == list("abcdefg") and fs.pids.tolist() == list(range(7)) and fs.camids.tolist() == [1] * 7
    np.testing.assert_array_equal(fs.feats.numpy(), f)
    write_features(tmp_path / "k.parquet", list("abc"), None, None, f[:3])
    fs = read_features(tmp_path / "k.parquet")
    assert fs.pids is None and fs.camids is None


def test_eval_feature_files(feats):
    tmp, (qf, ql, qc, gf, gl, gc, qkeys, gkeys) = feats
    out = tmp / "run"
    r = run("eval", tmp / "nodst", "--query-features", tmp / "query.parquet", "--gallery-features",
            tmp / "gallery.parquet", "--out", out, "--chunk", 5)
    assert r.exit_code == 0, r.output
    assert "Rank-1" in r.output and "mAP (official, trapezoidal)" in r.output and "mAP (standard)" in r.output
    m = json.loads((out / "metrics.json").read_text())
    want = score(torch.from_numpy(qf), ql, qc, torch.from_numpy(gf), gl, gc).summary()
    for k, v in want.items():
        assert m["metrics"][k] == pytest.approx(v, abs=1e-12), k
    assert len(m["cmc"]) == 20 and m["metrics"]["queries"] == 12 and m["metrics"]["gallery"] == 80
    assert "trapezoidal" in m["definitions"]["mAP_official"] and m["definitions"]["tie_rule"]
    pqt = pq.read_table(out / "per_query.parquet")
    assert pqt.schema.equals(manifests.schema("per_query"), check_metadata=False)
    assert pqt["key"].to_pylist() == qkeys
    assert all(len(t) == 10 and set(t) <= set(gkeys) for t in pqt["top_keys"].to_pylist())
    assert_png(out / "cmc.png")
    assert_png(out / "ranked.png", min_w=500, min_h=100)
    # --json prints the same metrics
    r = run("eval", "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "gallery.parquet",
            "--out", tmp / "run2", "--json", "--show", "q003", "--show", "q001")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["metrics"] == m["metrics"]


def test_keys_only_file_joined_with_split_manifest(feats):
    tmp, (qf, ql, qc, gf, gl, gc, qkeys, gkeys) = feats
    dst = tmp / "dst"
    (dst / "manifests").mkdir(parents=True)
    rows = ([("test", "query", k, int(p), 2, False, None, f"query/{k}.jpg") for k, p in zip(qkeys, ql)]
            + [("test", "gallery", k, int(p), 1, bool(p == DISTRACTOR_PID), None, f"gallery/{k}.jpg")
               for k, p in zip(gkeys, gl)]
            + [("val", "query", "q000", 5, 2, False, 5, "x.jpg")])        # another split's row: ignored
    cols = list(zip(*rows))
    schema = manifests.schema("split")
    pq.write_table(pa.table([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema),
                   dst / manifests.relpath("split"))
    write_features(tmp / "gkeys.parquet", gkeys, None, None, gf)          # gallery: keys only
    out = tmp / "joined"
    r = run("eval", dst, "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "gkeys.parquet",
            "--out", out)
    assert r.exit_code == 0, r.output
    want = score(torch.from_numpy(qf), ql, qc, torch.from_numpy(gf), gl, gc).summary()
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    assert got == pytest.approx(want, abs=1e-12)
    # a key the split does not know is a user error
    write_features(tmp / "bad.parquet", gkeys[:-1] + ["nope"], None, None, gf)
    p = cli_main("eval", dst, "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "bad.parquet",
                 "--out", tmp / "bad")
    assert p.returncode == 2 and "nope" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_compare(feats, tmp_path):
    tmp, (qf, ql, qc, gf, gl, gc, qkeys, gkeys) = feats
    a, b = tmp / "a", tmp / "b"
    assert run("eval", "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "gallery.parquet",
               "--out", a).exit_code == 0
    rng = np.random.default_rng(5)
    write_features(tmp / "g2.parquet", gkeys, gl, gc, rng.standard_normal(gf.shape).astype(np.float32))
    assert run("eval", "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "g2.parquet",
               "--out", b).exit_code == 0
    before = sorted(p.name for p in tmp.rglob("*"))
    r = run("eval", "--compare", a, b)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "B-A" in lines[0] and any(line.startswith("Rank-1") for line in lines)
    ma = json.loads((a / "metrics.json").read_text())["metrics"]
    mb = json.loads((b / "metrics.json").read_text())["metrics"]
    rank1 = next(line for line in lines if line.startswith("Rank-1")).split()
    assert rank1[1:] == [f"{100 * ma['rank1']:.2f}", f"{100 * mb['rank1']:.2f}",
                         f"{100 * (mb['rank1'] - ma['rank1']):+.2f}"]
    assert sorted(p.name for p in tmp.rglob("*")) == before           # writes nothing


def test_user_errors(feats, monkeypatch):
    tmp, (qf, ql, qc, gf, gl, gc, qkeys, gkeys) = feats
    cases = [
        (["eval", "--query-features", tmp / "missing.parquet", "--gallery-features", tmp / "gallery.parquet"],
         "no feature file"),
        (["eval", "--compare", tmp / "nowhere", tmp], "metrics.json"),
        (["eval", "--query-features", tmp / "query.parquet"], "go together"),
        (["eval"], "nothing to evaluate"),
    ]
    write_features(tmp / "g8.parquet", gkeys, gl, gc, gf[:, :8])
    cases.append((["eval", "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "g8.parquet",
                   "--out", tmp / "x"], "16-d"))
    write_features(tmp / "qk.parquet", qkeys, None, None, qf)
    cases.append((["eval", "--query-features", tmp / "qk.parquet", "--gallery-features", tmp / "gallery.parquet",
                   "--out", tmp / "y"], "pid/camid"))
    (tmp / "junk.parquet").write_bytes(b"not parquet")
    cases.append((["eval", "--query-features", tmp / "junk.parquet", "--gallery-features", tmp / "gallery.parquet",
                   "--out", tmp / "z"], "not a Parquet"))
    from sysu30k.errors import UserError

    monkeypatch.chdir(tmp)
    for args, needle in cases:                     # in process: each raises a one-line UserError
        r = run(*args)
        assert isinstance(r.exception, UserError), (args, r.output, r.exception)
        msg = str(r.exception)
        assert "\n" not in msg and needle in msg, (args, msg)
    # and through the real entry point: one line on stderr, exit status 2
    p = cli_main(*cases[-3][0], cwd=tmp)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "16-d" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- checkpoint end to end

def test_checkpoint_end_to_end(packed_split, tmp_path):
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=32)
    model = build_model(cfg)
    ckpt = tmp_path / "run" / "net_0.pth"
    ckpt.parent.mkdir()
    torch.save({"config": {"model": cfg.to_dict()}, "model": model.state_dict()}, ckpt)
    small = ("--height", 64, "--width", 32)
    r = run("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--batch", 16, "--device", "cpu", *small)
    assert r.exit_code == 0, r.output
    out = tmp_path / "run" / "eval-test"
    cache = list(out.glob("features-test-*.parquet"))
    assert len(cache) == 1 and len(cache[0].name) == len("features-test-") + 12 + len(".parquet")
    fs = read_features(cache[0])
    assert fs.feats.shape[1] == 32
    np.testing.assert_allclose(fs.feats.norm(dim=1).numpy(), 1.0, atol=1e-5)      # L2-normalised
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["queries"] == 5 and m["metrics"]["gallery"] == 5 + 12
    assert_png(out / "ranked.png", min_w=500, min_h=100)
    # thumbnails came from the shards: the ranked list has colour beyond frames and grey placeholders
    with Image.open(out / "ranked.png") as im:
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 200
    # second run: the cache is used (same metrics, the file untouched)
    mtime = cache[0].stat().st_mtime_ns
    r = run("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--json", *small)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["metrics"] == m["metrics"] and cache[0].stat().st_mtime_ns == mtime
    # other extraction settings: extracted again, into a cache of their own (keyed by everything that decides them)
    r = run("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--no-flip", *small)
    assert r.exit_code == 0, r.output
    assert cache[0].stat().st_mtime_ns == mtime
    (other,) = set(out.glob("features-test-*.parquet")) - set(cache)
    assert json.loads(pq.read_schema(other).metadata[b"settings"])["flip"] is False


def test_the_feature_cache_is_never_another_datasets(packed_split, tiny_tree, tmp_path):
    """The same checkpoint, run folder and split name on a second dataset whose test images have the same keys
    (another seed of the same synthetic shape): its own features and numbers, not the first one's."""
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model
    from sysu30k.split.build import build_splits

    other = pack_synth(tmp_path / "raw2", tmp_path / "dst2", 7, **{**TINY, "seed": TINY["seed"] + 1})
    build_splits(str(other), scheduler="sync")
    assert pq.read_table(other / "manifests/split.parquet")["key"] == pq.read_table(
        packed_split / "manifests/split.parquet")["key"]                      # the keys alone cannot tell them apart
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=32)
    ckpt = tmp_path / "net.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": build_model(cfg).state_dict()}, ckpt)
    args = ("--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--json", "--height", 64, "--width", 32)
    first = run("eval", packed_split, *args, "--out", tmp_path / "shared")
    second = run("eval", other, *args, "--out", tmp_path / "shared")
    fresh = run("eval", other, *args, "--out", tmp_path / "fresh")
    assert first.exit_code == second.exit_code == fresh.exit_code == 0, second.output
    per_query = [pq.read_table(tmp_path / d / "per_query.parquet") for d in ("shared", "fresh")]
    assert json.loads(second.output)["metrics"] == json.loads(fresh.output)["metrics"]
    assert per_query[0].equals(per_query[1])
    assert json.loads(first.output)["metrics"] != json.loads(second.output)["metrics"]
    assert len(list((tmp_path / "shared").glob("features-test-*.parquet"))) == 2


def test_evaluate_split_is_the_trainers_validation(packed_split, tmp_path):
    from sysu30k.evaluation.run import evaluate_split
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(1)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=16)
    model = build_model(cfg).eval()
    assert evaluate_split(model, str(packed_split), "val", torch.device("cpu")) is None     # no val split made
    got = evaluate_split(model, str(packed_split), "test", torch.device("cpu"), 64, 32, batch=16, workers=0)
    ckpt = tmp_path / "net.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": model.state_dict()}, ckpt)
    r = run("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--json",
            "--height", 64, "--width", 32)
    assert r.exit_code == 0, r.output
    assert got == pytest.approx(json.loads(r.output)["metrics"]) and got["queries"] == 5


def test_feature_files_that_would_give_a_wrong_number_are_refused(feats):
    """NaN or inf rows (every comparison with NaN is false, so they ranked first: rank-1 = mAP = 1), duplicate,
    integer or missing keys: refused with one line naming the problem, nothing scored."""
    import pyarrow as pa

    tmp, (qf, ql, qc, gf, gl, gc, qkeys, gkeys) = feats
    bad_q = qf.copy()
    bad_q[3, 0] = np.nan
    write_features(tmp / "nan.parquet", qkeys, ql, qc, bad_q)
    bad_g = gf.copy()
    bad_g[[5, 9]] = np.inf
    write_features(tmp / "inf.parquet", gkeys, gl, gc, bad_g)
    write_features(tmp / "dup.parquet", qkeys[:-1] + qkeys[:1], ql, qc, qf)
    table = pq.read_table(tmp / "query.parquet")
    pq.write_table(table.set_column(0, "key", pa.array(range(len(qkeys)), pa.int64())), tmp / "intkeys.parquet")
    pq.write_table(table.set_column(0, "key", pa.array([None] + qkeys[1:], pa.string())), tmp / "nullkeys.parquet")
    cases = [("nan.parquet", "gallery.parquet", f"1 of {len(qkeys)} query features are not finite (NaN or inf), "
              f"e.g. key {qkeys[3]}"),
             ("query.parquet", "inf.parquet", f"2 of {len(gkeys)} gallery features are not finite"),
             ("dup.parquet", "gallery.parquet", f"1 duplicate key(s), e.g. {qkeys[0]}"),
             ("intkeys.parquet", "gallery.parquet", "must hold strings"),
             ("nullkeys.parquet", "gallery.parquet", "1 row(s) have no key")]
    for q, g, needle in cases:
        p = cli_main("eval", "--query-features", tmp / q, "--gallery-features", tmp / g, "--out", tmp / f"out-{q}")
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
        assert not (tmp / f"out-{q}" / "metrics.json").exists()


def test_keys_only_files_must_cover_their_role_of_the_split_exactly(packed_split, tmp_path):
    split = pq.read_table(packed_split / "manifests/split.parquet").to_pylist()
    q = [r["key"] for r in split if r["role"] == "query"]
    g = [r["key"] for r in split if r["role"] == "gallery"]
    rng = np.random.default_rng(0)
    for name, keys in (("q", q), ("q-part", q[:-1]), ("g", g), ("g-as-q", g[:len(q)])):
        f = rng.standard_normal((len(keys), 8)).astype(np.float32)
        write_features(tmp_path / f"{name}.parquet", keys, None, None, f / np.linalg.norm(f, axis=1, keepdims=True))
    ok = run("eval", packed_split, "--query-features", tmp_path / "q.parquet", "--gallery-features",
             tmp_path / "g.parquet", "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    for query, needle in (("q-part", f"{len(q) - 1} of the {len(q)} query images"), ("g-as-q", "not query images")):
        r = run("eval", packed_split, "--query-features", tmp_path / f"{query}.parquet", "--gallery-features",
                tmp_path / "g.parquet", "--out", tmp_path / query)
        assert r.exit_code != 0 and needle in str(r.exception), (query, r.exception)
