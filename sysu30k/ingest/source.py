"""SRC as the layout walk sees it: the extracted tree, the release's tar parts, or both at once.

The download keeps its images in ``train/*_partN.tar`` and ``test/*.tar``. Their members are indexed once
(:mod:`.members`) and laid over the extracted files as one tree, so planning walks the same folders in the
same order either way and the shards come out byte for byte the same. A member's path inside its archive
starts with a prefix that is detected per archive (``sysu_train_set_all/…``, ``./…``, one extra top
folder, or nothing in front of the folders when the archive's name says what it holds). A file that is both
extracted and in an archive, or in two archives, is packed once; the other copies are rejects.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..io.storage import Entry, Storage
from ..release.constants import ARCHIVE_SEP, TEST_DIR, TRAIN_DIR
from .members import BAD_NAME, DIR, FILE, ArchiveIndex, Damage

ARCHIVE_FOLDERS = ("", "train", "test")      # where the download keeps its archives (relative to SRC)
_ROOTS = (TRAIN_DIR, TEST_DIR)
_PREFIX = re.compile(r"^(?P<pre>(?:\./)*(?:[^/]+/)?)(?:" + "|".join(map(re.escape, _ROOTS)) + ")/")
_DAMAGED = 9                                 # row kind of the member a damage cuts (beyond the index's kinds)


def find_archives(src: Storage) -> list[str]:
    """The ``.tar`` files at SRC's root, in ``train/`` and in ``test/``, in natural order (part2 < part10)."""
    if not src.isdir(""):
        raise UserError(f"source {src.url} is not a folder")
    found = []
    for folder in ARCHIVE_FOLDERS:
        if folder and not src.isdir(folder):
            continue
        for e in src.listdir(folder):
            if not e.is_dir and e.problem is None and e.name.lower().endswith(".tar"):
                found.append(f"{folder}/{e.name}" if folder else e.name)
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def archive_path(archive: str, member: str) -> str:
    """The ``path`` column of an image packed from ``member`` of ``archive``."""
    return f"{archive}{ARCHIVE_SEP}{member}"


def _implied_root(archive: str) -> str | None:
    """The subset root an archive holds by its name, for members stored without it (``0000000001/…``)."""
    name = archive.rsplit("/", 1)[-1].lower()
    return TRAIN_DIR if "train" in name else TEST_DIR if "test" in name else None


_SAMPLE = 100_000      # file members the prefix of an archive is detected from


class Placement(NamedTuple):
    """How the members of one archive map to the extracted tree: ``strip`` is removed from the front of the
    names that start with it, ``add`` is put in front of every name (the root an archive's name implies)."""

    strip: str
    add: str


def placement(archive: str, names: pa.Array, kinds: pa.Array) -> Placement:
    """The placement most of the archive's files agree on (a UserError when none can be told)."""
    files = names.filter(pc.equal(kinds, FILE)).slice(0, _SAMPLE)
    if len(files) == 0:
        return Placement("", "")
    found = pc.struct_field(pc.extract_regex(files, _PREFIX.pattern), "pre").drop_null()
    if len(found):
        counts = pc.value_counts(found)
        return Placement(counts.field("values")[int(np.argmax(counts.field("counts").to_numpy()))].as_py(), "")
    root = _implied_root(archive)
    if root is None:
        raise UserError(f"cannot tell where the members of {archive} belong: none is under "
                        f"{TRAIN_DIR}/ or {TEST_DIR}/ (the first is {files[0].as_py()!r})")
    leading = pc.struct_field(pc.extract_regex(files, r"^(?P<dot>(?:\./)*)"), "dot")
    counts = pc.value_counts(leading)
    return Placement(counts.field("values")[int(np.argmax(counts.field("counts").to_numpy()))].as_py(), root + "/")


def logical_paths(names: pa.Array, where: Placement) -> tuple[pa.Array, pa.Array]:
    """Where each member sits in the extracted tree, and which members are not ``where.strip + name``
    (their names are kept apart: all others are rebuilt from the tree path)."""
    placed = pc.starts_with(names, where.strip) if where.strip else pa.array(np.ones(len(names), bool))
    bare = names
    if where.strip:
        stripped = pc.replace_substring(names, where.strip, "", max_replacements=1)
        bare = pc.if_else(placed, stripped, pc.replace_substring_regex(names, r"^(?:\./)+", ""))
    paths = pc.binary_join_element_wise(where.add, bare, "") if where.add else bare
    return paths, pc.invert(placed)


