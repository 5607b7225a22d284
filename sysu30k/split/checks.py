"""Invariants of a query/gallery split: small pure functions over pandas frames, no Dask, no I/O.

A split frame has one row per image with the columns of the ``split`` manifest table that matter here:
``role`` (query|gallery), ``key``, ``pid``, ``camid``, ``distractor`` and ``path``. Every check returns a
list of :class:`Finding` (empty when the invariant holds); a finding names the invariant, says in one
line what is wrong, and carries the exact number of offenders with up to :data:`EXAMPLES` of them
(source paths, or identities where no file exists). The invariants follow the official protocol
(SYSU30K.md §2): exactly one query per identity; every query identity has a true match in the gallery
under a different camera; distractors never share an identity with a query; no key in both roles.

The checks are exact on any frame that holds *every* row of each identity they look at, which is what
:func:`sysu30k.split.build` feeds them from Dask: all queries, all non-distractor gallery rows, distractors
whose pid is not the distractor label, and every row of a duplicated key (ordinary distractors cannot
break any invariant once the queries are known to carry real identities).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..release.constants import DISTRACTOR_PID

EXAMPLES = 10
_NORMALISED = "sysu30k.split.checks.normalised"
SPLIT_COLUMNS = ("role", "key", "pid", "camid", "distractor", "path")

#: invariant name -> what it means (also the order findings are reported in)
INVARIANTS = {
    "query-identity": "every query shows a real identity (not a distractor, pid set)",
    "duplicate-query": "exactly one query per identity (val: at most --val-queries)",
    "missing-true-match": "every query identity has a true match in the gallery",
    "same-camera-match": "a query's true matches include one under a different camera",
    "distractor-identity": "distractors never share an identity with a query",
    "orphan-gallery": "every non-distractor gallery image is a true match of some query",
    "key-in-both-roles": "no key is both a query and a gallery image",
    "duplicate-key": "no key appears twice in one role",
    "expected-count": "the split has the expected number of queries and gallery images",
}


@dataclass(frozen=True)
class Finding:
    """A broken invariant of one split: what, a one-line message, how many offenders, a few of them."""

    split: str
    invariant: str
    message: str
    count: int
    examples: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["examples"] = list(self.examples)
        return d

    def line(self) -> str:
        """The finding as one log line: ``split/invariant: message``."""
        return f"{self.split}/{self.invariant}: {self.message}"


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _examples(values: Sequence) -> tuple[str, ...]:
    return tuple(str(v) for v in list(values)[:EXAMPLES])


def _finding(split: str, invariant: str, count: int, what: str, examples: Sequence) -> Finding:
    ex = _examples(examples)
    more = f" (+{count - len(ex)} more)" if count > len(ex) else ""
    return Finding(split, invariant, f"{what}: {', '.join(ex)}{more}" if ex else what, count, ex)


def _normalise(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.attrs.get(_NORMALISED):
        return rows
    missing = [c for c in SPLIT_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"split frame lacks columns {missing}")
    out = rows[list(SPLIT_COLUMNS)].copy()
    out["pid"] = out["pid"].astype("Int64")
    out["camid"] = out["camid"].astype("Int64")
    out["distractor"] = out["distractor"].fillna(False).astype(bool)
    out = out.sort_values(["role", "path", "key"], kind="stable").reset_index(drop=True)
    out.attrs[_NORMALISED] = True
    return out


def _valid_queries(rows: pd.DataFrame) -> pd.DataFrame:
    q = rows[rows["role"] == "query"]
    return q[q["pid"].notna() & (q["pid"] != DISTRACTOR_PID) & ~q["distractor"]]


def check_query_identity(rows: pd.DataFrame, split: str) -> list[Finding]:
    """Queries must carry a real identity: not flagged distractor, pid set and not the distractor label."""
    rows = _normalise(rows)
    q = rows[rows["role"] == "query"]
    bad = q[q["pid"].isna() | (q["pid"] == DISTRACTOR_PID) | q["distractor"]]
    if bad.empty:
        return []
    return [_finding(split, "query-identity", len(bad),
                     f"{_plural(len(bad), 'query', 'queries')} without a real identity (distractor or no pid)",
                     bad["path"])]


def check_duplicate_queries(rows: pd.DataFrame, split: str, per_id: int = 1) -> list[Finding]:
    """At most ``per_id`` queries per identity (one in the official protocol): names every query of an
    identity that has more."""
    q = _valid_queries(_normalise(rows))
    sizes = q.groupby("pid")["path"].transform("size")
    dup = q[sizes > per_id]
    if dup.empty:
        return []
    ids = dup["pid"].nunique()
    return [_finding(split, "duplicate-query", ids,
                     f"{_plural(ids, 'identity', 'identities')} with more than "
                     f"{'one query' if per_id == 1 else f'{per_id} queries'} "
                     f"({len(dup):,} query images)", [f"{p} (pid {i})" for p, i in zip(dup["path"], dup["pid"])])]


def check_true_matches(rows: pd.DataFrame, split: str) -> list[Finding]:
    """Every query has a non-distractor gallery image of its identity, and one under another camera.

    Two findings: ``missing-true-match`` (no gallery image of the identity at all) and
    ``same-camera-match`` (true matches exist but all share the query's camera, so the official
    evaluator would count them as junk and the query could never score). A null camera never counts
    as a different one.
    """
    rows = _normalise(rows)
    q = _valid_queries(rows)
    if q.empty:
        return []
    g = rows[(rows["role"] == "gallery") & ~rows["distractor"] & rows["pid"].notna()]
    n_true = g.groupby("pid").size()
    cams = g.groupby("pid")["camid"].agg(lambda s: set(s.dropna().tolist()))
    missing, same = [], []
    for path, pid, cam in zip(q["path"], q["pid"], q["camid"]):
        if n_true.get(pid, 0) == 0:
            missing.append(f"{path} (pid {pid})")
        elif pd.isna(cam) or not (cams[pid] - {cam}):
            same.append(f"{path} (pid {pid}, camera {'?' if pd.isna(cam) else cam}; "
                        f"gallery cameras {sorted(cams[pid]) or '?'})")
    out = []
    if missing:
        out.append(_finding(split, "missing-true-match", len(missing),
                            f"{_plural(len(missing), 'query', 'queries')} without a true match in the gallery",
                            missing))
    if same:
        out.append(_finding(split, "same-camera-match", len(same),
                            f"{_plural(len(same), 'query', 'queries')} whose true matches are all under the "
                            "query's own camera", same))
    return out


def check_distractors(rows: pd.DataFrame, split: str) -> list[Finding]:
    """No distractor carries the identity of a query."""
    rows = _normalise(rows)
    qids = set(_valid_queries(rows)["pid"].tolist())
    d = rows[rows["distractor"] & rows["pid"].isin(qids)]
    if d.empty:
        return []
    return [_finding(split, "distractor-identity", len(d),
                     f"{_plural(len(d), 'distractor')} sharing an identity with a query",
                     [f"{p} (pid {i})" for p, i in zip(d["path"], d["pid"])])]


def check_orphans(rows: pd.DataFrame, split: str) -> list[Finding]:
    """Every non-distractor gallery image is a true match of some query (else: an extra file)."""
    rows = _normalise(rows)
    qids = set(_valid_queries(rows)["pid"].tolist())
    g = rows[(rows["role"] == "gallery") & ~rows["distractor"]]
    bad = g[~g["pid"].isin(qids) | g["pid"].isna()]
    if bad.empty:
        return []
    return [_finding(split, "orphan-gallery", len(bad),
                     f"{_plural(len(bad), 'gallery image')} neither a distractor nor a true match of any query",
                     [f"{p} (pid {i})" for p, i in zip(bad["path"], bad["pid"])])]


def check_keys(rows: pd.DataFrame, split: str) -> list[Finding]:
    """No key in both roles (``key-in-both-roles``), none twice in one role (``duplicate-key``)."""
    rows = _normalise(rows)
    roles = rows.groupby("key")["role"].agg(["nunique", "size"])
    both = roles.index[roles["nunique"] > 1]
    twice = roles.index[(roles["nunique"] == 1) & (roles["size"] > 1)]
    out = []
    if len(both):
        r = rows[rows["key"].isin(both)]
        out.append(_finding(split, "key-in-both-roles", len(both),
                            f"{_plural(len(both), 'key')} both a query and a gallery image",
                            [f"{k} ({', '.join(g['role'] + ' ' + g['path'])})" for k, g in r.groupby("key")]))
    if len(twice):
        r = rows[rows["key"].isin(twice)]
        out.append(_finding(split, "duplicate-key", len(twice),
                            f"{_plural(len(twice), 'key')} appearing twice in one role",
                            [f"{k} ({', '.join(g['path'])})" for k, g in r.groupby("key")]))
    return out


def check_split(rows: pd.DataFrame, split: str, queries_per_id: int = 1) -> list[Finding]:
    """Every invariant of :data:`INVARIANTS` but ``expected-count``, in that order (``queries_per_id``: the
    queries an identity may have; val folders may give several)."""
    rows = _normalise(rows)
    return (check_query_identity(rows, split) + check_duplicate_queries(rows, split, queries_per_id)
            + check_true_matches(rows, split) + check_distractors(rows, split) + check_orphans(rows, split)
            + check_keys(rows, split))


def check_counts(split: str, queries: int, gallery: int, expected: tuple[int, int] | None,
                 rows: pd.DataFrame | None = None, official_ids: range | None = None,
                 distractor_numbers: np.ndarray | None = None) -> list[Finding]:
    """The split has ``expected`` = (queries, gallery images); on a deviation, name the files if possible.

    ``rows`` (queries and non-distractor gallery rows) and ``official_ids`` (the released test identities)
    let the message name identities with no query or no true match and files of identities outside the
    range; ``distractor_numbers`` (the K of every ``0000others_c1_K.jpg``) names distractors numbered past
    the expected count or twice, and numbers missing from 1..expected distractors (the release appears
    to number them consecutively from 1; SYSU30K.md §1.3).
    """
    if expected is None or (queries, gallery) == tuple(expected):
        return []
    eq, eg = expected
    notes: list[str] = []
    if rows is not None and official_ids is not None:
        rows = _normalise(rows)
        ids = np.asarray(official_ids)
        q = rows[rows["role"] == "query"]
        g = rows[(rows["role"] == "gallery") & ~rows["distractor"]]
        notes += [f"no query of identity {i:09d}" for i in np.setdiff1d(ids, q["pid"].dropna().to_numpy())]
        notes += [f"no true match of identity {i:09d}" for i in np.setdiff1d(ids, g["pid"].dropna().to_numpy())]
        lo, hi = official_ids.start, official_ids.stop
        extra = pd.concat([q, g])
        extra = extra[extra["pid"].isna() | (extra["pid"] < lo) | (extra["pid"] >= hi)]
        notes += [f"extra {p} (identity outside {lo}..{hi - 1})" for p in extra["path"]]
    if distractor_numbers is not None:
        want = eg - eq
        ks = np.asarray(distractor_numbers, dtype=np.int64)
        uniq, counts = np.unique(ks, return_counts=True)
        notes += [f"distractor number {k} appears {c} times" for k, c in zip(uniq, counts) if c > 1][:EXAMPLES]
        extra = uniq[(uniq > want) | (uniq < 1)]
        notes += [f"extra distractor 0000others_c1_{k}.jpg (beyond {want:,})" for k in extra][:EXAMPLES]
        if len(uniq) < want:
            absent = np.setdiff1d(np.arange(1, want + 1), uniq)[:EXAMPLES]
            notes += [f"missing distractor 0000others_c1_{k}.jpg" for k in absent]
    what = (f"{queries:,} queries and {gallery:,} gallery images where {eq:,} and {eg:,} are expected "
            f"({queries - eq:+,} / {gallery - eg:+,})")
    ex = _examples(notes)
    more = f" (+{len(notes) - len(ex)} more)" if len(notes) > len(ex) else ""
    return [Finding(split, "expected-count", f"{what}: {', '.join(ex)}{more}" if ex else what,
                    abs(queries - eq) + abs(gallery - eg), ex)]
