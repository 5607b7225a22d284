"""Read the released SYSU-30k tree: what is on disk, what it is, and how it differs from meta/*.txt.

Disk is the truth (the official evaluator walks folders too); the list of a subset (``meta/<subset>.txt``
in the extracted tree, ``<subset>.txt`` at the root of the download) is read, intersected with the files
found, and the differences reported: files listed but missing become rejects (``listed-missing``, or
``archive-truncated`` when a damaged archive may have held them), files on disk but unlisted are packed and
counted. SRC is a :class:`~.source.Source`: the extracted files and the members of the release's archives
as one tree. Everything streams folder by folder in sorted order, so the 29.6 M training files never sit
in memory at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import UserError
from ..io.storage import Entry
from ..release.constants import (
    DISTRACTOR_FOLDER,
    DISTRACTOR_PID,
    GALLERY_DIR,
    META_DIR,
    QUERY_DIR,
    SUBSETS,
    TEST_DIR,
    TRAIN_DIR,
)
from .config import MAX_SOURCE_BYTES
from .keys import make_key
from .source import Source, archive_path

TEST_NAME = re.compile(r"^(?P<id>\d+|0000others)_c(?P<cam>\d+)_(?P<k>\d+)\.jpe?g$", re.IGNORECASE)
_EXAMPLES = 5
PROBLEMS = {                      # the reject reason of an entry that is not read, and its detail
    "not-a-file": "a FIFO, socket or device, not a regular file",
    "symlink-outside": "a symbolic link that leads out of SRC",
    "dangling-symlink": "a symbolic link to nothing",
    "symlinked-folder": "a symbolic link to a folder (not followed: links to folders could loop)",
    "bad-name": "the file name is not UTF-8",
    "unreadable": "cannot be examined (permissions?)",
    "link-member": "a link, device or FIFO member of an archive (not followed)",
}


class SourceImage(NamedTuple):
    """One input image found on disk, with what its location says about it (a named tuple: cheap to
    build, and planning builds one per input)."""

    subset: str
    path: str                    # relative to SRC (ARCHIVE::MEMBER for a member of an archive)
    key: str
    size: int
    folder: int | None = None    # training folder id
    pid: int | None = None       # test identity (DISTRACTOR_PID for distractors)
    camid: int | None = None
    distractor: bool = False
    archive: str | None = None   # the archive it is read from, and the offset of its data there
    offset: int | None = None


class LayoutReject(NamedTuple):
    """An input the layout itself rules out (bad name, bad folder, listed but missing)."""

    subset: str
    path: str
    reason: str
    detail: str


@dataclass
class SubsetReport:
    """How the files on disk compare with ``meta/<subset>.txt`` (listed is None without a meta file)."""

    on_disk: int = 0
    listed: int | None = None
    listed_missing: int = 0
    unlisted: int = 0
    missing_examples: list[str] = field(default_factory=list)
    unlisted_examples: list[str] = field(default_factory=list)


def subset_root(subset: str) -> str:
    """Folder of ``subset`` relative to SRC."""
    return {"train": TRAIN_DIR, "query": f"{TEST_DIR}/{QUERY_DIR}", "gallery": f"{TEST_DIR}/{GALLERY_DIR}"}[subset]


class MetaList:
    """``meta/<subset>.txt`` held as sorted Arrow columns, handed out one folder at a time."""

    def __init__(self, f) -> None:
        table = pacsv.read_csv(
            f, read_options=pacsv.ReadOptions(column_names=["p"]),
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"p": pa.string()}, strings_can_be_null=False))
        paths = pc.replace_substring_regex(pc.utf8_trim_whitespace(table["p"]), r"^\./", "")
        parts = pc.extract_regex(paths, r"^(?P<folder>[^/]*)/(?P<name>.+)$")
        folder = pc.fill_null(pc.struct_field(parts, "folder"), "")
        name = pc.if_else(pc.is_null(parts), paths, pc.struct_field(parts, "name"))
        table = pa.table({"folder": folder, "name": name}).filter(pc.not_equal(name, ""))
        table = table.sort_by([("folder", "ascending"), ("name", "ascending")])
        self.count = table.num_rows
        encoded = table["folder"].combine_chunks().dictionary_encode()
        counts = np.bincount(encoded.indices.to_numpy(zero_copy_only=False), minlength=len(encoded.dictionary))
        starts = np.concatenate([[0], np.cumsum(counts)])
        self._ranges = {f: (int(starts[i]), int(starts[i + 1]))
                        for i, f in enumerate(encoded.dictionary.to_pylist())}
        self._names = table["name"].combine_chunks()

    def take(self, folder: str) -> list[str]:
        """The names listed under ``folder`` (each folder can be taken once)."""
        start, end = self._ranges.pop(folder, (0, 0))
        return self._names.slice(start, end - start).to_pylist()

    def rest(self) -> Iterator[tuple[str, list[str]]]:
        """Folders listed but never taken, with their names."""
        for folder in sorted(self._ranges):
            yield folder, self.take(folder)


def list_files(subset: str) -> tuple[str, str]:
    """Where the list of ``subset`` may be: in the extracted tree's meta/, or at the root of the download."""
    return f"{META_DIR}/{subset}.txt", f"{subset}.txt"


