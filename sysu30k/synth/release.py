"""Package a synthetic tree as the download is packaged (RELEASE.md §1): tar parts, a test tar, lists at the root.

The training parts interleave folders, split some folders across two parts and list their members in an order
that is not sorted, because nothing documents how the real parts are cut: a reader must rely on none of it.
The archives are byte-identical for the same tree (fixed mtime, owner and modes, GNU format).
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from dataclasses import dataclass

from ..errors import UserError
from ..release.constants import BAG_LABEL_JSON, META_DIR, SUBSETS, TEST_DIR, TRAIN_DIR
from .config import RELEASE_PARTS
from .tree import SYNTH_JSON, TRUTH_CSV

TRAIN_ARCHIVE_DIR = "train"
TEST_ARCHIVE_DIR = "test"
TEST_ARCHIVE = f"{TEST_DIR}.tar"
ROOT_FILES = (BAG_LABEL_JSON, TRUTH_CSV, SYNTH_JSON)   # copied to the release root when the tree has them

_MTIME = 1_635_984_000          # 2021-11-04, when the Google Drive release appeared: every member's mtime
_SPLIT_EVERY = 3                # the second half of every third folder goes to the next part
_PREFIX = re.compile(r"(\./|[A-Za-z0-9][A-Za-z0-9._-]*/)?")


@dataclass(frozen=True)
class ReleaseSummary:
    """What was packaged: the archives (paths relative to ``root``), the images in them and the bytes the
    pipeline reads (archives, lists, bag json; not truth.csv or synth.json)."""

    root: str
    archives: tuple[str, ...]
    images: int
    bytes: int


def train_archive_name(part: int) -> str:
    """Path of training part ``part`` (1-based) relative to the release root."""
    return f"{TRAIN_ARCHIVE_DIR}/{TRAIN_DIR}_part{part}.tar"


def check_prefix(prefix: str) -> None:
    """Accept only the member prefixes seen in the wild: none, ``./`` or one top folder such as ``X/``."""
    if not _PREFIX.fullmatch(prefix):
        raise UserError(f'the member prefix must be "", "./" or one folder name and "/" (such as '
                        f'"SYSU-30k-released/"), not {prefix!r}')


def _files(directory: str) -> list[str]:
    """Sorted names of the regular files in ``directory``."""
    return sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))


def _subdirs(directory: str) -> list[str]:
    """Sorted names of the subdirectories of ``directory``."""
    return sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))


def train_parts(folders: dict[str, list[str]], parts: int) -> list[list[tuple[str, list[str]]]]:
    """Folder i goes to part i mod ``parts``, the second half of every third one to the next part; odd parts
    (1-based) list their folders in descending order. Returns per part its (folder, file names) in member order."""
    cut: list[dict[str, list[str]]] = [{} for _ in range(parts)]
    for i, (folder, names) in enumerate(sorted(folders.items())):
        part = i % parts
        half = (len(names) + 1) // 2 if parts > 1 and i % _SPLIT_EVERY == _SPLIT_EVERY - 1 else len(names)
        cut[part][folder] = names[:half]
        if names[half:]:
            cut[(part + 1) % parts][folder] = names[half:]
    return [sorted(c.items(), reverse=p % 2 == 0) for p, c in enumerate(cut)]


def _dir_info(name: str) -> tarfile.TarInfo:
    """A directory member with the fixed metadata."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
    return info


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file member with the fixed metadata (TarInfo's defaults: uid/gid 0, empty uname/gname)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, _MTIME
    return info


def _write_tar(path: str, tree: str, prefix: str, members: list[tuple[str, bool]]) -> int:
    """Write ``members`` ((path relative to ``tree``, is a directory), in order) to ``path`` via a temporary
    name in the same folder, so no half-written archive ever has the final name; returns the images written."""
    tmp = f"{path}.tmp{os.getpid()}"
    images = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            if prefix:
                tar.addfile(_dir_info(prefix))
            for rel, is_dir in members:
                if is_dir:
                    tar.addfile(_dir_info(f"{prefix}{rel}/"))
                    continue
                with open(os.path.join(tree, rel), "rb") as f:
                    tar.addfile(_file_info(prefix + rel, os.fstat(f.fileno()).st_size), f)
                images += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return images


def _train_members(part: list[tuple[str, list[str]]]) -> list[tuple[str, bool]]:
    """The members of one training part: the top folder, then each folder and its files."""
    members = [(TRAIN_DIR, True)]
    for folder, names in part:
        members.append((f"{TRAIN_DIR}/{folder}", True))
        members += [(f"{TRAIN_DIR}/{folder}/{n}", False) for n in names]
    return members


def _walk(tree: str, rel: str) -> list[tuple[str, bool]]:
    """The directory ``rel`` of ``tree`` and everything under it, depth first in name order (as GNU tar lists a
    folder it archives, with sorted entries)."""
    members = [(rel, True)]
    for name in sorted(os.listdir(os.path.join(tree, rel))):
        child = f"{rel}/{name}"
        members += _walk(tree, child) if os.path.isdir(os.path.join(tree, child)) else [(child, False)]
    return members


def _copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` via a temporary name beside it, so no reader sees half a file."""
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _check_paths(tree: str, out: str) -> None:
    """Refuse a tree without the released layout, and an ``out`` that already holds release output."""
    for rel in (TRAIN_DIR, *(f"{META_DIR}/{s}.txt" for s in SUBSETS)):
        if not os.path.exists(os.path.join(tree, rel)):
            raise UserError(f"{tree} is not a synthetic tree: it has no {rel}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output path {out} exists and is not a directory")
    taken = [n for n in (TRAIN_ARCHIVE_DIR, TEST_ARCHIVE_DIR, *(f"{s}.txt" for s in SUBSETS), *ROOT_FILES)
             if os.path.exists(os.path.join(out, n))]
    if taken:
        raise UserError(f"{out} already holds {taken[0]}; choose a new or empty directory for the release")


def package_release(tree: str, out: str, parts: int = RELEASE_PARTS, prefix: str = "") -> ReleaseSummary:
    """Write the synthetic ``tree`` under ``out`` packaged as the download: ``parts`` training tars, the test
    tar and the lists at the root (members named ``prefix`` + their path in the tree), so readers of the
    real download can be tested on it."""
    check_prefix(prefix)
    _check_paths(tree, out)
    train_root = os.path.join(tree, TRAIN_DIR)
    folders = {f: _files(os.path.join(train_root, f)) for f in _subdirs(train_root)}
    if not 1 <= parts <= len(folders):
        raise UserError(f"--parts must lie in [1, {len(folders)}] (the training folders), not {parts}")
    os.makedirs(os.path.join(out, TRAIN_ARCHIVE_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, TEST_ARCHIVE_DIR), exist_ok=True)

    archives = [train_archive_name(p + 1) for p in range(parts)]
    images = 0
    for name, part in zip(archives, train_parts(folders, parts)):
        images += _write_tar(os.path.join(out, name), tree, prefix, _train_members(part))
    archives.append(f"{TEST_ARCHIVE_DIR}/{TEST_ARCHIVE}")
    test = _walk(tree, TEST_DIR) if os.path.isdir(os.path.join(tree, TEST_DIR)) else [(TEST_DIR, True)]
    images += _write_tar(os.path.join(out, archives[-1]), tree, prefix, test)

    lists = [f"{s}.txt" for s in SUBSETS]
    for name in lists:
        _copy(os.path.join(tree, META_DIR, name), os.path.join(out, name))
    copied = [n for n in ROOT_FILES if os.path.exists(os.path.join(tree, n))]
    for name in copied:
        _copy(os.path.join(tree, name), os.path.join(out, name))
    read = archives + lists + [n for n in copied if n == BAG_LABEL_JSON]
    nbytes = sum(os.path.getsize(os.path.join(out, p)) for p in read)
    return ReleaseSummary(root=os.path.abspath(out), archives=tuple(archives), images=images, bytes=nbytes)
