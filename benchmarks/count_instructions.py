#!/usr/bin/env python
"""Instructions per image of the packer, here and at a git revision, counted by valgrind's callgrind.

Timings on a shared 2-core VM swing by 2x from one minute to the next; callgrind's instruction counts
do not (the same code and inputs give the same count). For each side this runs one child under
``valgrind --tool=callgrind`` twice, on N = ``--images`` and on 2N images, and reports the difference
divided by N, so interpreter start, imports and set-up cancel out. The REV side runs from a temporary
``git worktree`` of REV (its ``sysu30k`` first on PYTHONPATH).

  --what prepare  ``imageproc.prepare(data, ImageOptions(resize=144))`` on the first images of the tree
  --what shard    ``run_shard(..., ImageOptions(resize=144), workers=1)`` on a copy of those images
                  (planning, reading, packing, hashing, tar and manifest writing, publishing)

Instructions are not time (SIMD and cache misses weigh differently, and valgrind's CPU has no SHA
extensions, so sha256 counts several times what it costs natively): the figure says which side does
less work, not by how many seconds.

Usage: python benchmarks/count_instructions.py --rev REV [--what prepare|shard]
                                               [--tree bench-out/shard/synth-h288] [--images 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, machine  # noqa: E402  (benchmarks/common.py)


def child(what: str, src: str, work: str) -> None:
    """Run the counted work on the training images of tree ``src`` (``sysu30k`` is whichever PYTHONPATH
    gives)."""
    import pyarrow as pa

    from sysu30k.ingest.config import ImageOptions
    from sysu30k.ingest.imageproc import prepare
    from sysu30k.io.tuning import tune_malloc

    tune_malloc()
    pa.array([0])                             # pyarrow's one-off pandas import: set-up, not per image
    opts = ImageOptions(resize=144)
    if what == "prepare":
        for p in sorted(Path(src, "sysu_train_set_all").rglob("*.jpg")):
            prepare(p.read_bytes(), opts)
        return
    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard

    run_shard(src, str(Path(work, "dst")), workers=1, show_progress=False,
              job=ShardJob(sharding=ShardingOptions(shard_size=4 * 10**6), image=opts, subsets=("train",)))


def copy_first(tree: str, n: int, dst: Path) -> str:
    """A tree holding the first ``n`` training images of ``tree``, in their folders."""
    for p in sorted(Path(tree, "sysu_train_set_all").rglob("*.jpg"))[:n]:
        folder = dst / "sysu_train_set_all" / p.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, folder / p.name)
    return str(dst)


def count(what: str, src: str, pythonpath: str) -> int:
    """Instructions callgrind counts for one child run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        spec = json.dumps({"what": what, "src": src, "work": tmp})
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out",
                               sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                              env=env, cwd=tmp)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="the git revision to compare with (e.g. the commit before a change); required")
    ap.add_argument("--what", choices=("prepare", "shard"), default="prepare")
    ap.add_argument("--tree", default="bench-out/shard/synth-h288", help="a tree of 288-high JPEGs (bench_shard.py)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        child(spec["what"], spec["src"], spec["work"])
        return
    if not args.rev:
        ap.error("--rev is required")
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: copy_first(args.tree, k, Path(tmp, f"src{k}")) for k in (n, 2 * n)}
        if len(list(Path(trees[2 * n]).rglob("*.jpg"))) < 2 * n:
            raise SystemExit(f"{args.tree} holds fewer than {2 * n} training JPEGs")
        worktree = str(Path(tmp, "rev"))
        subprocess.run(["git", "worktree", "add", "--detach", "-q", worktree, args.rev], cwd=ROOT, check=True)
        try:
            sides = {"here": str(ROOT), args.rev: worktree}
            jobs = [(name, k) for name in sides for k in (n, 2 * n)]
            with ThreadPoolExecutor(2) as pool:            # one valgrind per core
                found = pool.map(lambda job: count(args.what, trees[job[1]], sides[job[0]]), jobs)
                counts = dict(zip(jobs, found))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=ROOT, check=True)
    per_image = {name: (counts[name, 2 * n] - counts[name, n]) / n for name in sides}
    print(f"{n} more images of {args.tree}, instructions per image ({args.what}, resize 144):")
    for name, value in per_image.items():
        print(f"  {name:<12}{value:12,.0f}   {value / per_image['here']:.3f}x here")
    out = Path("bench-out/count_instructions.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rev": args.rev, "what": args.what, "images": args.images,
                               "tree": args.tree, "counts": {f"{k[0]}:{k[1]}": v for k, v in counts.items()},
                               "per_image": per_image}, indent=1))


if __name__ == "__main__":
    main()
