"""One small storage layer over fsspec: every read and write of the pipeline goes through it.

Paths are '/'-separated and relative to a root URL (a local path today; any fsspec URL such as
``s3://bucket/prefix`` works the same). Writes are atomic: data goes to a hidden temporary name in
the destination folder and is renamed into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import IO, Iterator

import fsspec
import fsspec.implementations.local

TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class Entry:
    """A directory entry: its name (last path component), whether it is a folder, its size in bytes."""

    name: str
    is_dir: bool
    size: int


class Storage:
    """A root URL and the fsspec filesystem that serves it."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.url = self.fs.unstrip_protocol(self.root)   # canonical: absolute, with its protocol
        self._local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` under the root."""
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def isdir(self, rel: str) -> bool:
        return self.fs.isdir(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read(self, rel: str) -> bytes:
        """The whole content of ``rel``."""
        if self._local:                      # the hot path of packing: skip fsspec's file wrapper
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb") -> IO:
        return self.fs.open(self.path(rel), mode)

    def listdir(self, rel: str = "") -> list[Entry]:
        """Entries of folder ``rel``, sorted by name (the order every output follows)."""
        if self._local:                      # the hot path of planning: one scandir, no per-entry wrapping
            with os.scandir(self.path(rel)) as it:
                out = [Entry(e.name, e.is_dir(), 0 if e.is_dir() else e.stat().st_size) for e in it]
            return sorted(out, key=lambda e: e.name)
        out = []
        for info in self.fs.ls(self.path(rel), detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            out.append(Entry(name, info["type"] == "directory", int(info.get("size") or 0)))
        return sorted(out, key=lambda e: e.name)

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        """Remove file or folder ``rel`` if it exists."""
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at ``rel`` only once the block exits without error."""
        folder, name = posixpath.split(rel)
        self.makedirs(folder)
        tmp = posixpath.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with self.fs.open(self.path(tmp), "wb") as f:
                yield f
            self.fs.mv(self.path(tmp), self.path(rel))
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(self.path(tmp))
            raise

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def remove_temporaries(self, rel: str) -> int:
        """Delete leftover temporary files (from a killed run) in folder ``rel``; returns how many."""
        if not self.isdir(rel):
            return 0
        stale = [e.name for e in self.listdir(rel) if not e.is_dir and TMP_MARK in e.name]
        for name in stale:
            self.fs.rm(self.path(posixpath.join(rel, name)))
        return len(stale)
