"""Benchmark: the safe local listing (``Storage.listdir``: no symlink followed out of SRC, FIFOs and devices
classified, undecodable names caught) against the plain listing it replaced, side by side.

  baseline  os.scandir with is_dir() and stat() following links, as sysu30k listed before session 7
  ours      Storage.listdir (follow_symlinks=False fast path, links and odd files classified one by one)

A tree of FOLDERS folders x FILES empty files (what planning lists) on tmpfs when /dev/shm exists; rounds
alternate which runs first; medians of the per-round times. Run:
  python benchmarks/bench_listing.py [--folders 200 --files 1000 --rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from sysu30k.io.storage import Entry, Storage


def baseline(root: str, folders: list[str]) -> int:
    n = 0
    for name in folders:
        with os.scandir(os.path.join(root, name)) as it:
            out = [Entry(e.name, True, 0) if e.is_dir() else Entry(e.name, False, e.stat().st_size) for e in it]
        n += len(sorted(out, key=lambda e: e.name))
    return n


def ours(store: Storage, folders: list[str]) -> int:
    return sum(len(store.listdir(name)) for name in folders)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folders", type=int, default=200)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        folders = [f"{i:010d}" for i in range(args.folders)]
        for name in folders:
            d = Path(tmp, name)
            d.mkdir()
            for j in range(args.files):
                (d / f"{name}_{j:06d}.jpg").touch()
        store = Storage(tmp)
        times: dict[str, list[float]] = {"baseline": [], "ours": []}
        for r in range(args.rounds):
            order = ["baseline", "ours"] if r % 2 == 0 else ["ours", "baseline"]
            for name in order:
                t0 = time.perf_counter()
                n = baseline(tmp, folders) if name == "baseline" else ours(store, folders)
                times[name].append(time.perf_counter() - t0)
                assert n == args.folders * args.files
        med = {k: statistics.median(v) for k, v in times.items()}
        entries = args.folders * args.files
        for k in ("baseline", "ours"):
            print(f"{k:<9} median {med[k] * 1e3:8.1f} ms  {entries / med[k] / 1e6:6.2f} M entries/s")
        print(f"ours / baseline speed: {med['baseline'] / med['ours']:.2f}x ({entries} entries, {args.rounds} rounds, "
              f"{'tmpfs' if base else 'disk'})")


if __name__ == "__main__":
    main()
