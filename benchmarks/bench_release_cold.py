#!/usr/bin/env python
"""`sysu30k shard` from the extracted tree vs from the release archives on local disk with a cold page cache
(the first read of a download), side by side: the page cache is dropped before every run (needs root).

Usage: python benchmarks/bench_release_cold.py [--data bench-out/release/data] [--reps 3] [--workers 1]
(``--data`` holds ``tree/`` and ``release/`` as ``bench_release.py --group local`` generates them.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(src: Path, dst: Path, workers: int) -> float:
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sysu30k", "-q", "shard", str(src), str(dst), "--workers", str(workers)],
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="bench-out/release/data")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    data = Path(args.data)
    times: dict[str, list[float]] = {"tree": [], "release": []}
    with tempfile.TemporaryDirectory(dir="bench-out") as tmp:
        for rep in range(args.reps):
            for name in ("tree", "release") if rep % 2 == 0 else ("release", "tree"):
                dst = Path(tmp) / f"{name}-{rep}"
                times[name].append(run(data / name, dst, args.workers))
                shutil.rmtree(dst)
                print(f"rep {rep} {name:<8} {times[name][-1]:6.2f} s", flush=True)
    tree, rel = statistics.median(times["tree"]), statistics.median(times["release"])
    print(f"median tree {tree:.2f} s, release {rel:.2f} s: tree/release {tree / rel:.2f}x (cold cache, "
          f"{args.workers} worker(s))")


if __name__ == "__main__":
    main()
