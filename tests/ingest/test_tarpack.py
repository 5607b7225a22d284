"""The shard writer produces exactly what the standard library's tarfile writes, and a correct index."""

import hashlib
import io
import os
import tarfile

import pytest

from sysu30k.ingest.tarpack import TAR_MODE, TAR_MTIME, ShardWriter, ustar_header


def reference_tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, data in members:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), TAR_MTIME, TAR_MODE, "", ""
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513], [3000, 10240, 77, 9999, 123456],
                                   [3000, 123456] * 6])           # the last spans several write blocks
def test_byte_identical_to_tarfile(sizes):
    members = [(f"{'k' * (i % 60 + 1)}_{i}", os.urandom(n)) for i, n in enumerate(sizes)]
    buf = io.BytesIO()
    writer = ShardWriter(buf, block=200_000)
    offsets = [writer.add(k, d) for k, d in members]
    total, digest = writer.close()
    assert buf.getvalue() == reference_tar(members) and total == len(buf.getvalue())
    assert digest == hashlib.sha256(buf.getvalue()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert [m.offset_data for m in tf.getmembers()] == offsets
    assert writer.dali_index().splitlines()[0] == f"v1.2 {len(members)}"


def test_header_limits():
    assert ustar_header(b"a" * 100, 8 ** 11 - 1)
    with pytest.raises(ValueError):
        ustar_header(b"a" * 101, 1)
    with pytest.raises(ValueError):
        ustar_header(b"a", 8 ** 11)
