"""One small storage layer over fsspec: every read and write of the pipeline goes through it.

Paths are '/'-separated and relative to a root URL: a local path or any fsspec URL (``s3://bucket/prefix``,
``gs://…``, ``memory://…``). S3 endpoint, region and credentials come from the standard AWS environment
variables and config files; ``options`` passes anything else to the filesystem.

Writes are atomic. Locally a file is written under a hidden temporary name and renamed into place; on an
object store it is spooled to a local temporary file and uploaded in one PUT (multipart for large files),
which the store makes visible only once complete. Remote operations are retried on transient faults
(:mod:`sysu30k.io.retry`); a permanent fault raises :class:`StorageError`, a one-line user error naming the URL.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import inspect
import json
import os
import posixpath
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, NamedTuple, TypeVar

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .retry import RetryPolicy, is_transient, retry

TMP_MARK = ".tmp-"
SPOOL_ENV = "SYSU30K_SPOOL"          # where uploads are staged (default: the system temp folder)
LISTING_THREADS = 8                  # concurrent folder listings on an object store
T = TypeVar("T")


class StorageError(UserError):
    """A storage fault that retrying will not fix (bad credentials, missing bucket, ...)."""


class Entry(NamedTuple):
    """A directory entry: its name (last path component), whether it is a folder, its size in bytes, and
    why it cannot be read as a file or folder (None when it can; ``detail`` may say more). An entry that is
    a member of a tar archive names the archive, the member and the offset of its data. A named tuple:
    planning makes one per input file, and a frozen dataclass costs 8x more to build."""

    name: str
    is_dir: bool
    size: int
    problem: str | None = None
    detail: str | None = None
    archive: str | None = None
    member: str | None = None
    offset: int | None = None


class NotRegularFile(OSError):
    """A path that is a FIFO, socket or device: reading it could block forever or never end."""


class TooLarge(OSError):
    """A file larger than the bound its reader set."""


def _local_entry(entry: os.DirEntry, root: str) -> Entry:
    """What a local directory entry is, without ever following a symlink out of ``root`` (the real path of
    the storage root) or into a folder: symlinked files inside the root are read as their target; links to
    folders (they could loop), out of the root, or to nothing, and FIFOs, sockets and devices, carry a
    ``problem`` instead."""
    name = entry.name
    try:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not os.path.exists(target):
                return Entry(name, False, 0, "dangling-symlink")
            if os.path.commonpath([target, root]) != root:
                return Entry(name, False, 0, "symlink-outside")
            st = os.stat(target)
            if stat.S_ISDIR(st.st_mode):
                return Entry(name, False, 0, "symlinked-folder")
        elif entry.is_dir(follow_symlinks=False):
            return Entry(name, True, 0)
        else:
            st = entry.stat(follow_symlinks=False)
    except OSError:
        return Entry(name, False, 0, "unreadable")
    if not stat.S_ISREG(st.st_mode):
        return Entry(name, False, 0, "not-a-file")
    return Entry(name, False, st.st_size)


def _undecodable(name: str) -> str | None:
    """``name`` with its bytes escaped when it is not UTF-8 (os.scandir hands such bytes over as surrogates),
    else None."""
    if name.isascii():
        return None
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_local(path: str, limit: int | None = None) -> bytes:
    """The whole content of the local regular file ``path`` (to its end, even if it grew after the open);
    :class:`NotRegularFile` for a FIFO, socket or device (opened without blocking), :class:`TooLarge` past
    ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, socket or device)", path)
        if limit is not None and st.st_size > limit:
            raise TooLarge(errno.EFBIG, f"{st.st_size} bytes, over the {limit}-byte bound", path)
        parts = [os.read(fd, st.st_size + 1)]
        total = len(parts[0])
        while parts[-1]:                 # a file that grew after fstat is read to its end
            parts.append(os.read(fd, 1 << 20))
            total += len(parts[-1])
            if limit is not None and total > limit:
                raise TooLarge(errno.EFBIG, f"over the {limit}-byte bound (it grew while read)", path)
        return b"".join(parts) if len(parts) > 2 else parts[0]
    finally:
        os.close(fd)


