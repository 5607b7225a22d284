"""The local read path of the storage layer: the bytes of a file, whatever its size says at open."""

import os
import stat
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
    monkeypatch.setattr(storage.os, "fstat", lambda fd: SimpleNamespace(st_size=reported, st_mode=stat.S_IFREG | 0o644))
    assert Storage(str(tmp_path)).read("f.jpg") == data


def test_read_many_reports_a_missing_file_in_its_place(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    got = Storage(str(tmp_path)).read_many(["a.jpg", "missing.jpg", "a.jpg"])
    assert got[0] == got[2] == b"a" and isinstance(got[1], FileNotFoundError)


class _ClientError(Exception):
    """The shape of botocore's ClientError: a response dict with the S3 error code and the HTTP status."""

    def __init__(self, code: str, status: int):
        super().__init__(f"An error occurred ({code}) when calling the GetObject operation")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class ServerDisconnectedError(Exception):
    """Named as aiohttp's (the check is by class name, so aiohttp need not be imported)."""


def test_transient_faults_are_judged_by_type_and_status_never_by_message():
    import errno

    from sysu30k.io.retry import is_transient

    assert not is_transient(OSError(errno.EINVAL, "bad header in s3://b/sysu_train_set_all/0000000500/x.jpg"))
    assert not is_transient(RuntimeError("HTTP 500 in 0000000503/0000000502 (a path, not a status)"))
    assert not is_transient(FileNotFoundError("s3://b/0000000500/missing.jpg"))
    assert not is_transient(_ClientError("AccessDenied", 403))
    assert is_transient(_ClientError("SlowDown", 503)) and is_transient(_ClientError("Whatever", 502))
    assert is_transient(_ClientError("TooManyRequestsException", 429))
    assert is_transient(OSError(errno.EBUSY, "Please reduce your request rate."))         # s3fs: SlowDown
    assert is_transient(ServerDisconnectedError()) and is_transient(ConnectionResetError())
    wrapped = OSError(errno.EINVAL, "translated")
    wrapped.__cause__ = _ClientError("InternalError", 500)
    assert is_transient(wrapped)
