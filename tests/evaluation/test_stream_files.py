"""Feature files too large for ``--memory-budget``: the gallery file is scored a batch of rows at a time, with
the numbers (exactly) and the refusals (word for word) of the in-memory path; and the pieces that let torchrun
ranks save one feature file: the loader's order and the merge of the ranks' parts."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import cli as subprocess_cli

from sysu30k import manifests
from sysu30k.cli import cli
from sysu30k.errors import UserError
from sysu30k.evaluation import read_features, run, score
from sysu30k.evaluation.features import FeatureFile, FeatureWriter, merge_features, write_features
from sysu30k.io.storage import Storage
from sysu30k.release.constants import DISTRACTOR_PID

NQ, NG, D = 15, 230, 16
GROUPS = (40, 3, 60, 1, 57, 69)              # gallery rows per row group (one FeatureWriter.write each)


def case(seed=0):
    """Queries and a gallery with several true matches per query, junk (same camera), distractors, and exact
    ties (copied rows); unit vectors, not on a grid: the float32 products must come out alike by themselves."""
    rng = np.random.default_rng(seed)
    ql = np.arange(100, 100 + NQ)
    qc = rng.integers(1, 4, NQ)
    gl = np.full(NG, DISTRACTOR_PID)
    gl[rng.choice(NG, 3 * NQ, replace=False)] = np.repeat(ql, 3)
    gc = rng.integers(1, 4, NG)
    qf = rng.standard_normal((NQ, D))
    gf = rng.standard_normal((NG, D))
    for i in range(NQ):
        same = np.flatnonzero(gl == ql[i])
        gf[same] = qf[i] + 1.2 * rng.standard_normal((len(same), D))
    gf[[5, 77, 150]] = gf[[200, 12, 151]]             # ties, between distractors and across blocks
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    qkeys = [f"q{i:03d}" for i in range(NQ)]
    gkeys = [f"g{i:03d}" for i in range(NG)]
    return qkeys, ql, qc, qf.astype(np.float32), gkeys, gl, gc, gf.astype(np.float32)


def write_groups(path, keys, pids, camids, feats, groups=GROUPS):
    """A feature file with one row group per entry of ``groups``, as ``eval --save-features`` writes them."""
    with FeatureWriter(path) as w:
        a = 0
        for n in groups:
            w.write(keys[a:a + n], None if pids is None else pids[a:a + n], None if camids is None else camids[a:a + n],
                    feats[a:a + n])
            a += n
    assert a == len(keys) and pq.ParquetFile(path).num_row_groups == len(groups)


def write_raw(path, keys, pids, camids, vectors, groups=GROUPS):
    """Like :func:`write_groups` with no checks: vectors may be None or of any length, keys None or repeated."""
    schema = pa.schema([("key", pa.string()), ("pid", pa.int32()), ("camid", pa.int8()),
                        ("feature", pa.list_(pa.float32()))])
    with pq.ParquetWriter(path, schema) as w:
        a = 0
        for n in groups:
            cols = [keys[a:a + n], list(pids[a:a + n]), list(camids[a:a + n]),
                    [None if v is None else list(v) for v in vectors[a:a + n]]]
            w.write_table(pa.table([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema))
            a += n


@pytest.fixture
def files(tmp_path):
    qkeys, ql, qc, qf, gkeys, gl, gc, gf = case()
    write_features(tmp_path / "query.parquet", qkeys, ql, qc, qf)
    write_groups(tmp_path / "gallery.parquet", gkeys, gl, gc, gf)
    return tmp_path, case()


def run_cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=True)


def assert_same_scores(a, b):
    assert a.summary() == b.summary()
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert a.per_query.equals(b.per_query)                     # top keys and scores included, bit for bit


@pytest.mark.parametrize("groups", [GROUPS, (NG,)])
def test_score_file_makes_the_blocks_of_score(files, groups):
    """Whatever the row groups, the read batches and the block size: the Scores of score() on the loaded file."""
    tmp, (qkeys, ql, qc, qf, gkeys, gl, gc, gf) = files
    write_groups(tmp / "g.parquet", gkeys, gl, gc, gf, groups)
    q = read_features(tmp / "query.parquet")
    for chunk in (1, 7, 64, 1000):
        want = score(q.feats, ql, qc, torch.from_numpy(gf), gl, gc, qkeys, gkeys, chunk=chunk)
        for read_rows in (2, 50, 1024):
            with FeatureFile(tmp / "g.parquet", read_rows=read_rows) as g:
                assert g.nbytes == NG * D * 4 and g.rows == NG
                got = run.score_file(q, g, None, "test", chunk, torch.device("cpu"))
            assert_same_scores(got, want)
            assert got.summary()["rank1"] < 1                  # a case with misses, not a trivial one


def test_eval_streams_a_gallery_file_over_the_budget(files, monkeypatch):
    """--memory-budget below the files' features: never loaded whole, the same metrics.json numbers and
    per-query table as the in-memory run, keys-only files joined with the split manifest alike."""
    tmp, (qkeys, ql, qc, qf, gkeys, gl, gc, gf) = files
    dst = tmp / "dst"
    (dst / "manifests").mkdir(parents=True)
    rows = ([("test", "query", k, int(p), int(c), False, None, f"query/{k}.jpg") for k, p, c in zip(qkeys, ql, qc)]
            + [("test", "gallery", k, int(p), int(c), bool(p == DISTRACTOR_PID), None, f"gallery/{k}.jpg")
               for k, p, c in zip(gkeys, gl, gc)])
    schema = manifests.schema("split")
    pq.write_table(pa.table([pa.array(c, f.type) for c, f in zip(zip(*rows), schema)], schema=schema),
                   dst / manifests.relpath("split"))
    write_groups(tmp / "gkeys.parquet", gkeys, None, None, gf)
    loaded = run.read_features

    def query_only(path, *a):
        assert "query" in str(path), f"{path} was read whole"
        return loaded(path, *a)

    for gallery in ("gallery", "gkeys"):
        args = (dst, "--query-features", tmp / "query.parquet", "--gallery-features", tmp / f"{gallery}.parquet",
                "--chunk", 32)
        assert run_cli("eval", *args, "--out", tmp / f"mem-{gallery}").exit_code == 0
        monkeypatch.setattr(run, "read_features", query_only)
        r = run_cli("eval", *args, "--out", tmp / f"stream-{gallery}", "--memory-budget", "1k")
        monkeypatch.setattr(run, "read_features", loaded)
        assert r.exit_code == 0, (r.output, r.exception)
        mem, streamed = (json.loads((tmp / f"{d}-{gallery}/metrics.json").read_text()) for d in ("mem", "stream"))
        assert (mem["scoring"], streamed["scoring"]) == ("in memory", "streamed")
        assert streamed["metrics"] == mem["metrics"] and streamed["cmc"] == mem["cmc"]
        assert 0 < mem["metrics"]["rank1"] < 1 and mem["metrics"]["gallery"] == NG
        a, b = (pq.read_table(tmp / f"{d}-{gallery}/per_query.parquet") for d in ("mem", "stream"))
        assert a.equals(b)


def test_streamed_refusals_are_the_in_memory_ones(files):
    """Faults in a later row group (NaN, inf, a missing vector, another length, a key seen in an earlier
    group, scores that overflow) and files with two faults: refused with the very line the in-memory path
    gives, nothing scored; through the real entry point, one line and exit status 2."""
    tmp, (qkeys, ql, qc, qf, gkeys, gl, gc, gf) = files
    vec = list(gf)
    late = sum(GROUPS[:4]) + 2                           # a row of the fifth row group
    nan, inf, huge = gf.copy(), gf.copy(), gf.copy()
    nan[late, 3] = np.nan
    inf[[7, late]] = np.inf
    huge[late] = 3e38 * np.sign(qf[0])               # q0 . huge[late] is past float32's range
    dup = gkeys[:late] + [gkeys[1]] + gkeys[late + 1:]
    hostile = {
        "nan": (gkeys, nan), "inf": (gkeys, inf), "overflow": (gkeys, huge), "dup": (dup, gf),
        "missing": (gkeys, vec[:late] + [None] + vec[late + 1:]),
        "length": (gkeys, vec[:late] + [gf[late][:8]] + vec[late + 1:]),
        "dims": (gkeys, gf[:, :8]), "dims+nan": (gkeys, nan[:, :8]),
        "dup+nan": (dup, nan), "missing+dup": (dup, vec[:late] + [None] + vec[late + 1:]),
        "nokey": ([None] + gkeys[1:], gf),
    }
    for name, (keys, vectors) in hostile.items():
        write_raw(tmp / f"{name}.parquet", keys, gl, gc, vectors)
    messages = {}
    for name in hostile:
        got = []
        for budget in ("4GiB", "1k"):
            out = tmp / f"out-{name}-{budget}"
            r = run_cli("eval", "--query-features", tmp / "query.parquet", "--gallery-features",
                        tmp / f"{name}.parquet", "--out", out, "--memory-budget", budget)
            assert isinstance(r.exception, UserError), (name, budget, r.output, r.exception)
            assert not (out / "metrics.json").exists()
            got.append(str(r.exception))
        assert got[0] == got[1] and "\n" not in got[0], (name, got)
        messages[name] = got[0].replace(str(tmp / f"{name}.parquet"), "FILE")
    assert f"1 of 230 gallery features are not finite (NaN or inf), e.g. key g{late}" in messages["nan"]
    assert messages["inf"].startswith("2 of 230 gallery features are not finite") and "key g007" in messages["inf"]
    assert f"the scores of gallery item g{late} overflow" in messages["overflow"]
    assert "FILE: 1 duplicate key(s), e.g. g001" in messages["dup"] and messages["dup+nan"] == messages["dup"]
    assert "FILE: 1 row(s) have no feature vector" in messages["missing"]
    assert messages["missing+dup"] == messages["missing"]
    assert "different lengths (8..16)" in messages["length"]
    assert "16-d but gallery features are 8-d" in messages["dims"] and messages["dims+nan"].startswith("1 of 230")
    assert "1 row(s) have no key" in messages["nokey"]
    p = subprocess_cli("eval", "--query-features", tmp / "query.parquet", "--gallery-features", tmp / "nan.parquet",
                       "--out", tmp / "cli", "--memory-budget", "1k", timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == f"sysu30k: error: {messages['nan']}", p.stderr
    assert not (tmp / "cli" / "metrics.json").exists()


def test_merge_features_writes_the_parts_in_any_order(tmp_path):
    """The ranks' parts joined in a given key order: the rows, values and schema metadata of one file, output
    row groups bounded, a row group cache smaller than the parts; parts that miss a key are refused."""
    rng = np.random.default_rng(3)
    n, d = 500, 24
    keys = [f"k{i:04d}" for i in range(n)]
    feats = rng.standard_normal((n, d)).astype(np.float32)
    pids, cams = rng.integers(0, 50, n), rng.integers(1, 4, n)
    owner = rng.integers(0, 3, n)
    store = Storage(str(tmp_path))
    meta = {"settings": '{"a": 1}', "checkpoint": "net.pth"}
    for r in range(3):
        mine = np.flatnonzero(owner == r)
        with FeatureWriter(f"part{r}", store, meta) as w:
            for piece in np.array_split(mine, 9):
                w.write([keys[i] for i in piece], pids[piece], cams[piece], feats[piece])
    order = [keys[i] for i in rng.permutation(n)]
    merge_features(store, ["part0", "part1", "part2"], "all.parquet", order, group_bytes=40 * d * 4)
    got = read_features(tmp_path / "all.parquet")
    rows = [int(k[1:]) for k in order]
    assert got.keys == order and got.pids.tolist() == pids[rows].tolist() and got.camids.tolist() == cams[rows].tolist()
    assert np.array_equal(got.feats.numpy(), feats[rows])
    assert pq.read_schema(tmp_path / "all.parquet").equals(pq.read_schema(tmp_path / "part0"), check_metadata=True)
    assert pq.read_schema(tmp_path / "all.parquet").metadata[b"settings"] == b'{"a": 1}'
    assert pq.ParquetFile(tmp_path / "all.parquet").num_row_groups == n // 40 + 1
    with pytest.raises(UserError, match="do not hold each image of the split once"):
        merge_features(store, ["part0", "part1"], "bad.parquet", order)
    assert not (tmp_path / "bad.parquet").exists()


@pytest.mark.parametrize("workers,batch", [(0, 3), (2, 2), (2, 1)])
def test_loader_order_is_what_the_loader_yields(packed_split, workers, batch):
    """The key order a pass over an EvalLoader gives (its workers' batches taken in turn), computed without
    reading an image: the order one process writes --save-features in."""
    from sysu30k.loader import EvalLoader, LoaderOptions, TransformSpec

    keys = [r["key"] for r in pq.read_table(packed_split / "manifests/split.parquet").to_pylist()
            if r["role"] == "gallery"]
    loader = EvalLoader(str(packed_split), "gallery", batch, TransformSpec(height=32, width=16, train=False),
                        LoaderOptions(decoder="pil", workers=workers), flip=False, keys=frozenset(keys[2:]))
    seen = [k for b in loader for k, ok in zip(b.keys, b.valid.tolist()) if ok]
    assert sorted(seen) == sorted(keys[2:])
    assert run._loader_order(loader) == seen
    if workers > 1:
        assert seen != [k for s in loader.catalog for k in s.key]      # the streams do interleave
