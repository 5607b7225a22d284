"""Deterministic tar shards and their DALI indexes.

Members are ``KEY.jpg`` in USTAR format with fixed mtime, owner and mode, so the same images always
give the same bytes. The writer records where each member's data starts, so the DALI index (v1.2,
the format of DALI's ``wds2idx``) is written from the packing offsets instead of re-scanning the tar.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import IO

from ..release.constants import IMAGE_EXT

TAR_MTIME = 0
TAR_MODE = 0o444


def _template() -> bytes:
    """The USTAR header the standard library writes for our members, with an empty name and size 0."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uname, info.gname = TAR_MTIME, TAR_MODE, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")


_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_TEMPLATE = bytearray(_template())
_TEMPLATE[_NAME], _TEMPLATE[_SIZE], _TEMPLATE[_CHKSUM] = bytes(100), bytes(12), b" " * 8
_TEMPLATE_SUM = sum(_TEMPLATE)     # the checksum of a header is this plus the bytes of its name and size
_ZEROS = bytes(tarfile.BLOCKSIZE)


def ustar_header(name: bytes, size: int) -> bytes:
    """``tarfile.TarInfo(name).tobuf(USTAR_FORMAT)`` for our fixed mtime/mode/owner, 10x faster: the
    standard library's header with the name, the size (11 octal digits) and the checksum filled in."""
    if len(name) > 100 or size >= 8 ** 11:
        raise ValueError(f"{name!r} ({size} bytes) does not fit a USTAR header")
    octal = b"%011o\0" % size
    h = bytearray(_TEMPLATE)
    h[:len(name)] = name
    h[_SIZE] = octal
    h[_CHKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(octal))
    return bytes(h)


class ShardWriter:
    """Appends ``KEY.jpg`` members to a tar stream; ``add`` returns the data offset of the member.

    The archive is what ``tarfile`` writes in USTAR format (a test checks it byte for byte); the writer
    lays out header, data and padding itself because ``TarFile.addfile`` and ``TarInfo.tobuf`` cost more
    than all the rest of packing an already-valid JPEG. Members are hashed and written in blocks of about
    ``block`` bytes: one small write per member costs as much as the rest of the packing.
    """

    def __init__(self, f: IO[bytes], block: int = 1 << 20):
        self._f, self._block = f, block
        self._sha256 = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._bytes = 0                                   # written and pending
        self.members: list[tuple[str, int, int]] = []   # (member name, data offset, size)

    def _put(self, *parts: bytes) -> None:
        for part in parts:
            self._pending.append(part)
            self._pending_bytes += len(part)
            self._bytes += len(part)
        if self._pending_bytes >= self._block:
            self._flush()

    def _flush(self) -> None:
        block = b"".join(self._pending)
        self._sha256.update(block)
        self._f.write(block)
        self._pending, self._pending_bytes = [], 0

    def add(self, key: str, data: bytes) -> int:
        name = f"{key}.{IMAGE_EXT}"
        header = ustar_header(name.encode("ascii"), len(data))
        offset = self._bytes + len(header)
        pad = -len(data) % tarfile.BLOCKSIZE
        self._put(header, data, _ZEROS[:pad])
        self.members.append((name, offset, len(data)))
        return offset

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, padded to a whole record, as tarfile does); returns
        (total bytes, hex sha256) of the tar."""
        end = self._bytes + 2 * tarfile.BLOCKSIZE
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._flush()
        return self._bytes, self._sha256.hexdigest()

    def dali_index(self) -> str:
        """The DALI webdataset index (v1.2) of the members written so far: one sample per member."""
        lines = [f"v1.2 {len(self.members)}"]
        lines += [f"{IMAGE_EXT} {offset} {size} {name}" for name, offset, size in self.members]
        return "\n".join(lines) + "\n"
