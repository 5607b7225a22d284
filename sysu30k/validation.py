"""Scoring a model on an evaluation split of DST (``val`` during training, ``test`` for the final number).

The split manifest written by ``sysu30k split`` says which images are queries and which gallery, with
their identities and cameras; val images live in the training shards, test images in the query and
gallery shards. Features are extracted as the official evaluator makes them (flip-summed, L2-normalised).
"""

from __future__ import annotations

import torch

from . import manifests
from .loader import EvalLoader, LoaderOptions, TransformSpec
from .storage import Storage


def split_rows(dst: Storage, split: str) -> dict[str, dict] | None:
    """{role: {key: (pid, camid)}} of ``split``, or None when DST has no such split."""
    rel = manifests.relpath("split")
    if not dst.exists(rel):
        return None
    rows = dst.read_table(rel, columns=["split", "role", "key", "pid", "camid"],
                          filters=[("split", "=", split)]).to_pylist()
    if not rows:
        return None
    out: dict[str, dict] = {"query": {}, "gallery": {}}
    for r in rows:
        out[r["role"]][r["key"]] = (r["pid"], r["camid"])
    return out


def evaluate_split(model: torch.nn.Module, dst_url: str, split: str, device: torch.device, height: int = 256,
                   width: int = 128, batch: int = 128, workers: int = 2, storage_options: dict | None = None,
                   flip: bool = True) -> dict | None:
    """The summary metrics (rank-1/5/10/20, both mAPs) of ``model`` on ``split``; None without it."""
    from .evaluation.features import extract_features
    from .evaluation.scoring import score

    rows = split_rows(Storage(dst_url, storage_options), split)
    if rows is None or not rows["query"]:
        return None
    options = LoaderOptions(workers=workers, storage_options=storage_options or {})
    spec = TransformSpec(height=height, width=width, train=False)
    feats = {}
    for role, subset in (("query", "train" if split == "val" else "query"),
                         ("gallery", "train" if split == "val" else "gallery")):
        keys = frozenset(rows[role])
        loader = EvalLoader(dst_url, subset, batch, spec, options, flip=flip, keys=keys)
        f, got, _, _ = extract_features(model, loader, device, flip=flip)
        feats[role] = (f, list(got))
    q, g = feats["query"], feats["gallery"]
    qp = torch.tensor([rows["query"][k][0] for k in q[1]])
    qc = torch.tensor([rows["query"][k][1] for k in q[1]])
    gp = torch.tensor([rows["gallery"][k][0] for k in g[1]])
    gc = torch.tensor([rows["gallery"][k][1] for k in g[1]])
    return score(q[0], qp, qc, g[0], gp, gc, query_keys=q[1], gallery_keys=g[1], device=device).summary()