def _read_meta(src: Source, subset: str) -> tuple[MetaList, str] | None:
    """The list of ``subset`` and where it was found; a UserError when both places hold one."""
    found = [rel for rel in list_files(subset) if src.exists(rel)]
    if not found:
        return None
    if len(found) > 1:
        raise UserError(f"{src.url} holds two lists of {subset}, {found[0]} and {found[1]}: remove one")
    rel = found[0]
    if not src.is_regular_file(rel):
        raise UserError(f"{src.url}/{rel} is not a regular file (a FIFO, device or folder?)")
    try:
        with src.open(rel) as f:
            return MetaList(f), rel
    except pa.ArrowInvalid as exc:
        raise UserError(f"{src.url}/{rel} is not a UTF-8 list of paths: {str(exc).splitlines()[0]}") from None


def present_subsets(src: Source, subsets: tuple[str, ...] = SUBSETS) -> tuple[str, ...]:
    """The subsets of ``subsets`` whose folders exist under SRC; a UserError when there are none."""
    if not src.isdir(""):
        raise UserError(f"source {src.url} is not a folder")
    found = tuple(s for s in subsets if src.isdir(subset_root(s)))
    if not found:
        roots = ", ".join(f"{subset_root(s)}/" for s in subsets)
        raise UserError(f"{src.url} holds none of {roots}: is it the extracted SYSU-30k root?")
    return found


def _classify_test(subset: str, folder: str, name: str) -> tuple[int, int, bool] | str:
    """(pid, camid, distractor) from a test file name, or the reason it is not a valid test name."""
    m = TEST_NAME.match(name)
    if not m:
        return "name is not <id>_c<cam>_<k>.jpg"
    ident, cam = m["id"], int(m["cam"])
    if ident == DISTRACTOR_FOLDER:
        if subset != "gallery" or folder != DISTRACTOR_FOLDER:
            return f"distractors belong in gallery/{DISTRACTOR_FOLDER}/"
        return DISTRACTOR_PID, cam, True
    if folder != ident:
        return f"identity {ident} in folder {folder}"
    return int(ident), cam, False


def _stem(name: str) -> str:
    """``posixpath.splitext(name)[0]`` for a file name, at a fifth of the cost (planning calls it per file)."""
    dot = name.rfind(".")
    return name[:dot] if dot > 0 and name[:dot].lstrip(".") else name


def _origin(base: str, e: Entry) -> str:
    """The path recorded for entry ``e`` of folder ``base``: where it is in SRC, or in which archive."""
    return archive_path(e.archive, e.member) if e.archive is not None else f"{base}/{e.name}"


def _problem(subset: str, base: str, e: Entry) -> LayoutReject:
    return LayoutReject(subset, _origin(base, e), e.problem, e.detail or PROBLEMS[e.problem])


def _nested(src: Source, subset: str, rel: str) -> Iterator[LayoutReject]:
    """Rejects for everything under the nested folder ``rel`` (walked with the same safe listing)."""
    try:
        entries = src.listdir(rel)
    except OSError as exc:
        yield LayoutReject(subset, rel, "unreadable", f"folder cannot be listed: {exc.strerror or exc}")
        return
    for e in entries:
        if e.is_dir:
            yield from _nested(src, subset, f"{rel}/{e.name}")
        elif e.problem is not None:
            yield _problem(subset, rel, e)
        else:
            yield LayoutReject(subset, _origin(rel, e), "bad-folder", "nested folder: images sit directly in "
                               "their folder")


