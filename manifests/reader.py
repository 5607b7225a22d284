"""Read a manifest table into pandas with the dtypes its contract implies, not pandas' float64 for nullable ints.

Every dtype comes from ``schema.toml`` through :func:`pandas_dtype`; the file is read with pyarrow through
fsspec, so DST may be a local path or a URL such as ``s3://bucket/dst``. Imports pandas and fsspec only
when called (the command line starts without pandas).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import UserError
from . import _SCALARS, contract, relpath, schema

if TYPE_CHECKING:
    import pandas

_NULLABLE = {"int8": "Int8", "int16": "Int16", "int32": "Int32", "int64": "Int64", "float32": "Float32",
             "bool": "boolean"}


def pandas_dtype(spec: str, nullable: bool) -> str:
    """The pandas dtype of a contract column: nullable ints/bools as pandas' masked types (``Int32``,
    ``boolean``), others as numpy's, strings as ``str``, lists as ``object`` holding Python lists."""
    if spec.startswith("list<"):
        return "object"
    if spec == "string":
        return "str"
    return _NULLABLE[spec] if nullable else spec


def read(dst: str, table: str, columns: list[str] | None = None, filters: Any = None,
         storage_options: dict | None = None) -> pandas.DataFrame:
    """Manifest ``table`` of dataset root ``dst`` (or the ``.parquet`` file itself) as a DataFrame with the
    contract's dtypes (:func:`pandas_dtype`); ``columns`` and ``filters`` (pyarrow's DNF form) are applied
    while reading. A refusal (UserError, one line) for an unknown table or column, or a file off the contract."""
    import fsspec
    import pandas as pd
    import pyarrow.parquet as pq

    if table not in contract()["tables"]:
        raise UserError(f"no manifest table {table!r}: one of {', '.join(contract()['tables'])}")
    specs = {c["name"]: c for c in contract()["tables"][table]["columns"]}
    wanted = list(specs) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in specs]
    if unknown:
        raise UserError(f"the {table} table has no column {unknown[0]!r}: it has {', '.join(specs)}")
    url = _table_url(dst, table)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise UserError(f"no {table} manifest at {url}")
    try:
        got = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError):
        raise UserError(f"{url} is not a Parquet file (damaged, or another format)") from None
    _check(got, table, wanted, url)
    t = pq.read_table(path, filesystem=fs, columns=wanted, filters=filters)
    holed = next((c for c in wanted if not specs[c]["nullable"] and t[c].null_count), None)
    if holed is not None:
        raise UserError(f"{url}: column {holed!r} has {t[holed].null_count} null(s), which the contract rules out")
    masked = {typ: pd.api.types.pandas_dtype(_NULLABLE[name]) for name, typ in _SCALARS.items() if name in _NULLABLE}
    return pd.DataFrame({c: _series(t[c], pandas_dtype(specs[c]["type"], specs[c]["nullable"]), masked)
                         for c in wanted})


def _table_url(dst: str, table: str) -> str:
    """Where ``table`` lives: ``dst`` when it names a ``.parquet`` file, else its contract path under ``dst``."""
    if str(dst).endswith(".parquet"):
        return str(dst)
    rel = relpath(table)
    if "<" in rel:
        raise UserError(f"{table} files are named {rel}: give the file itself, not its folder")
    return f"{str(dst).rstrip('/')}/{rel}"


def _check(got: pa.Schema, table: str, wanted: list[str], url: str) -> None:
    """Refuse a file with columns outside the contract, or without a wanted column of the contract's type."""
    want = schema(table)
    extra = [n for n in got.names if n not in want.names]
    if extra:
        raise UserError(f"{url} has column {extra[0]!r}, which the {table} table of the manifest contract does not: "
                        "not a file of that table")
    for name in wanted:
        if name not in got.names:
            raise UserError(f"{url} has no column {name!r}: not a file of the manifest contract")
        if not got.field(name).type.equals(want.field(name).type):
            raise UserError(f"{url}: column {name!r} is {got.field(name).type}, the contract says "
                            f"{want.field(name).type}")


def _series(col: pa.ChunkedArray, dtype: str, masked: dict) -> pandas.Series:
    """One column as ``dtype``, read through pandas' masked types (so a nullable int never passes float64)."""
    import pandas as pd

    if dtype == "object":
        return pd.Series(col.to_pylist(), dtype=object)
    return col.to_pandas(types_mapper=masked.get).astype(dtype)


_EXAMPLES = '''```python
from sysu30k import manifests

images = manifests.read("DST", "images")              # folder, pid: Int32 and camid: Int8, <NA> where null
query = manifests.read("s3://bucket/dst", "images", columns=["key", "pid", "camid"],
                       filters=[("subset", "=", "query")], storage_options={"profile": "research"})
bags = manifests.read("DST", "bags")                  # label, folders: Python lists
per_query = manifests.read("RUN", "per_query")        # a run folder of sysu30k eval, or any .parquet file itself
```

The same tables without sysu30k. DuckDB (in SQL, quote `"offset"`: it is a reserved word there):

```python
duckdb.sql("""SELECT key, shard, "offset", size FROM 'DST/manifests/images.parquet' WHERE subset = 'query'""").df()
```

polars (nullable integers stay integers with nulls):

```python
pl.read_parquet("DST/manifests/images.parquet").filter(pl.col("subset") == "query").select("key", "shard", "offset")
```'''


def markdown_section() -> list[str]:
    """The README section on reading the tables: the dtypes of :func:`read`, generated from the contract's
    column types, and the pandas, DuckDB and polars calls."""
    used = sorted({(c["type"], c["nullable"]) for t in contract()["tables"].values() for c in t["columns"]})
    out = ["## Reading the tables", "",
           "`sysu30k.manifests.read(DST, TABLE, columns=None, filters=None, storage_options=None)` reads a table "
           "(DST a local path or an fsspec URL) into a pandas DataFrame whose dtypes follow this contract, where "
           "`pandas.read_parquet` gives float64 for a nullable integer column. An unknown table, or a file whose "
           "columns or types differ from the contract, is refused in one line.", "",
           "| contract type | nullable | pandas dtype |", "|---|---|---|"]
    out += [f"| {typ} | {'yes' if nullable else 'no'} | `{pandas_dtype(typ, nullable)}`"
            f"{' (Python lists)' if typ.startswith('list<') else ''} |" for typ, nullable in used]
    return [*out, "", "Strings come as pandas' `str` dtype (pandas 3; `object` holding `str` before).", "",
            _EXAMPLES, ""]
