"""Index the members of one tar archive (name, data offset, size, kind) without reading their data twice.

Headers are parsed from large sequential blocks: a plain ustar/GNU header (the 29.6 M members of the
release) is read here at ~3.5 µs, ten times faster than ``tarfile``; any other header (GNU long names,
PAX records, base-256 sizes, sparse files) is handed to ``tarfile`` for that one member. Damage stops the
index where it is found and is recorded, with everything before it kept: a header whose checksum fails,
a member whose data runs past the end of the file, an archive that ends without its end-of-archive
blocks. The index is a small Arrow table kept under ``DST/_plan/archives/`` so a resumed run reuses it.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

import pyarrow as pa

from ..io.storage import Storage
from ..manifests import PLAN_DIR

FILE, DIR, OTHER, BAD_NAME = 0, 1, 2, 3   # member kinds: regular file, folder, anything else (links, devices,
                                        # FIFOs), a file whose name is not UTF-8 (kept escaped)
INDEX_VERSION = 1
INDEX_DIR = f"{PLAN_DIR}/archives"
LOCAL_BLOCK = 1 << 20               # bytes per read while indexing: a local pread, or one ranged GET remotely
REMOTE_BLOCK = 16 << 20
_BLOCK = 512
_FILE_TYPES = {ord("0"), 0, ord("7")}
_PLAIN_TYPES = _FILE_TYPES | {ord(c) for c in "123456"}
INDEX_SCHEMA = pa.schema([("name", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("kind", pa.int8())])


@dataclass(frozen=True)
class Damage:
    """Where an archive stops being readable: byte ``offset``, why, and the member cut there (if known)."""

    offset: int
    reason: str
    member: str | None = None


@dataclass
class ArchiveIndex:
    """The members of archive ``path`` (relative to SRC) of ``bytes`` bytes (``count`` of them; the table may
    be left on DST, None here), and its damage if any."""

    path: str
    bytes: int
    members: pa.Table | None
    damage: Damage | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if self.members is not None:
            self.count = self.members.num_rows

    def without_members(self) -> ArchiveIndex:
        """This index without its member table (kept under DST: :func:`load_index` reads it back)."""
        return ArchiveIndex(self.path, self.bytes, None, self.damage, self.count)


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _octal(field: bytes) -> int:
    return int(field.strip(b"\0 ") or b"0", 8)


class _Blocks:
    """Reads of an archive through large aligned-on-demand windows: ``at(pos, n)`` returns up to n bytes."""

    def __init__(self, read_at: Callable[[int, int], bytes], block: int):
        self._read_at, self._block = read_at, block
        self._buf, self._base = b"", 0

    def at(self, pos: int, n: int) -> bytes:
        start = pos - self._base
        if start < 0 or start + n > len(self._buf):
            self._buf, self._base, start = self._read_at(pos, max(n, self._block)), pos, 0
        return self._buf[start:start + n]


def _decode(name: bytes) -> tuple[str, bool]:
    """``name`` as text, and whether it is UTF-8 (if not, its bytes are escaped)."""
    try:
        return name.decode("utf-8"), True
    except UnicodeDecodeError:
        return name.decode("utf-8", "backslashreplace"), False


def _checksum_ok(header: bytes) -> bool:
    """Whether ``header``'s stored checksum is its byte sum with the checksum field counted as spaces. An ASCII
    header (every plain header of the release) sums to under 65,521, adler-32's modulus, so adler-32's low half
    less one is that sum exactly, computed in C: 0.8 µs a header instead of 3 µs with ``sum``."""
    field = header[148:156]
    try:
        stored = _octal(field)
    except ValueError:
        return False
    if header.isascii():
        return (zlib.adler32(header) & 0xFFFF) - (zlib.adler32(field) & 0xFFFF) + 256 == stored
    return sum(header) - sum(field) + 256 == stored


def scan(read_at: Callable[[int, int], bytes], size: int, open_file: Callable[[], IO[bytes]],
         block: int = LOCAL_BLOCK, on_bytes: Callable[[int], None] = lambda _: None) -> tuple[pa.Table, Damage | None]:
    """Index the tar of ``size`` bytes read through ``read_at(offset, n)``; ``open_file`` opens it as a seekable
    file for ``tarfile`` (headers beyond plain ustar). ``on_bytes`` hears of the bytes passed, now and then.
    Returns the members and the damage found, if any."""
    at = _Blocks(read_at, block).at
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    kinds: list[int] = []
    pos, done, damage, fallback = 0, 0, None, None
    while True:
        header = at(pos, _BLOCK)
        if len(header) < _BLOCK:
            damage = Damage(pos, "the archive ends here without its end-of-archive blocks" if not header
                            else f"the archive ends {len(header)} bytes into a header")
            break
        if header[0] == 0 and header.count(0) == _BLOCK:
            break
        if not _checksum_ok(header):
            damage = Damage(pos, "a header fails its checksum (corrupt data)")
            break
        flag = header[156]
        if flag not in _PLAIN_TYPES or header[124] & 0x80:
            fallback = fallback or open_file()
            found = _with_tarfile(fallback, pos)
            if isinstance(found, Damage):
                damage = found
                break
            name, data_at, length, kind, after = found
            if any("\udc80" <= c <= "\udcff" for c in name):        # tarfile keeps bytes that are not UTF-8 so
                name, kind = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), BAD_NAME
        else:
            raw = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name, utf8 = _decode(prefix + b"/" + raw if prefix else raw)
            data_at = pos + _BLOCK
            if flag in _FILE_TYPES and not name.endswith("/"):
                try:
                    length = _octal(header[124:136])
                except ValueError:
                    damage = Damage(pos, "a header's size field is not an octal number (corrupt data)")
                    break
                kind = FILE if utf8 else BAD_NAME
            else:
                kind, length = (DIR if flag == ord("5") or name.endswith("/") else OTHER), 0
            after = data_at + _padded(length)
        name = name.rstrip("/")
        if kind in (FILE, BAD_NAME) and data_at + length > size:
            damage = Damage(pos, f"member data runs {data_at + length - size} bytes past the end of the archive", name)
            break
        names.append(name)
        offsets.append(data_at)
        sizes.append(length if kind in (FILE, BAD_NAME) else 0)
        kinds.append(kind)
        pos = after
        if pos - done >= block:
            on_bytes(pos - done)
            done = pos
    on_bytes(size - done)
    if fallback is not None:
        fallback.close()
    table = pa.table([pa.array(names, pa.string()), pa.array(offsets, pa.int64()), pa.array(sizes, pa.int64()),
                      pa.array(kinds, pa.int8())], schema=INDEX_SCHEMA)
    return table, damage


def _with_tarfile(f: IO[bytes], pos: int) -> tuple[str, int, int, int, int] | Damage:
    """The member whose headers start at ``pos``, parsed by ``tarfile``: (name, data offset, size, kind,
    offset of the next header)."""
    f.seek(pos)
    try:
        archive = tarfile.TarFile(fileobj=f, mode="r", errorlevel=2)
        info = archive.firstmember
    except (tarfile.TarError, EOFError, OSError) as exc:
        return Damage(pos, f"an extended header cannot be read ({exc})")
    if info is None:
        return Damage(pos, "an extended header is not followed by a member")
    kind = OTHER if info.issparse() else FILE if info.isreg() else DIR if info.isdir() else OTHER
    return info.name, info.offset_data, info.size if kind == FILE else 0, kind, archive.offset


def index_path(archive: str) -> str:
    """Where the index of ``archive`` (relative to SRC) is kept under DST."""
    return f"{INDEX_DIR}/{archive.replace('/', '__')}.parquet"


def index_archive(src: Storage, archive: str, on_bytes: Callable[[int], None] = lambda _: None,
                  size: int | None = None) -> ArchiveIndex:
    """Index ``archive`` (relative to SRC; ``size`` bytes when the caller knows it): local preads of LOCAL_BLOCK
    bytes, or ranged GETs of REMOTE_BLOCK."""
    size = src.size(archive) if size is None else size
    if src.local:
        with open(src.path(archive), "rb") as f:
            members, damage = scan(lambda pos, n: os.pread(f.fileno(), n, pos), size,
                                   lambda: open(src.path(archive), "rb"), LOCAL_BLOCK, on_bytes)
    else:
        members, damage = scan(lambda pos, n: src.read_range(archive, pos, min(size, pos + n)), size,
                               lambda: src.open(archive), REMOTE_BLOCK, on_bytes)
    return ArchiveIndex(archive, size, members, damage)


def save_index(dst: Storage, index: ArchiveIndex) -> None:
    """Keep ``index`` under DST (atomically), with its archive's size and damage in the file's metadata."""
    meta = {"version": INDEX_VERSION, "archive": index.path, "bytes": index.bytes,
            "damage": asdict(index.damage) if index.damage else None}
    dst.write_table(index_path(index.path), index.members.replace_schema_metadata({"sysu30k": json.dumps(meta)}))


def load_index(dst: Storage, archive: str, size: int, members: bool = True) -> ArchiveIndex | None:
    """The index kept for ``archive`` when it was made by this version from an archive of ``size`` bytes
    (without ``members``: only its count, damage and metadata, none of the member rows are read)."""
    rel = index_path(archive)
    if not dst.exists(rel):
        return None
    table = dst.read_table(rel) if members else dst.read_table(rel, columns=[])
    try:
        meta = json.loads((table.schema.metadata or {})[b"sysu30k"])
    except (KeyError, ValueError):
        return None
    if meta.get("version") != INDEX_VERSION or meta.get("archive") != archive or meta.get("bytes") != size:
        return None
    damage = Damage(**meta["damage"]) if meta.get("damage") else None
    if not members:
        return ArchiveIndex(archive, size, None, damage, table.num_rows)
    return ArchiveIndex(archive, size, table.replace_schema_metadata(None), damage)
