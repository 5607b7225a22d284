"""One writer per DST: a second run is refused with one line naming the holder; a killed holder's lock is
never stale; two shard runs started at the same instant never leave an inconsistent DST."""

import os
import signal
import subprocess
import sys

import pytest

from sysu30k.errors import UserError
from sysu30k.ingest.verify import verify
from sysu30k.io.lock import exclusive
from sysu30k.io.storage import Storage

HOLD = ("import sys, time; from sysu30k.io.lock import exclusive; from sysu30k.io.storage import Storage\n"
        "with exclusive(Storage(sys.argv[1]), '_lock.json', 'holder'):\n"
        "    print('held', flush=True); time.sleep(60)\n")


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    store = Storage(str(tmp_path))
    with exclusive(store, "_lock.json", "sysu30k shard"):
        with pytest.raises(UserError, match=rf"`sysu30k shard` \(host .+, pid {os.getpid()}, started "):
            with exclusive(store, "_lock.json", "sysu30k split"):
                pass
    with exclusive(store, "_lock.json", "sysu30k split"):      # released: free again
        pass
    assert not (tmp_path / "_lock.json").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {proc.pid}"):
        with exclusive(Storage(str(tmp_path)), "_lock.json", "second"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with exclusive(Storage(str(tmp_path)), "_lock.json", "after the kill"):
        assert "after the kill" in (tmp_path / "_lock.json").read_text()


def test_two_shard_runs_started_together_never_leave_an_inconsistent_dst(tiny_tree, tmp_path):
    outcomes = []
    for round_ in range(6):
        dst = tmp_path / f"dst{round_}"
        procs = [subprocess.Popen([sys.executable, "-m", "sysu30k", "-q", "shard", str(tiny_tree), str(dst),
                                   "--shard-count", "5", "--quality", str(q), "--resize", "100", "--workers", "2"],
                                  stderr=subprocess.PIPE, text=True) for q in (90, 70)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert "Traceback" not in err and p.returncode in (0, 2), err
            if p.returncode == 2:
                assert err.count("\n") == 1 and ("is being written by" in err or "other settings" in err), err
            outcomes.append(p.returncode)
        assert 0 in [p.returncode for p in procs]
        assert verify(str(dst), show_progress=False).problems == []
    assert outcomes.count(2) >= 1, outcomes          # at least once they really overlapped
