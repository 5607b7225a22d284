"""One writer per dataset root: the lock that ``sysu30k shard`` and ``sysu30k split`` hold on DST while they write.

Local roots: ``fcntl.flock`` on ``DST/_lock.json``, held for the whole run and removed at its end; the
kernel drops the lock when the process ends however it ends, so a lock is never stale, and a second run is
refused at once with one line naming the holder (host, pid, start time), which the holder writes into the
file. (flock needs a local filesystem: on NFS it may not exclude another host.) Object stores have no
locks: the lock object is advisory there. A run refuses a lock object written by a live process on this
host or by any other host (remove it by hand once that run is gone), and takes over one whose process on
this host has died; two runs started within the same second may both get past it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from ..errors import UserError
from .storage import Storage


def _me(what: str) -> dict:
    return {"command": what, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _busy(store: Storage, rel: str, holder: dict | None) -> UserError:
    who = (f"`{holder.get('command', 'sysu30k')}` (host {holder.get('host')}, pid {holder.get('pid')}, started "
           f"{holder.get('started')})" if holder else "another sysu30k run (just starting)")
    return UserError(f"{store.url} is being written by {who}; wait for it to finish"
                     + ("" if store.local else f", or remove {store.url}/{rel} if that run is gone"))


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _alive_here(holder: dict) -> bool:
    """Whether ``holder`` is a process of this host that still runs (other hosts: assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _lock_local(store: Storage, rel: str, path: str) -> int:
    """An open descriptor of ``path`` holding its flock; retried when the file we locked was unlinked by its
    last holder before we got the lock (we would hold a lock nobody else can see)."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise _busy(store, rel, holder) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise _busy(store, rel, None)


@contextlib.contextmanager
def exclusive(store: Storage, rel: str, what: str) -> Iterator[None]:
    """Hold ``rel`` under ``store`` as the one-writer lock while the block runs (see the module docstring);
    a UserError naming the holder when another run has it."""
    me = _me(what)
    if store.local:
        path = store.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = _lock_local(store, rel, path)
        try:
            os.ftruncate(fd, 0)                # a killed holder's words may still be there
            os.pwrite(fd, json.dumps(me).encode(), 0)
            try:
                yield
            finally:
                os.unlink(path)                # before the unlock: a run that opened it meanwhile sees it gone
        finally:
            os.close(fd)                       # closing drops the flock
        return
    if store.exists(rel):
        holder = _parse(store.read_text(rel))
        if holder is None or _alive_here(holder):
            raise _busy(store, rel, holder)
    store.write_atomic(rel, json.dumps(me).encode())
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if _parse(store.read_text(rel)) == me:
                store.remove(rel)
