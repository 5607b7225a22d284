"""Deterministic tar shards and their DALI indexes.

Members are ``KEY.jpg`` in USTAR format with fixed mtime, owner and mode, so the same images always
give the same bytes. The writer records where each member's data starts, so the DALI index (v1.2,
the format of DALI's ``wds2idx``) is written from the packing offsets instead of re-scanning the tar.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import IO

from .constants import IMAGE_EXT

TAR_MTIME = 0
TAR_MODE = 0o444
_HEADER = tarfile.BLOCKSIZE  # a USTAR header is exactly one 512-byte block


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, b: bytes) -> int:
        self.sha256.update(b)
        self.bytes += len(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self.bytes


class ShardWriter:
    """Appends ``KEY.jpg`` members to a tar stream; ``add`` returns the data offset of the member."""

    def __init__(self, f: IO[bytes]):
        self._out = _HashingWriter(f)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self.members: list[tuple[str, int, int]] = []   # (member name, data offset, size)

    def add(self, key: str, data: bytes) -> int:
        info = tarfile.TarInfo(f"{key}.{IMAGE_EXT}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        offset = self._tar.offset + _HEADER
        self._tar.addfile(info, io.BytesIO(data))
        self.members.append((info.name, offset, len(data)))
        return offset

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (total bytes, hex sha256) of the tar."""
        self._tar.close()
        return self._out.bytes, self._out.sha256.hexdigest()

    def dali_index(self) -> str:
        """The DALI webdataset index (v1.2) of the members written so far: one sample per member."""
        lines = [f"v1.2 {len(self.members)}"]
        lines += [f"{IMAGE_EXT} {offset} {size} {name}" for name, offset, size in self.members]
        return "\n".join(lines) + "\n"
