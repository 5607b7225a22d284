"""Ctrl-C or SIGTERM at any moment of `sysu30k shard --workers 2`: every worker stops, the user reads one line
saying how to resume, and the rerun ends with a DST that verifies."""

import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import pack_synth

from sysu30k.ingest.verify import verify


def shard_args(tree, dst) -> list[str]:
    return [sys.executable, "-m", "sysu30k", "-q", "shard", str(tree), str(dst), "--resize", "144",
            "--shard-count", "40", "--workers", "2"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The tree, and how long an uninterrupted run takes on this machine (interrupts are timed against it)."""
    root = tmp_path_factory.mktemp("interrupt")
    pack_synth(root / "raw", root / "unused", 1000, workers=2, folders=200, images_per_folder=16, test_ids=20,
               distractors=60, height=288, seed=7)
    t0 = time.monotonic()
    subprocess.run(shard_args(root / "raw", root / "timed"), check=True, capture_output=True, timeout=300)
    return root / "raw", time.monotonic() - t0


INTERRUPTED: list[int] = []


def sigint_at_default() -> None:
    """In the child before exec: a suite started in the background (``cmd &`` in a script) ignores SIGINT, the
    child would inherit that and Python would install no Ctrl-C handler, so SIGINT runs would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def left_behind(dst) -> list[psutil.Process]:
    """Processes whose command line names ``dst`` (forked workers carry their parent's)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(dst) == part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("sig,seed", [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGINT, 3),
                                      (signal.SIGTERM, 4), (signal.SIGTERM, 5)])
def test_an_interrupt_stops_every_worker_and_the_rerun_completes(tree, tmp_path, sig, seed):
    (src, seconds), dst = tree, tmp_path / "dst"
    args = shard_args(src, dst)
    delay = random.Random(seed).uniform(0.0, 0.7) * seconds     # planning, packing or publishing
    for _ in range(3):             # a run that finished first (the machine got faster) is retried sooner
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=sigint_at_default)
        deadline = time.monotonic() + 60
        while not (dst / "_lock.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)                      # the run holds DST: past Python's start-up, handlers set
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        time.sleep(0.3)
        assert left_behind(dst) == [], [p.pid for p in left_behind(dst)]
        if proc.returncode != 0:
            assert proc.returncode == 130 and err.strip() == "interrupted: rerun the same command to resume", err
            INTERRUPTED.append(seed)
            break
        assert verify(str(dst), show_progress=False).problems == []       # finished: complete and sound
        shutil.rmtree(dst)
        delay /= 3
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert verify(str(dst), show_progress=False).problems == []


def test_most_of_those_runs_were_really_interrupted():
    assert len(INTERRUPTED) >= 3, INTERRUPTED
