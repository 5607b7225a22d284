"""The manifest contract: Parquet schemas loaded from ``schema.toml`` beside this file.

This folder is the package ``sysu30k.manifests`` (see pyproject.toml). ``schema(name)`` gives the
pyarrow schema of a table; ``read(DST, name)`` reads it into pandas with the contract's dtypes (module
``reader``, imported on first use); ``markdown()`` renders the documentation kept in ``README.md``.
"""

from __future__ import annotations

import functools
import re
import tomllib
from importlib import resources

import pyarrow as pa

from ..lazy import exports

__getattr__ = exports(__name__, {"read": "reader", "pandas_dtype": "reader"})

_SCALARS = {
    "string": pa.string(), "bool": pa.bool_(), "int8": pa.int8(), "int16": pa.int16(),
    "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(),
}
_LIST = re.compile(r"^list<(\w+)>$")


def _arrow_type(spec: str) -> pa.DataType:
    m = _LIST.match(spec)
    return pa.list_(_SCALARS[m[1]]) if m else _SCALARS[spec]


@functools.cache
def contract() -> dict:
    """The parsed contract: ``{"version": int, "tables": {name: {file, doc, columns}}}``."""
    return tomllib.loads(resources.files(__name__).joinpath("schema.toml").read_text("utf-8"))


@functools.cache
def schema(table: str) -> pa.Schema:
    """The pyarrow schema of manifest ``table`` (images, bags, shards, rejects)."""
    spec = contract()["tables"][table]
    fields = [pa.field(c["name"], _arrow_type(c["type"]), nullable=c["nullable"]) for c in spec["columns"]]
    return pa.schema(fields, metadata={"sysu30k.table": table, "sysu30k.version": str(contract()["version"])})


def _layout(name: str) -> str:
    return contract()["layout"][name]["path"]


SHARD_DIR = _layout("shards")
PARTS_DIR = _layout("parts")
PLAN_DIR = _layout("plan")
SUMMARY = _layout("summary")
SPLIT_SUMMARY = _layout("split_summary")
LOCK = _layout("lock")
SHARD_NAME = re.compile(contract()["layout"]["shards"]["name"])      # what a shard name in a manifest must be


def relpath(table: str) -> str:
    """Where ``table`` lives, relative to the dataset root DST."""
    return contract()["tables"][table]["file"]


def tables() -> list[str]:
    """The manifest tables, in contract order."""
    return list(contract()["tables"])


def markdown() -> str:
    """The contract as Markdown (the content of manifests/README.md)."""
    out = ["# Manifest contract", "",
           f"Generated from `schema.toml` (version {contract()['version']}) by `python -m sysu30k.manifests`; "
           "do not edit by hand.", "",
           "A dataset root DST written by `sysu30k shard` holds the tables below and these paths:", "",
           "| path | what |", "|---|---|"]
    out += [f"| `{e['path']}` | {e['doc']} |" for e in contract()["layout"].values()]
    out.append("")
    for name, spec in contract()["tables"].items():
        out += [f"## {name} (`{spec['file']}`)", "", spec["doc"], "",
                "| column | type | nullable | meaning |", "|---|---|---|---|"]
        out += [f"| `{c['name']}` | {c['type']} | {'yes' if c['nullable'] else 'no'} | {c['doc']} |"
                for c in spec["columns"]]
        out.append("")
    from .reader import markdown_section

    return "\n".join(out + markdown_section())
