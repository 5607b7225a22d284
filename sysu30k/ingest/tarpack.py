"""Deterministic tar shards and their DALI indexes.

Members are ``KEY.jpg`` (and its ``KEY.json`` labels, when asked) in USTAR format with fixed mtime,
owner and mode, so the same images always give the same bytes. The writer records where each member's
data starts, so the DALI index (v1.2, the format of DALI's ``wds2idx``) is written from the packing
offsets instead of re-scanning the tar.
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
    """Appends samples to a tar stream (``KEY.jpg``, then any extra members of the sample such as
    ``KEY.json``); ``add`` returns the data offset of the image.

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
        self.samples: list[list[tuple[str, int, int, str]]] = []   # per sample: (ext, data offset, size, name)

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

    def _member(self, name: str, data: bytes) -> int:
        header = ustar_header(name.encode("ascii"), len(data))
        offset = self._bytes + len(header)
        self._put(header, data, _ZEROS[:-len(data) % tarfile.BLOCKSIZE])
        return offset

    def add(self, key: str, data: bytes, extras: tuple[tuple[str, bytes], ...] = ()) -> int:
        """Append the image ``data`` as ``KEY.jpg`` and each (ext, bytes) of ``extras`` as ``KEY.ext``."""
        sample = []
        for ext, content in ((IMAGE_EXT, data), *extras):
            name = f"{key}.{ext}"
            sample.append((ext, self._member(name, content), len(content), name))
        self.samples.append(sample)
        return sample[0][1]

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, padded to a whole record, as tarfile does); returns
        (total bytes, hex sha256) of the tar."""
        end = self._bytes + 2 * tarfile.BLOCKSIZE
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._flush()
        return self._bytes, self._sha256.hexdigest()

    def dali_index(self) -> str:
        """The DALI webdataset index (v1.2) of the samples written so far: one line per sample."""
        return dali_index(self.samples)


def dali_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """A DALI webdataset index (v1.2, what ``wds2idx`` writes): per sample, each member's ext, data offset,
    size and name."""
    lines = [f"v1.2 {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def next_member_offset(offset: int, size: int) -> int:
    """The data offset of the member that follows one whose data starts at ``offset`` and is ``size`` long."""
    return offset + size + (-size % tarfile.BLOCKSIZE) + tarfile.BLOCKSIZE