class Storage:
    """A root URL and the fsspec filesystem that serves it."""

    def __init__(self, url: str, options: dict | None = None, policy: RetryPolicy = RetryPolicy()):
        self.options = dict(options or {})
        self.policy = policy
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **self.options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(f"cannot open {url}: {exc}") from None
        self.root = root.rstrip("/") or "/"
        self.url = self.fs.unstrip_protocol(self.root)   # canonical: absolute, with its protocol
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self._real = os.path.realpath(self.root) if self.local else None   # what local symlinks must stay in
        # s3fs sizes an object with a HEAD before each whole read when it may split it into concurrent
        # ranged GETs (max_concurrency > 1): for 3 KB images that doubles the requests for nothing
        cat_file = getattr(self.fs, "_cat_file", None)
        self._whole = {"max_concurrency": 1} if cat_file is not None and "max_concurrency" in \
            inspect.signature(cat_file).parameters else {}

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` under the root."""
        return posixpath.join(self.root, rel) if rel else self.root

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run a filesystem call with retries; permanent failures become a StorageError naming the URL."""
        try:
            return retry(fn, f"{what} {self.fs.unstrip_protocol(self.path(rel))}", self.policy)
        except StorageError:
            raise
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, PermissionError):
                reason += " (check the credentials, endpoint and region: AWS_* variables or --storage-option)"
            elif is_transient(exc):
                reason = f"{type(exc).__name__}: {reason} (still failing after {self.policy.attempts} attempts)"
            raise StorageError(f"cannot {what} {self.fs.unstrip_protocol(self.path(rel))}: {reason}") from None

    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.exists(self.path(rel)))

    def is_regular_file(self, rel: str) -> bool:
        """Whether ``rel`` is a regular file (locally: not a FIFO, socket, device or folder; on an object store
        every object is)."""
        if self.local:
            try:
                return stat.S_ISREG(os.stat(self.path(rel)).st_mode)
            except OSError:
                return False
        return self._call("check", rel, lambda: self.fs.isfile(self.path(rel)))

    def isdir(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.isdir(self.path(rel)))

    def size(self, rel: str) -> int:
        return int(self._call("stat", rel, lambda: self.fs.size(self.path(rel))))

    def read(self, rel: str) -> bytes:
        """The whole content of ``rel`` (locally: a regular file only, see :func:`read_local`)."""
        if self.local:                       # the hot path of packing: no file object, 2x faster on small files
            return read_local(self.path(rel))
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def read_many(self, rels: list[str], limit: int | None = None) -> list[bytes | Exception]:
        """The contents of ``rels`` (or the exception each read ended with: :class:`TooLarge` past ``limit``
        bytes), fetched concurrently on an object store so a high-latency store is never read one object
        at a time."""
        if self.local:
            out: list[bytes | Exception] = []
            for rel in rels:
                try:
                    out.append(read_local(self.path(rel), limit))
                except OSError as exc:
                    out.append(exc)
            return out
        paths = [self.path(r) for r in rels]
        got: dict[str, bytes | Exception] = {}
        pending = paths
        for attempt in range(self.policy.attempts):
            if attempt:
                time.sleep(min(self.policy.cap, self.policy.base * 2 ** (attempt - 1)))
            got.update(self._call("read", rels[0], lambda: self.fs.cat(pending, on_error="return", **self._whole)))
            pending = [p for p in pending if isinstance(got.get(p), Exception) and is_transient(got[p])]
            if not pending:
                break
        out = [got.get(p, FileNotFoundError(p)) for p in paths]
        return [TooLarge(errno.EFBIG, f"{len(d)} bytes, over the {limit}-byte bound", p)
                if limit is not None and isinstance(d, bytes) and len(d) > limit else d for p, d in zip(paths, out)]

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of ``rel`` (fewer where the file ends first): one pread, or one ranged GET."""
        return self.read_ranges(rel, [start], [end])[0]

    def read_ranges(self, rel: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges of one file: local preads on one descriptor, or ranged GETs that run concurrently."""
        if self.local:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                return [os.pread(fd, e - s, s) for s, e in zip(starts, ends)]
            finally:
                os.close(fd)
        path = self.path(rel)
        return self._call("read", rel, lambda: self.fs.cat_ranges([path] * len(starts), starts, ends,
                                                                            on_error="raise"))

    def read_table(self, rel: str, **kwargs) -> pa.Table:
        """The Parquet table at ``rel`` (a UserError naming it when it is damaged)."""
        try:
            return self._read_table(rel, **kwargs)
        except pa.ArrowInvalid as exc:
            raise UserError(f"{self.fs.unstrip_protocol(self.path(rel))} is damaged (not a readable Parquet file: "
                            f"{str(exc).splitlines()[0]})") from None

    def _read_table(self, rel: str, **kwargs) -> pa.Table:
        """A Parquet file as a table (``kwargs`` go to ``pq.read_table``). Local files are read by path:
        Arrow reading through a Python file object can abort a process that imported torch at exit."""
        if self.local:
            return pq.read_table(self.path(rel), **kwargs)
        with self.open(rel) as f:
            return pq.read_table(f, **kwargs)

    def write_table(self, rel: str, table: pa.Table) -> None:
        """Write ``table`` as zstd-compressed Parquet at ``rel``, atomically."""
        with self.open_atomic(rel) as f:
            pq.write_table(table, f, compression="zstd")

    def read_text(self, rel: str) -> str:
        return self.read(rel).decode("utf-8")

    def read_json(self, rel: str, what: str = "") -> object | None:
        """The JSON document at ``rel`` (None when there is none); a UserError naming it when it is damaged
        (truncated, not UTF-8, not JSON), with ``what`` to do about it."""
        if not self.exists(rel):
            return None
        try:
            return json.loads(self.read(rel).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.fs.unstrip_protocol(self.path(rel))} is damaged (not valid JSON: "
                            f"{str(exc).splitlines()[0]}){'; ' + what if what else ''}") from None

    def open(self, rel: str, mode: str = "rb") -> IO:
        return self._call("open", rel, lambda: self.fs.open(self.path(rel), mode))

    def listdir(self, rel: str = "") -> list[Entry]:
        """Entries of folder ``rel``, sorted by name (the order every output follows)."""
        if self.local:                       # the hot path of planning: one scandir, no per-entry wrapping
            root = self._real
            with os.scandir(self.path(rel)) as it:
                out = [Entry(e.name, True, 0) if e.is_dir(follow_symlinks=False)
                       else (Entry(e.name, False, e.stat(follow_symlinks=False).st_size) if e.is_file(
                           follow_symlinks=False) else _local_entry(e, root)) for e in it]
            for i, e in enumerate(out):                   # names that are not UTF-8: rare, so checked last
                shown = _undecodable(e.name)
                if shown is not None:
                    out[i] = Entry(shown, False, 0, "bad-name")
            return sorted(out, key=lambda e: e.name)
        infos = self._call("list", rel, lambda: self.fs.ls(self.path(rel), detail=True, refresh=True))
        self.fs.invalidate_cache(self.path(rel))       # keep memory flat over 28k folder listings
        out = [Entry(posixpath.basename(i["name"].rstrip("/")), i["type"] == "directory", int(i.get("size") or 0))
               for i in infos if i["name"].rstrip("/") != self.path(rel)]
        return sorted(out, key=lambda e: e.name)

    def listdir_many(self, rels: Iterable[str]) -> Iterator[list[Entry] | OSError]:
        """``listdir`` of each of ``rels`` in order; on an object store several run ahead concurrently. A local
        folder that cannot be listed (permissions, removed meanwhile) comes back as its OSError."""
        if self.local:
            for rel in rels:
                try:
                    yield self.listdir(rel)
                except OSError as exc:
                    yield exc
            return
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            ahead: collections.deque = collections.deque()
            for rel in rels:
                ahead.append(pool.submit(self.listdir, rel))
                if len(ahead) > 2 * LISTING_THREADS:       # bounded look-ahead: memory stays flat
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def find(self, rel: str) -> list[str]:
        """Every file below folder ``rel``, as paths relative to the root, sorted."""
        found = self._call("list", rel, lambda: self.fs.find(self.path(rel)))
        return sorted(posixpath.relpath(p, self.root) for p in found)

    def makedirs(self, rel: str) -> None:
        if self.local:
            self.fs.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        """Remove file or folder ``rel`` if it exists."""
        if self.exists(rel):
            self._call("remove", rel, lambda: self.fs.rm(self.path(rel), recursive=True))

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at ``rel`` only once the block exits without error."""
        if not self.local:
            with _spool() as (f, spooled):
                yield f
                f.close()
                self._call("upload", rel, lambda: self.fs.put_file(spooled, self.path(rel)))
            return
        folder, name = posixpath.split(rel)
        self.makedirs(folder)
        tmp = posixpath.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(self.path(tmp), "wb") as f:
                yield f
            os.replace(self.path(tmp), self.path(rel))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(self.path(tmp))
            raise

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def remove_temporaries(self, rel: str) -> int:
        """Delete leftover temporary files (from a killed local run) in folder ``rel``; returns how many."""
        if not self.local or not self.isdir(rel):
            return 0
        stale = [e.name for e in self.listdir(rel) if not e.is_dir and TMP_MARK in e.name]
        for name in stale:
            os.remove(self.path(posixpath.join(rel, name)))
        return len(stale)


@contextlib.contextmanager
def _spool() -> Iterator[tuple[IO[bytes], str]]:
    """A local temporary file for staging an upload, removed afterwards whatever happens."""
    fd, path = tempfile.mkstemp(prefix="sysu30k-", suffix=".spool", dir=os.environ.get(SPOOL_ENV))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
