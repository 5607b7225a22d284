"""Whole-shard reads: a stream's shards are fetched in order, a few ahead, never one image at a time.

Local shards are memory-mapped. Remote shards (``s3://…``) are fetched with one GET each by a
background thread that keeps ``prefetch`` shards ahead of the reader; with ``cache_dir`` they are also
kept on local disk (written atomically) and memory-mapped from there on later epochs.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..io.storage import Storage
from ..manifests import SHARD_DIR


class ShardReader:
    """Bytes of the shards of one stream, in the order they will be needed."""

    def __init__(self, dst: Storage, names: list[str], prefetch: int = 2, cache_dir: str | None = None):
        self.dst, self.names, self.prefetch, self.cache_dir = dst, names, prefetch, cache_dir
        self._loaded: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1) if not dst.local else None
        self._lock = threading.Lock()

    def _fetch(self, i: int) -> memoryview | bytes:
        rel = f"{SHARD_DIR}/{self.names[i]}.tar"
        if self.dst.local:
            return _map(self.dst.path(rel))
        if self.cache_dir:
            cached = os.path.join(self.cache_dir, f"{self.names[i]}.tar")
            if not os.path.exists(cached):
                os.makedirs(self.cache_dir, exist_ok=True)
                tmp = f"{cached}.tmp-{os.getpid()}-{threading.get_ident()}"
                with open(tmp, "wb") as f:
                    f.write(self.dst.read(rel))
                os.replace(tmp, cached)
            return _map(cached)
        return self.dst.read(rel)

    def _schedule(self, i: int) -> None:
        if 0 <= i < len(self.names) and i not in self._loaded:
            self._loaded[i] = (self._pool.submit(self._fetch, i) if self._pool is not None
                               else _done(self._fetch(i)))

    def get(self, i: int) -> memoryview | bytes:
        """Shard ``i`` of the stream (blocking), with the next ``prefetch`` shards requested behind it."""
        with self._lock:
            self._schedule(i)
            for j in range(i + 1, i + 1 + (self.prefetch if self._pool is not None else 0)):
                self._schedule(j)
            fut = self._loaded[i]
        return fut.result()

    def release_before(self, i: int) -> None:
        """Forget shards earlier than ``i`` (they will not be read again this epoch)."""
        with self._lock:
            for j in [j for j in self._loaded if j < i]:
                del self._loaded[j]

    def close(self) -> None:
        self._loaded.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _map(path: str) -> memoryview:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def member(shard: memoryview | bytes, offset: int, size: int, sha256: str | None) -> bytes | None:
    """The bytes of one member, or None when they do not match the manifest's sha256 (damaged)."""
    data = bytes(shard[offset:offset + size])
    if len(data) != size or (sha256 is not None and hashlib.sha256(data).hexdigest() != sha256):
        return None
    return data
