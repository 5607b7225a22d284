#!/usr/bin/env python
"""``members.scan`` (the index pass of ``shard`` on the release) against the same function at a baseline
commit, side by side in one process on one in-memory GNU tar of SYSU-30k-shaped members.

Every member is a plain 512-byte header for ``sysu_train_set_all/<folder>/<folder>_<n>.jpg`` with 2,561-3,072
data bytes (the release's ~3 KB JPEGs at 144 px), read through ``read_at`` slices of 1 MiB as a local pread
gives them. The two scans alternate rep by rep; the table and damage of both must be equal (asserted).

Usage: python benchmarks/bench_member_scan.py [--baseline 8cda979] [--members 60000] [--reps 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sysu30k.ingest import members  # noqa: E402


def baseline_module(rev: str):
    """``sysu30k/ingest/members.py`` as it was at ``rev``, loaded inside the package (its relative imports)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:sysu30k/ingest/members.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"sysu30k.ingest._members_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sysu30k.ingest"
    sys.modules[spec.name] = module                    # dataclasses look their module up there
    exec(compile(source, f"{rev}:members.py", "exec"), module.__dict__)
    return module


def archive(n: int) -> bytes:
    rng = random.Random(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i in range(n):
            folder = f"{i // 1000:010d}"
            info = tarfile.TarInfo(f"sysu_train_set_all/{folder}/{folder}_{i % 1000:06d}.jpg")
            info.size = rng.randint(2561, 3072)
            t.addfile(info, io.BytesIO(b"\xff" * info.size))
    return buf.getvalue()


def timed(scan, data: bytes):
    t0 = time.perf_counter()
    table, damage = scan(lambda pos, k: data[pos:pos + k], len(data), lambda: io.BytesIO(data))
    return time.perf_counter() - t0, table, damage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="8cda979", help="the commit whose scan is the baseline")
    p.add_argument("--members", type=int, default=60000)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    old = baseline_module(a.baseline)
    data = archive(a.members)
    for scan in (old.scan, members.scan):             # untimed: the first call pays pyarrow's lazy imports
        timed(scan, data[:512 * 64] + b"\0" * 1024)
    times = {"baseline": [], "current": []}
    for rep in range(a.reps):
        order = [("baseline", old.scan), ("current", members.scan)]
        for name, scan in order if rep % 2 == 0 else order[::-1]:
            seconds, table, damage = timed(scan, data)
            times[name].append(seconds)
            if name == "baseline":
                ref = (table, damage)
            else:
                cur = (table, damage)
        assert cur[0].equals(ref[0]) and cur[1] == ref[1] is None and cur[0].num_rows == a.members
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"baseline": a.baseline, "members": a.members, "reps": a.reps, "load": os.getloadavg(),
                      "us_per_member": {k: round(1e6 * v / a.members, 2) for k, v in med.items()},
                      "baseline_over_current": round(med["baseline"] / med["current"], 2),
                      "per_rep_ratio": [round(b / c, 2) for b, c in zip(times["baseline"], times["current"])]}))


if __name__ == "__main__":
    main()
