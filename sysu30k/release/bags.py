"""Bags: sets of consecutive training folders sharing one weak label (SYSU30K.md §1.4).

A bag is either read from ``bag_level_label.json`` or built by the consecutive-folder rule: for the
folder at position k of the sorted training folders, windows of 1, 3 and 5 folders centred on k,
clipped at both ends (so a label can repeat an id, e.g. [1, 1, 2], as the official sampler does).
Labels are the folders' numeric ids; the training class of an image is ``folder_id - 1``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import UserError
from .constants import BAG_WINDOWS, TRAIN_FOLDER_DIGITS


@dataclass(frozen=True)
class Bag:
    """One weakly labelled bag: its id, its label (folder ids, with repeats) and its folders."""

    bag_id: str
    label: tuple[int, ...]
    folders: tuple[str, ...]


def bag_id(folder_id: int, window_index: int) -> str:
    """The released naming: bag number 3*k + {0,1,2} for the 1/3/5-folder windows of folder k."""
    return f"bag{len(BAG_WINDOWS) * folder_id + window_index:010d}"


def consecutive_bags(folders: Sequence[str]) -> list[Bag]:
    """Bags of the consecutive-folder rule over ``folders`` (numeric names, sorted by id)."""
    ids = [int(f) for f in folders]
    n = len(folders)
    bags = []
    for pos, fid in enumerate(ids):
        for w_index, window in enumerate(BAG_WINDOWS):
            half = window // 2
            members = [min(max(pos + d, 0), n - 1) for d in range(-half, half + 1)]
            bags.append(Bag(bag_id(fid, w_index), tuple(ids[m] for m in members),
                            tuple(folders[m] for m in members)))
    return bags


_FOLDER_GLOB = re.compile(r"^(?P<folder>[^/*]+)/\*$")


def parse_bag_json(text: str) -> list[Bag]:
    """Bags from the released ``bag_level_label.json`` (a list of {BagID, BagLabel, BagImages})."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"bag_level_label.json is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise UserError("bag_level_label.json must hold a JSON list of bag records")
    bags = []
    for i, rec in enumerate(records):
        try:
            folders = []
            for pattern in rec["BagImages"]:
                m = _FOLDER_GLOB.match(pattern)
                if not m:
                    raise ValueError(f"BagImages entry {pattern!r} is not of the form 'FOLDER/*'")
                folders.append(m["folder"])
            labels = tuple(rec["BagLabel"])
            bad = next((x for x in labels if isinstance(x, bool) or not isinstance(x, int)
                        or not 0 < x < 10 ** TRAIN_FOLDER_DIGITS), None)
            if bad is not None or not labels:
                raise ValueError(f"BagLabel {bad!r} is not a training folder id (1 .. 10^{TRAIN_FOLDER_DIGITS} - 1)"
                                 if labels else "BagLabel is empty")
            bags.append(Bag(str(rec["BagID"]), labels, tuple(folders)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"bag_level_label.json record {i} is malformed: {exc}") from None
    return bags


def bags_to_json(bags: Iterable[Bag]) -> str:
    """Serialise bags in the released ``bag_level_label.json`` format."""
    return json.dumps([{"BagLabel": list(b.label), "BagID": b.bag_id,
                        "BagImages": [f"{f}/*" for f in b.folders]} for b in bags])


def train_folder_name(folder_id: int) -> str:
    """The released training folder name of a numeric id (10 digits, zero-padded)."""
    return f"{folder_id:0{TRAIN_FOLDER_DIGITS}d}"