def _walk_folder(src: Source, subset: str, root: str, folder: str, entries: list[Entry],
                 meta: tuple[MetaList, str] | None, report: SubsetReport) -> Iterator[SourceImage | LayoutReject]:
    base = f"{root}/{folder}"
    files = [e for e in entries if not e.is_dir and e.problem is None and e.size <= MAX_SOURCE_BYTES]
    for sub in (e for e in entries if e.is_dir):
        yield from _nested(src, subset, f"{base}/{sub.name}")
    for e in entries:
        if e.problem is not None:
            yield _problem(subset, base, e)
        elif not e.is_dir and e.size > MAX_SOURCE_BYTES:
            yield LayoutReject(subset, _origin(base, e), "too-large",
                               f"{e.size} bytes, over the {MAX_SOURCE_BYTES}-byte bound of a source image")
    report.on_disk += sum(1 for e in entries if not e.is_dir)
    if meta is not None:
        listed = set(meta[0].take(folder))
        on_disk = {e.name for e in entries if not e.is_dir}
        reason, detail = src.missing(root, meta[1])
        for name in sorted(listed - on_disk):
            _record(report, "missing", f"{base}/{name}")
            yield LayoutReject(subset, f"{base}/{name}", reason, detail)
        for name in sorted(on_disk - listed):
            _record(report, "unlisted", f"{base}/{name}")
    train_folder = int(folder) if subset == "train" and folder.isascii() and folder.isdigit() else None
    keys: set[str] = set()
    for e in files:
        path = f"{base}/{e.name}"            # where it is in the extracted tree: what its key is made from
        origin = path if e.archive is None else archive_path(e.archive, e.member)
        if subset == "train":
            if train_folder is None:
                yield LayoutReject(subset, origin, "bad-folder", f"training folder {folder!r} is not a number")
                continue
            item = SourceImage(subset, origin, make_key((folder, _stem(e.name)), path), e.size, train_folder,
                               archive=e.archive, offset=e.offset)
        else:
            parsed = _classify_test(subset, folder, e.name)
            if isinstance(parsed, str):
                yield LayoutReject(subset, origin, "bad-name", parsed)
                continue
            item = SourceImage(subset, origin, make_key((_stem(e.name),), path), e.size, None, *parsed,
                               archive=e.archive, offset=e.offset)
        if item.key in keys:
            yield LayoutReject(subset, origin, "bad-key", f"key {item.key} already taken in {folder}")
            continue
        keys.add(item.key)
        yield item


def _record(report: SubsetReport, kind: str, path: str) -> None:
    if kind == "missing":
        report.listed_missing += 1
        examples = report.missing_examples
    else:
        report.unlisted += 1
        examples = report.unlisted_examples
    if len(examples) < _EXAMPLES:
        examples.append(path)


def walk_subset(src: Source, subset: str, report: SubsetReport) -> Iterator[SourceImage | LayoutReject]:
    """Every input of ``subset`` in packing order (folders, then files, sorted by name). What cannot be read
    safely (see :class:`~sysu30k.io.storage.Entry`) is a reject with its reason, and the walk goes on."""
    root = subset_root(subset)
    meta = _read_meta(src, subset)
    report.listed = meta[0].count if meta is not None else None
    entries = src.listdir(root)
    listings = src.listdir_many(f"{root}/{e.name}" for e in entries if e.is_dir)
    for entry in entries:
        path = f"{root}/{entry.name}"
        if entry.problem is not None:
            report.on_disk += 1
            yield _problem(subset, root, entry)
        elif not entry.is_dir:
            report.on_disk += 1
            yield LayoutReject(subset, _origin(root, entry), "bad-folder", "file outside an identity folder")
        elif isinstance(listing := next(listings), OSError):
            detail = f"its folder cannot be listed: {listing.strerror or listing}"
            listed = meta[0].take(entry.name) if meta is not None else []
            report.on_disk += len(listed)
            yield from (LayoutReject(subset, f"{path}/{name}", "unreadable", detail) for name in listed)
            if not listed:                    # no list names its files: the folder stands for them
                yield LayoutReject(subset, path, "unreadable", detail)
        else:
            yield from _walk_folder(src, subset, root, entry.name, listing, meta, report)
    if meta is not None:
        reason, detail = src.missing(root, meta[1])
        for folder, names in meta[0].rest():
            for name in names:
                _record(report, "missing", f"{root}/{folder}/{name}")
                yield LayoutReject(subset, f"{root}/{folder}/{name}", reason, detail)


def train_folders(src: Source) -> list[str]:
    """Numeric training folder names, sorted by id (the order bags are built in)."""
    if not src.isdir(TRAIN_DIR):
        return []
    names = [e.name for e in src.listdir(TRAIN_DIR) if e.is_dir and e.name.isascii() and e.name.isdigit()]
    return sorted(names, key=int)