def _with_damaged(index: ArchiveIndex, members: pa.Table) -> pa.Table:
    """The ``members`` of ``index``, and the member its damage cuts (kind _DAMAGED) when there is one."""
    if index.damage is None or index.damage.member is None:
        return members
    cut = pa.table({"name": [index.damage.member], "offset": pa.array([index.damage.offset], pa.int64()),
                    "size": pa.array([0], pa.int64()), "kind": pa.array([_DAMAGED], pa.int8())})
    return pa.concat_tables([members, cut.cast(members.schema)])


def _role(archive: str, paths: pa.Array) -> set[str]:
    """The subset roots an archive holds (by its members, else by its name; both when neither tells)."""
    roots = {r for r in _ROOTS if pc.any(pc.starts_with(paths, r + "/")).as_py()} if len(paths) else set()
    implied = _implied_root(archive)
    return roots or ({implied} if implied else set(_ROOTS))


class Source:
    """The storage at SRC with the members of its archives laid over its extracted files, read-only.

    Offers what planning needs of a tree (``listdir``, ``listdir_many``, ``isdir`` and reads of the files at
    the root); :attr:`duplicates` collects the copies that are not packed, as they are listed. The member
    table of each of ``indexes`` comes from ``members_of`` (default: the one it holds) when it is laid out,
    and is released right after, so only one archive's index is in memory besides the layout.
    """

    def __init__(self, storage: Storage, indexes: list[ArchiveIndex],
                 members_of: Callable[[ArchiveIndex], pa.Table] = lambda index: index.members):
        self.storage = storage
        self.url = storage.url
        self.archives = [{"path": i.path, "bytes": i.bytes, "members": i.count,
                          "damage": dataclasses.asdict(i.damage) if i.damage else None} for i in indexes]
        self.duplicates: dict[str, tuple[str, str]] = {}     # path of a copy not packed -> (its folder, why)
        self._paths = [i.path for i in indexes]
        self._cuts = {j: i.damage for j, i in enumerate(indexes) if i.damage is not None}
        self._damage: dict[str, list[tuple[str, Damage]]] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        self._children: dict[str, set[str]] = {}
        self._renamed: dict[tuple[int, int], str] = {}     # (archive, row) -> a member name not strip + path
        self._strip: list[str] = []
        self._add: list[str] = []
        self._rows: pa.Table | None = None
        self._order: np.ndarray | None = None
        if indexes:
            self._lay_out(indexes, members_of)
        self._real_roots = {r for r in _ROOTS if storage.isdir(r)} if self._rows is not None else set(_ROOTS)

    def _lay_out(self, indexes: list[ArchiveIndex], members_of: Callable[[ArchiveIndex], pa.Table]) -> None:
        """Group every member (and every damaged one) by folder, in archive order within it: one table in
        archive order and the permutation that sorts it by folder (no second copy of the table)."""
        codes_of: dict[str, int] = {}
        folders: set[str] = set()
        chunks, codes = [], []
        for i, index in enumerate(indexes):
            members = _with_damaged(index, members_of(index))
            names, kinds = members["name"].combine_chunks(), members["kind"].combine_chunks()
            where = placement(self._paths[i], names, kinds)
            self._strip.append(where.strip)
            self._add.append(where.add)
            paths, renamed = logical_paths(names, where)
            for row in np.flatnonzero(renamed.to_numpy(zero_copy_only=False)):
                self._renamed[(i, int(row))] = names[int(row)].as_py()
            del names
            if i in self._cuts:
                for root in _role(self._paths[i], paths):
                    self._damage.setdefault(root, []).append((self._paths[i], self._cuts[i]))
            folders.update(paths.filter(pc.equal(kinds, DIR)).to_pylist())      # folder members, empty ones too
            split = pc.split_pattern(pc.binary_join_element_wise("/", paths, ""), "/", max_splits=1, reverse=True)
            del paths
            dirs = pc.utf8_slice_codeunits(pc.list_element(split, 0), 1).dictionary_encode()
            local = np.array([codes_of.setdefault(d, len(codes_of)) for d in dirs.dictionary.to_pylist()], np.int32)
            codes.append(local[dirs.indices.to_numpy(zero_copy_only=False)] if len(local) else
                         np.zeros(0, np.int32))
            chunks.append(pa.table({
                "base": pc.list_element(split, 1), "archive": pa.array(np.full(len(kinds), i, np.int16)),
                "row": pa.array(np.arange(len(kinds), dtype=np.int32)), "offset": members["offset"],
                "size": members["size"], "kind": kinds}))
            del split, dirs, members
        self._rows = pa.concat_tables(chunks)
        all_codes = np.concatenate(codes)
        self._order = np.argsort(all_codes, kind="stable").astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(np.bincount(all_codes, minlength=len(codes_of)))])
        self._ranges = {f: (int(starts[c]), int(starts[c + 1])) for f, c in codes_of.items()
                        if starts[c + 1] > starts[c]}
        for folder in folders | set(self._ranges):
            while folder:
                parent, _, name = folder.rpartition("/")
                self._children.setdefault(parent, set()).add(name)
                folder = parent

    def _member(self, archive: int, row: int, folder: str, base: str) -> str:
        """The name in its archive of the member at ``folder/base`` of the tree."""
        renamed = self._renamed.get((archive, row))
        if renamed is not None:
            return renamed
        path = f"{folder}/{base}" if folder else base
        return self._strip[archive] + path[len(self._add[archive]):]

    def _virtual(self, rel: str) -> list[Entry]:
        """The entries archives put in folder ``rel``: members, then the folders below it."""
        out = [Entry(name, True, 0) for name in sorted(self._children.get(rel, ()))]
        start, end = self._ranges.get(rel, (0, 0))
        if start == end:
            return out
        rows = self._rows.take(pa.array(self._order[start:end]))
        for base, archive, row, offset, size, kind in zip(*(rows[c].to_pylist() for c in (
                "base", "archive", "row", "offset", "size", "kind"))):
            if kind == DIR:
                continue
            path, member = self._paths[archive], self._member(archive, row, rel, base)
            if kind == FILE:
                out.append(Entry(base, False, size, None, None, path, member, offset))
            elif kind == _DAMAGED:
                damage = self._cuts[archive]
                out.append(Entry(base, False, 0, "archive-truncated", f"{path} is cut at byte {damage.offset} "
                                 f"({damage.reason})", path, member, offset))
            else:
                problem = "bad-name" if kind == BAD_NAME else "link-member"
                out.append(Entry(base, False, size, problem, None, path, member, offset))
        return out

    def _merged(self, rel: str, real: list[Entry]) -> list[Entry]:
        """``real`` entries of folder ``rel`` and the archives' ones, one per name: the first found is kept."""
        kept: dict[str, Entry] = {e.name: e for e in real}
        for e in self._virtual(rel):
            first = kept.get(e.name)
            if first is None:
                kept[e.name] = e
            elif not (first.is_dir and e.is_dir):
                where = (archive_path(first.archive, first.member) if first.archive
                         else f"{rel}/{first.name}" if rel else first.name)
                self.duplicates[archive_path(e.archive, e.member)] = (rel, f"a second copy of {where}, which is "
                                                                      "packed")
        return sorted(kept.values(), key=lambda e: e.name)

    def _has_real(self, rel: str) -> bool:
        return any(rel == r or rel.startswith(r + "/") for r in self._real_roots) or rel == ""

    def listdir(self, rel: str = "") -> list[Entry]:
        """Entries of folder ``rel``, sorted by name."""
        return next(self.listdir_many([rel])) if self._rows is not None else self.storage.listdir(rel)

    def listdir_many(self, rels: Iterable[str]) -> Iterator[list[Entry] | OSError]:
        """``listdir`` of each of ``rels`` in order (an OSError where a real folder cannot be listed)."""
        if self._rows is None:
            yield from self.storage.listdir_many(rels)
            return
        rels = list(rels)
        real = self.storage.listdir_many([r for r in rels if self._has_real(r)])
        for rel in rels:
            listing = next(real) if self._has_real(rel) else []
            if isinstance(listing, FileNotFoundError) and self._is_virtual_dir(rel):
                listing = []
            yield listing if isinstance(listing, OSError) else self._merged(rel, listing)

    def _is_virtual_dir(self, rel: str) -> bool:
        return rel in self._ranges or rel in self._children

    def isdir(self, rel: str) -> bool:
        return (self._rows is not None and self._is_virtual_dir(rel)) or self.storage.isdir(rel)

    def exists(self, rel: str) -> bool:
        return self.storage.exists(rel)

    def is_regular_file(self, rel: str) -> bool:
        return self.storage.is_regular_file(rel)

    def open(self, rel: str) -> IO:
        return self.storage.open(rel)

    def read(self, rel: str) -> bytes:
        return self.storage.read(rel)

    def damaged(self, subset_root: str) -> list[str]:
        """How each damaged archive that may hold files under ``subset_root`` is cut (empty when none is)."""
        return [f"{path} is cut at byte {d.offset}" for path, d in self._damage.get(subset_root.split("/", 1)[0], [])]

    def missing(self, subset_root: str, listed_in: str) -> tuple[str, str]:
        """The reject reason and detail of a file the list ``listed_in`` names but SRC lacks: when an archive
        that holds ``subset_root`` is damaged the file may have been past the damage (archive-truncated)."""
        if damaged := self.damaged(subset_root):
            return "archive-truncated", f"listed in {listed_in} but not found: {'; '.join(damaged)}"
        return "listed-missing", f"listed in {listed_in} but not found in SRC"
