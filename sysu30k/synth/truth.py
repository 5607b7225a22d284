"""The true identity of each packed training image of a synthetic dataset: ``truth.csv`` joined on the
image manifest by source path (the extracted tree's, also for images packed from the release's archives).
Only benchmarks and clustering diagnostics read it, never training."""

from __future__ import annotations

import csv
import io

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from ..release.constants import ARCHIVE_SEP, TRAIN_DIR


def _tree_path(path: str) -> str:
    """The path truth.csv names an image by: a member of an archive (ARCHIVE::[prefix]sysu_train_set_all/…)
    is named by its path in the extracted tree."""
    if ARCHIVE_SEP not in path:
        return path
    member = path.split(ARCHIVE_SEP, 1)[1]
    at = member.find(f"{TRAIN_DIR}/")
    return member[at:] if at >= 0 else member


def read_truth(truth_csv: str, dst_url: str, storage_options: dict | None = None) -> dict[str, tuple[int, int]]:
    """{sample key: (true identity, folder id)} for every training image of DST listed in ``truth_csv``."""
    dst = Storage(dst_url, storage_options or {})
    rows = dst.read_table(manifests.relpath("images"), columns=["key", "path"], filters=[("subset", "=", "train")])
    key_of = {_tree_path(p): k for p, k in zip(rows["path"].to_pylist(), rows["key"].to_pylist())}
    try:
        with open(truth_csv, newline="") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"cannot read {truth_csv}: {exc.strerror}") from None
    out = {}
    for r in csv.DictReader(io.StringIO(text)):
        try:
            if r["path"] in key_of:
                out[key_of[r["path"]]] = (int(r["true_id"]), int(r["folder_id"]))
        except (KeyError, ValueError):
            raise UserError(f"{truth_csv} is not a synth truth.csv (path,true_id,folder_id)") from None
    if not out:
        raise UserError(f"{truth_csv} names none of the training images of {dst_url}")
    return out
