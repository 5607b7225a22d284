"""The local read path of the storage layer: the bytes of a file, whatever its size says at open."""

import os
from types import SimpleNamespace

import pytest

import sysu30k.io.storage as storage
from sysu30k.io.storage import Storage


@pytest.mark.parametrize("size", [0, 1, 5_000, (1 << 20) + 7, 3 << 20])
def test_local_read_returns_the_whole_file(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f.jpg").write_bytes(data)
    assert Storage(str(tmp_path)).read("f.jpg") == data


@pytest.mark.parametrize("reported", [0, 100, 4_999, 5_001, 1 << 20, 3 << 20])
def test_local_read_does_not_trust_the_size_seen_at_open(tmp_path, monkeypatch, reported):
    """A file that grew or shrank between fstat and read is read to its real end."""
    data = os.urandom(5_000) * 500                      # 2.5 MB: longer than one follow-up read
    (tmp_path / "f.jpg").write_bytes(data)
    monkeypatch.setattr(storage.os, "fstat", lambda fd: SimpleNamespace(st_size=reported))
    assert Storage(str(tmp_path)).read("f.jpg") == data


def test_read_many_reports_a_missing_file_in_its_place(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    got = Storage(str(tmp_path)).read_many(["a.jpg", "missing.jpg", "a.jpg"])
    assert got[0] == got[2] == b"a" and isinstance(got[1], FileNotFoundError)
