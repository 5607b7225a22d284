"""`sysu30k split`: invariants on synth data, each broken invariant named, strict mode, val hold-out, reruns.

Dask runs on one real 2-worker LocalCluster per module, reached through its scheduler address (the
``--scheduler`` path); one test starts its own default cluster, the rest of the fast paths use it or the
in-process ``sync`` runner. Broken datasets are made by editing a copy of a real images.parquet row
group by row group, so the one-row-group-per-shard layout stays as ``sysu30k shard`` wrote it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY

from sysu30k import manifests
from sysu30k.errors import UserError
from sysu30k.ingest.config import ShardingOptions, ShardJob
from sysu30k.ingest.shard import run_shard
from sysu30k.manifests import SPLIT_SUMMARY
from sysu30k.release.constants import DISTRACTOR_PID, GALLERY_CAMID, OFFICIAL_TEST_IDS, QUERY_CAMID
from sysu30k.split.build import build_splits
from sysu30k.split.checks import EXAMPLES, check_counts, check_split
from sysu30k.split.config import GUARD
from sysu30k.split.holdout import choose_holdout, excluded_folders, max_val_folders, training_bags

SMALL = ShardJob(ShardingOptions(shard_count=7))
VAL_TREE = dict(folders=30, images_per_folder=6, test_ids=6, distractors=10, height=144, seed=4)


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def packed(tiny_tree, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("split") / "dst"
    run_shard(str(tiny_tree), str(dst), SMALL, show_progress=False)
    return dst


@pytest.fixture(scope="module")
def val_packed(tmp_path_factory) -> Path:
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("split-val")
    write_synth(str(root / "src"), SynthConfig(**VAL_TREE))
    run_shard(str(root / "src"), str(root / "dst"), SMALL, show_progress=False)
    return root / "dst"


def manifests_copy(dst: Path, tmp_path: Path) -> Path:
    """A writable DST holding only the manifests of ``dst`` (all split needs)."""
    out = tmp_path / "dst"
    shutil.copytree(dst / "manifests", out / "manifests",
                    ignore=shutil.ignore_patterns("split*", "holdout*"))   # no earlier split output
    return out


def edit_images(dst: Path, edit) -> None:
    """Rewrite images.parquet with ``edit(frame)`` applied to its rows, keeping one row group per shard."""
    path = dst / manifests.relpath("images")
    pf = pq.ParquetFile(path)
    groups = [pf.read_row_group(i).to_pandas() for i in range(pf.metadata.num_row_groups)]
    sizes = [len(g) for g in groups]
    rows = edit(pd.concat(groups, ignore_index=True))
    assert len(rows) == sum(sizes), "edits keep the number of rows (row groups stay shards)"
    schema = manifests.schema("images")
    with pq.ParquetWriter(path, schema) as w:
        start = 0
        for n in sizes:
            w.write_table(pa.Table.from_pandas(rows.iloc[start:start + n], schema=schema, preserve_index=False),
                          row_group_size=max(n, 1))
            start += n


def split_rows(dst: Path) -> pd.DataFrame:
    return pq.read_table(dst / manifests.relpath("split")).to_pandas()


def test_split_matches_synth_config(packed, scheduler, tmp_path):
    packed = manifests_copy(packed, tmp_path)
    s = build_splits(str(packed), scheduler=scheduler)
    n_ids, n_dis = TINY["test_ids"], TINY["distractors"]
    assert s["expected"] == {"mode": "synth", "queries": n_ids, "gallery": n_ids + n_dis}
    assert s["splits"]["test"] == {"queries": n_ids, "gallery": n_ids + n_dis, "true_matches": n_ids,
                                   "distractors": n_dis, "identities": n_ids}
    assert s["findings"] == [] and s["ok"]
    rows = split_rows(packed)
    images = pq.read_table(packed / manifests.relpath("images")).to_pandas()
    test_images = images[images["subset"] != "train"]
    assert list(rows["key"]) == list(test_images["key"])            # shard order, nothing lost
    assert set(rows["split"]) == {"test"} and list(rows["role"]) == list(test_images["subset"])
    q = rows[rows["role"] == "query"]
    assert (q["camid"] == QUERY_CAMID).all() and q["pid"].is_unique
    g = rows[rows["role"] == "gallery"]
    assert (g["camid"] == GALLERY_CAMID).all()
    assert (g.loc[g["distractor"], "pid"] == DISTRACTOR_PID).all()
    assert set(g.loc[~g["distractor"], "pid"]) == set(q["pid"])
    assert json.loads((packed / SPLIT_SUMMARY).read_text()) == s
    assert pq.read_table(packed / manifests.relpath("holdout")).num_rows == 0


def test_default_local_cluster_and_cli_table(packed, tmp_path):
    from click.testing import CliRunner

    from sysu30k.cli import cli

    dst = manifests_copy(packed, tmp_path)
    result = CliRunner().invoke(cli, ["split", str(dst)])           # no --scheduler: its own LocalCluster
    assert result.exit_code == 0, result.output
    assert "test" in result.output and "all invariants hold" in result.output
    assert json.loads((dst / SPLIT_SUMMARY).read_text())["splits"]["test"]["queries"] == TINY["test_ids"]


def _first_ids(rows: pd.DataFrame) -> tuple[int, int]:
    ids = sorted(rows.loc[rows["subset"] == "query", "pid"].unique())
    return int(ids[0]), int(ids[1])


def _dup_query(df):
    a, b = _first_ids(df)
    df.loc[(df["subset"] == "query") & (df["pid"] == b), "pid"] = a
    return df


def _drop_match(df):
    a, _ = _first_ids(df)
    m = (df["subset"] == "gallery") & (df["pid"] == a)
    df.loc[m, ["distractor", "pid"]] = [True, DISTRACTOR_PID]        # the true match became a distractor
    return df


def _same_camera(df):
    a, _ = _first_ids(df)
    df.loc[(df["subset"] == "gallery") & (df["pid"] == a), "camid"] = QUERY_CAMID
    return df


def _key_both(df):
    a, _ = _first_ids(df)
    qkey = df.loc[(df["subset"] == "query") & (df["pid"] == a), "key"].iloc[0]
    df.loc[(df["subset"] == "gallery") & (df["pid"] == a), "key"] = qkey
    return df


def _distractor_id(df):
    a, _ = _first_ids(df)
    df.loc[df.index[df["distractor"]][0], "pid"] = a
    return df


@pytest.mark.parametrize("edit, invariant, offender", [
    (_dup_query, "duplicate-query", "query"),
    (_drop_match, "missing-true-match", "query"),
    (_same_camera, "same-camera-match", "query"),
    (_key_both, "key-in-both-roles", "key"),
    (_distractor_id, "distractor-identity", "distractor"),
])
def test_each_broken_invariant_is_named(packed, scheduler, tmp_path, caplog, edit, invariant, offender):
    dst = manifests_copy(packed, tmp_path)
    edit_images(dst, edit)
    images = pq.read_table(dst / manifests.relpath("images")).to_pandas()
    a, _ = _first_ids(images)
    if offender == "query":
        named = images.loc[(images["subset"] == "query") & (images["pid"] == a), "path"].iloc[0]
    elif offender == "key":
        named = images.loc[(images["subset"] == "query") & (images["pid"] == a), "key"].iloc[0]
    else:
        named = images.loc[images["distractor"] & (images["pid"] == a), "path"].iloc[0]
    with caplog.at_level("WARNING", logger="sysu30k"):
        s = build_splits(str(dst), scheduler=scheduler, expected="none")
    assert not s["ok"]
    hits = [f for f in s["findings"] if f["invariant"] == invariant]
    assert len(hits) == 1 and hits[0]["split"] == "test"
    assert named in hits[0]["message"] and any(named in e for e in hits[0]["examples"])
    assert f"test/{invariant}: " in caplog.text and named in caplog.text
    # the Dask path (reduced rows) finds exactly what the checks find on the whole test table
    full = images[images["subset"] != "train"].rename(columns={"subset": "role"})
    assert [f.as_dict() for f in check_split(full, "test")] == s["findings"]


def test_strict_cli_exits_2_and_writes_nothing(packed, scheduler, tmp_path):
    dst = manifests_copy(packed, tmp_path)
    edit_images(dst, _dup_query)
    cmd = [sys.executable, "-m", "sysu30k", "split", str(dst), "--strict", "--expect", "none",
           "--scheduler", scheduler]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sysu30k: error: ") and "duplicate-query" in last and "--strict" in last
    assert not (dst / manifests.relpath("split")).exists() and not (dst / SPLIT_SUMMARY).exists()


def test_count_deviation_names_files(packed, scheduler, tmp_path):
    dst = manifests_copy(packed, tmp_path)
    s = build_splits(str(dst), scheduler=scheduler, expected="official")
    (f,) = s["findings"]
    assert f["invariant"] == "expected-count" and "1,000" in f["message"] and "479,730" in f["message"]
    assert "no query of identity 000028311" in f["message"] and "+" in f["message"]
    # with the synth's own counts, one extra distractor is named (number beyond the expected count)
    one_less = (TINY["test_ids"], TINY["test_ids"] + TINY["distractors"] - 1)
    s = build_splits(str(dst), scheduler="sync", expected=one_less)
    assert f"extra distractor 0000others_c1_{TINY['distractors']}.jpg" in s["findings"][0]["message"]


def test_missing_manifest_and_bad_options(tmp_path, packed):
    with pytest.raises(UserError, match="run `sysu30k shard"):
        build_splits(str(tmp_path / "nothing"), scheduler="sync")
    dst = manifests_copy(packed, tmp_path)
    with pytest.raises(UserError, match="--expect"):
        build_splits(str(dst), scheduler="sync", expected="lots")
    with pytest.raises(UserError, match=r"--val-folders 7 is more than this dataset allows: 8 training folders"):
        build_splits(str(dst), scheduler="sync", val_folders=7)
    (dst / "manifests/summary.json").unlink()
    with pytest.raises(UserError, match="did not finish"):
        build_splits(str(dst), scheduler="sync")


def test_val_split(val_packed, scheduler, tmp_path):
    dst = manifests_copy(val_packed, tmp_path)
    s = build_splits(str(dst), val_folders=6, val_block=3, seed=5, scheduler=scheduler)
    assert s["ok"], s["findings"]
    v = s["val"]
    assert len(v["blocks"]) == 2 and len(v["query_folders"]) + len(v["distractor_folders"]) == 6
    held = set(v["query_folders"]) | set(v["distractor_folders"])
    excluded = held | set(v["guard_folders"])
    assert excluded_folders(str(dst)) == excluded
    # guard bands: every training folder is more than GUARD folders away from every held-out folder
    images = pq.read_table(dst / manifests.relpath("images")).to_pandas()
    train_folders = set(images["folder"].dropna().astype(int)) - excluded
    assert min(abs(t - h) for t in train_folders for h in held) > GUARD
    # val folders (and guards) never appear in training bags
    bags = training_bags(str(dst))
    all_bags = pq.read_table(dst / manifests.relpath("bags"))
    assert 0 < bags.num_rows < all_bags.num_rows
    assert bags.num_rows == s["training_bags"]["kept"]
    used = {x for label in bags["label"].to_pylist() for x in label}
    used |= {int(f) for folders in bags["folders"].to_pylist() for f in folders}
    assert not used & excluded
    # the val split: one query per query folder, its other images true matches, distractor folders whole
    rows = split_rows(dst)
    val = rows[rows["split"] == "val"]
    q = val[val["role"] == "query"]
    assert sorted(q["folder"]) == v["query_folders"] and (q["pid"] == q["folder"]).all()
    assert (q["camid"] == QUERY_CAMID).all()
    g = val[val["role"] == "gallery"]
    assert (g["camid"] == GALLERY_CAMID).all()
    assert (g.loc[g["folder"].isin(v["distractor_folders"]), "pid"] == DISTRACTOR_PID).all()
    matches = g[g["folder"].isin(v["query_folders"])]
    assert (matches["pid"] == matches["folder"]).all()
    held_images = images[images["folder"].isin(held)]
    assert sorted(val["key"]) == sorted(held_images["key"])
    assert s["splits"]["val"]["queries"] == len(v["query_folders"])
    assert s["splits"]["val"]["distractors"] == int(held_images["folder"].isin(v["distractor_folders"]).sum())


def test_val_queries_per_folder(val_packed, tmp_path):
    """--val-queries N: each query folder's N lowest-hash images are queries (a superset of the one-query
    split's), never all of them; the checks allow N per identity and the CLI passes the option through."""
    from click.testing import CliRunner

    from sysu30k.cli import cli

    dst = manifests_copy(val_packed, tmp_path)
    one = build_splits(str(dst), val_folders=6, val_block=3, seed=5, scheduler="sync")
    q1 = set(split_rows(dst).query("split == 'val' and role == 'query'")["key"])
    result = CliRunner().invoke(cli, ["split", str(dst), "--val-folders", "6", "--val-block", "3", "--seed", "5",
                                      "--scheduler", "sync", "--val-queries", "3", "--json", "-q"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert s["ok"], s["findings"]
    assert s["val"]["queries_per_folder"] == 3 and s["val"]["query_folders"] == one["val"]["query_folders"]
    val = split_rows(dst).query("split == 'val'")
    q = val[val["role"] == "query"]
    assert q1 < set(q["key"])
    counts = val[val["folder"].isin(s["val"]["query_folders"])].groupby("folder")["role"].value_counts().unstack()
    assert (counts["query"] == np.minimum(3, counts.sum(axis=1) - 1)).all()
    assert (counts["gallery"] >= 1).all() and s["splits"]["val"]["queries"] == len(q) == int(counts["query"].sum())
    many = build_splits(str(dst), val_folders=6, val_block=3, seed=5, scheduler="sync", val_queries=1000)
    assert many["ok"], many["findings"]                               # all but one image of each folder
    counts = split_rows(dst).query("split == 'val'").groupby("folder")["role"].value_counts().unstack()
    assert (counts.loc[many["val"]["query_folders"], "gallery"] == 1).all()


def test_more_queries_than_allowed_is_named():
    from sysu30k.split.checks import check_duplicate_queries

    rows = pd.DataFrame({"role": ["query"] * 3 + ["gallery"], "key": list("abcd"), "pid": [7, 7, 7, 7],
                         "camid": [2, 2, 2, 1], "distractor": [False] * 4, "path": list("abcd")})
    assert check_duplicate_queries(rows, "val", 3) == []
    (f,) = check_duplicate_queries(rows, "val", 2)
    assert f.invariant == "duplicate-query" and "more than 2 queries" in f.line()


def test_val_deterministic_by_seed_and_rerun_overwrites(val_packed, scheduler, tmp_path):
    dst = manifests_copy(val_packed, tmp_path)

    def run(sched, **kw):
        build_splits(str(dst), scheduler=sched, **kw)
        return [(dst / manifests.relpath(t)).read_bytes() for t in ("split", "holdout")] + [
            (dst / SPLIT_SUMMARY).read_bytes()]

    first = run(scheduler, val_folders=4, val_block=2, seed=1)
    assert run("sync", val_folders=4, val_block=2, seed=1) == first    # same seed: same bytes, any runner
    other = run("sync", val_folders=4, val_block=2, seed=2)
    assert other[1] != first[1] and other[0] != first[0]
    run("sync", val_folders=0)                                         # a rerun without val clears the hold-out
    assert set(split_rows(dst)["split"]) == {"test"} and excluded_folders(str(dst)) == set()
    assert training_bags(str(dst)).num_rows == pq.read_metadata(dst / manifests.relpath("bags")).num_rows
    assert not [p for p in (dst / "manifests").iterdir() if ".tmp-" in p.name]


def test_trainer_refuses_a_holdout_that_disagrees_with_the_summary(val_packed, tmp_path):
    from sysu30k.split.holdout import Holdout

    dst = manifests_copy(val_packed, tmp_path)
    build_splits(str(dst), scheduler="sync", val_folders=2, val_block=1)
    pq.write_table(Holdout().table(), dst / manifests.relpath("holdout"))   # as if the run died mid-way
    with pytest.raises(UserError, match="disagree"):
        training_bags(str(dst))


def test_failed_rerun_keeps_previous_outputs(packed, tmp_path, monkeypatch):
    import sysu30k.split.build as split

    dst = manifests_copy(packed, tmp_path)
    build_splits(str(dst), scheduler="sync")
    before = {t: (dst / manifests.relpath(t)).read_bytes() for t in ("split", "holdout")}

    def broken(self, df):
        yield from ()
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(split._Runner, "partitions", broken)
    with pytest.raises(RuntimeError, match="killed"):
        build_splits(str(dst), scheduler="sync")
    assert {t: (dst / manifests.relpath(t)).read_bytes() for t in before} == before
    assert not [p for p in (dst / "manifests").iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- pure checks and choices

def _frame(rows):
    return pd.DataFrame(rows, columns=["role", "key", "pid", "camid", "distractor", "path"])


def _good():
    rows = []
    for i in (1, 2, 3):
        rows += [("query", f"q{i}", i, 2, False, f"query/{i}/q.jpg"),
                 ("gallery", f"g{i}", i, 1, False, f"gallery/{i}/g.jpg")]
    rows += [("gallery", f"d{k}", DISTRACTOR_PID, 1, True, f"gallery/0000others/d{k}.jpg") for k in range(5)]
    return rows


def test_pure_checks_pass_and_fail_with_clear_messages():
    assert check_split(_frame(_good()), "test") == []
    rows = _good() + [("query", "q1b", 1, 2, False, "query/1/q_b.jpg")]
    (f,) = [f for f in check_split(_frame(rows), "test") if f.invariant == "duplicate-query"]
    assert f.message.startswith("1 identity with more than one query") and "query/1/q_b.jpg (pid 1)" in f.message
    rows = [r for r in _good() if r[1] != "g2"]
    (f,) = check_split(_frame(rows), "x")
    assert (f.invariant, f.count, f.examples) == ("missing-true-match", 1, ("query/2/q.jpg (pid 2)",))
    assert f.line() == "x/missing-true-match: 1 query without a true match in the gallery: query/2/q.jpg (pid 2)"
    rows = [r if r[1] != "g3" else ("gallery", "g3", 3, 2, False, "gallery/3/g.jpg") for r in _good()]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["same-camera-match"]
    rows = _good() + [("gallery", "q1", 1, 1, False, "gallery/1/again.jpg")]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["key-in-both-roles"]
    rows = _good() + [("gallery", "d0", DISTRACTOR_PID, 1, True, "gallery/0000others/copy.jpg")]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["duplicate-key"]
    rows = _good() + [("gallery", "dx", 2, 1, True, "gallery/0000others/dx.jpg")]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["distractor-identity"]
    rows = _good() + [("gallery", "o", 9, 1, False, "gallery/9/o.jpg")]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["orphan-gallery"]
    rows = _good() + [("query", "qd", DISTRACTOR_PID, 2, True, "query/x/qd.jpg")]
    assert [f.invariant for f in check_split(_frame(rows), "test")] == ["query-identity"]


def test_examples_are_capped():
    rows = [("query", f"q{i}", i, 2, False, f"query/{i}.jpg") for i in range(50)]
    (f,) = check_split(_frame(rows), "test")
    assert f.count == 50 and len(f.examples) == EXAMPLES and f.message.endswith("(+40 more)")


def test_official_count_deviation_names_missing_identity():
    ids = list(OFFICIAL_TEST_IDS)
    rows = []
    for i in ids:
        if i != 28400:
            rows += [("query", f"q{i}", i, 2, False, f"query/{i:09d}/{i:09d}_c2_2.jpg"),
                     ("gallery", f"g{i}", i, 1, False, f"gallery/{i:09d}/{i:09d}_c1_1.jpg")]
    numbers = np.arange(1, 478_730 + 2)                              # one distractor too many
    (f,) = check_counts("test", 999, 999 + 478_731, (1000, 479_730), _frame(rows), OFFICIAL_TEST_IDS, numbers)
    assert f.invariant == "expected-count"
    assert "no query of identity 000028400" in f.message and "no true match of identity 000028400" in f.message
    assert "extra distractor 0000others_c1_478731.jpg" in f.message
    assert check_counts("test", 1000, 479_730, (1000, 479_730)) == []


@pytest.mark.parametrize("n, block, seed", [(1, 25, 0), (2, 25, 1), (6, 2, 2), (10, 3, 3), (21, 25, 4)])
def test_choose_holdout_blocks_and_guards(n, block, seed):
    counts = {f: 5 for f in range(1, 31)}
    h = choose_holdout(counts, n, seed, block)
    held = sorted(h.query + h.distractor)
    assert len(held) == n and h.query and (h.distractor or n == 1)
    assert not set(held) & set(h.guard)
    train = set(counts) - h.excluded()
    assert train and min(abs(t - x) for t in train for x in held) > GUARD
    for f in h.distractor:                                          # distractors never near a query folder
        assert min(abs(f - q) for q in h.query) > GUARD
    assert choose_holdout(counts, n, seed, block) == h
    assert h.table().num_rows == len(h.excluded())


def test_choose_holdout_limits():
    counts = {f: 5 for f in range(1, 31)}
    most = max_val_folders(30)
    choose_holdout(counts, most)
    with pytest.raises(UserError, match=f"at most {most} held-out folders"):
        choose_holdout(counts, most + 1)
    with pytest.raises(UserError, match="2 images or more"):
        choose_holdout({f: 1 for f in range(1, 31)}, 4, 0, 2)


def test_the_val_split_does_not_depend_on_sharding_or_partitioning(val_packed, scheduler, tmp_path, monkeypatch):
    """One shard per 2 images vs one shard for everything, a local cluster vs no cluster, partitions of one row
    group vs all: the same split.parquet. (The query pick once compared 63-bit hashes as float64.)"""
    import sysu30k.split.build as build

    src = val_packed.parent / "src"
    tables = []
    for shard_count, sched, partition_rows in ((2, scheduler, 1), (100_000, "sync", 100_000), (7, "sync", 1)):
        dst = tmp_path / f"dst-{shard_count}-{partition_rows}"
        run_shard(str(src), str(dst), ShardJob(ShardingOptions(shard_count=shard_count)), show_progress=False)
        monkeypatch.setattr(build, "PARTITION_ROWS", partition_rows)
        s = build_splits(str(dst), val_folders=8, val_block=4, seed=3, scheduler=sched)
        assert s["splits"]["val"]["queries"] == len(s["val"]["query_folders"]) > 1
        tables.append(pq.read_table(dst / manifests.relpath("split")))
    assert tables[0].num_rows > 0 and all(t.equals(tables[0]) for t in tables[1:])
