"""``sysu30k.manifests.read``: a packed DST's tables in pandas with the contract's dtypes (nullable ints as
Int32/Int8 with <NA>, lists as lists), the same values as pyarrow's, and one-line refusals."""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sysu30k import manifests
from sysu30k.errors import UserError


def test_images_have_nullable_dtypes_and_pyarrows_values(packed_split):
    df = manifests.read(str(packed_split), "images")
    t = pq.read_table(packed_split / manifests.relpath("images"))
    assert list(df.columns) == manifests.schema("images").names
    assert (df["folder"].dtype, df["pid"].dtype, df["camid"].dtype) == ("Int32", "Int32", "Int8")
    assert (df["offset"].dtype, df["width"].dtype, df["distractor"].dtype) == ("int64", "int32", "bool")
    train, test = df["subset"] == "train", df["subset"] != "train"
    assert df.loc[test, "folder"].isna().all() and df.loc[train, "pid"].isna().all()
    assert df.loc[train, "camid"].isna().all() and not df.loc[test, "pid"].isna().any()
    for name in t.column_names:
        assert [None if v is pd.NA else v for v in df[name].tolist()] == t[name].to_pylist(), name


def test_bags_are_lists_and_filters_and_columns_apply(packed_split):
    bags = manifests.read(str(packed_split), "bags")
    assert isinstance(bags["label"][0], list) and bags["label"].tolist() == \
        pq.read_table(packed_split / manifests.relpath("bags"))["label"].to_pylist()
    q = manifests.read(str(packed_split), "split", columns=["key", "pid", "camid"],
                       filters=[("role", "=", "query")])
    assert list(q.columns) == ["key", "pid", "camid"] and len(q) == 5 and q["pid"].dtype == "Int32"


def test_fsspec_urls_and_a_file_path(packed_split):
    url = manifests.read(f"file://{packed_split}", "shards")
    path = manifests.read(str(packed_split / manifests.relpath("shards")), "shards")
    pd.testing.assert_frame_equal(url, path)


@pytest.mark.parametrize("case,needle", [
    ("unknown table", "no manifest table 'image'"),
    ("unknown column", "no column 'colour'"),
    ("missing file", "no images manifest"),
    ("other schema", "the contract says int32"),
    ("extra column", "has column 'extra'"),
    ("null where the contract says never", "column 'key' has 1 null(s)"),
])
def test_refusals_are_one_line(packed_split, tmp_path, case, needle):
    dst = tmp_path / "dst"
    (dst / "manifests").mkdir(parents=True)
    shutil.copy(packed_split / manifests.relpath("images"), dst / manifests.relpath("images"))
    t = pq.read_table(dst / manifests.relpath("images"))
    call = {"table": "images"}
    if case == "unknown table":
        call["table"] = "image"
    elif case == "unknown column":
        call["columns"] = ["key", "colour"]
    elif case == "missing file":
        (dst / manifests.relpath("images")).unlink()
    elif case == "other schema":
        pq.write_table(t.set_column(t.schema.get_field_index("pid"), "pid", t["pid"].cast(pa.int64())),
                       dst / manifests.relpath("images"))
    elif case == "extra column":
        pq.write_table(t.append_column("extra", pa.array([0] * t.num_rows)), dst / manifests.relpath("images"))
    else:
        keys = pa.array([None] + t["key"].to_pylist()[1:], pa.string())
        pq.write_table(t.set_column(0, "key", keys), dst / manifests.relpath("images"))
    with pytest.raises(UserError) as err:
        manifests.read(str(dst), **call)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_duckdb_one_liner(packed_split):
    duckdb = pytest.importorskip("duckdb")
    images = packed_split / manifests.relpath("images")
    got = duckdb.sql(f"""SELECT key, "offset" FROM '{images}' WHERE subset = 'query' ORDER BY key""").fetchall()
    df = manifests.read(str(packed_split), "images")
    want = df[df["subset"] == "query"].sort_values("key")
    assert got == list(zip(want["key"], want["offset"].tolist()))


def test_polars_one_liner(packed_split):
    pl = pytest.importorskip("polars")
    images = packed_split / manifests.relpath("images")
    got = pl.read_parquet(images).filter(pl.col("subset") == "query").select("key", "shard", "offset")
    df = manifests.read(str(packed_split), "images")
    want = df[df["subset"] == "query"]
    assert got["key"].to_list() == want["key"].tolist() and got["offset"].to_list() == want["offset"].tolist()


def test_a_feature_file_by_its_path(tmp_path):
    from sysu30k.evaluation import write_features

    write_features(tmp_path / "f.parquet", ["a", "b"], None, None, np.eye(2, 3, dtype=np.float32))
    df = manifests.read(str(tmp_path / "f.parquet"), "features")
    assert df["pid"].isna().all() and df["pid"].dtype == "Int32" and df["feature"].tolist() == [[1, 0, 0], [0, 1, 0]]
    with pytest.raises(UserError, match="give the file itself"):
        manifests.read(str(tmp_path), "features")
