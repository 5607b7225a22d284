#!/usr/bin/env python
"""How fast can ``--resize 144`` be on one core? The per-image floor of the work Pillow must do in C.

In one process, on the same 288-high JPEGs held in memory, interleaved rep by rep in a rotating order
(medians):

  baseline   what the shard benchmark's Pillow loop does per image: Image.open(...).convert("RGB"),
             BICUBIC resize to long side 144, save JPEG q95 (no file reading, no tar writing)
  ours       sysu30k.ingest.imageproc.prepare(data, ImageOptions(resize=144)): what a packing worker does
  floor      only the C work ours cannot avoid: a 1/2-scale DCT decode and a q95 encode,
             with the least Python around them (no marker scan, no checks)

baseline / floor is the most a single core can gain; times the cores, it bounds the shard benchmark's
resize ratio from above even before planning, file reading, tar writing and hashing are counted.
With ``--rev REV`` a fourth row, ``ours@REV``, times ``prepare`` of ``sysu30k/imageproc.py`` as it was at git
revision REV, in the same process and rounds: the before/after of a change to the packer's image path.

Usage: python benchmarks/bench_resize_ceiling.py [--tree bench-out/shard/synth-h288] [--images 2000] [--reps 5]
                                                 [--rev REV]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from common import ROOT, machine  # noqa: E402  (benchmarks/common.py)
from PIL import Image

from sysu30k.ingest import imageproc
from sysu30k.io.tuning import tune_malloc


def baseline(datas: list[bytes]) -> None:
    for d in datas:
        im = Image.open(io.BytesIO(d)).convert("RGB")
        w, h = im.size
        scale = 144 / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        im.save(io.BytesIO(), "JPEG", quality=95)


def ours(datas: list[bytes], module: types.ModuleType = imageproc) -> None:
    """``prepare`` of this tree's imageproc, or of ``module`` (imageproc at another revision)."""
    opts = module.ImageOptions(resize=144)
    for d in datas:
        module.prepare(d, opts)


def imageproc_at(rev: str):
    """The image module (``sysu30k/ingest/imageproc.py``, before the stage packages ``sysu30k/imageproc.py``) as it
    was at git revision ``rev``, imported as a module of its own; its relative imports resolve in this tree."""
    for path in ("sysu30k/ingest/imageproc.py", "sysu30k/imageproc.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no imageproc module at {rev}")
    package = path.rsplit("/", 1)[0].replace("/", ".")
    name = f"imageproc_at_{rev}"
    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module          # dataclasses look their module up while the class is created
    exec(compile(shown.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def floor(datas: list[bytes], sizes: list[tuple[int, int]]) -> None:
    for d, (w, h) in zip(datas, sizes):
        im = Image.frombytes("RGB", (-(-w // 2), -(-h // 2)), d, "jpeg", "RGB", "", 2, 0)
        im.save(io.BytesIO(), "JPEG", quality=95)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="bench-out/shard/synth-h288")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rev", help="also time prepare() of sysu30k/imageproc.py at this git revision")
    args = ap.parse_args()
    tune_malloc()
    paths = sorted(Path(args.tree, "sysu_train_set_all").rglob("*.jpg"))[:args.images]
    if not paths:
        raise SystemExit(f"no JPEGs under {args.tree}/sysu_train_set_all (run bench_shard.py first)")
    datas = [p.read_bytes() for p in paths]
    each = [Image.open(io.BytesIO(d)).size for d in datas]
    sizes = set(each)
    if any(h != 288 for _, h in sizes):
        raise SystemExit(f"the floor decodes at 1/2 scale: it needs 288-high JPEGs, not {sorted(sizes)[:3]}")
    configs = [("baseline", baseline), ("ours", ours), ("floor", lambda ds: floor(ds, each))]
    if args.rev:
        before = imageproc_at(args.rev)
        configs.append((f"ours@{args.rev}", lambda ds: ours(ds, before)))
    runs: dict[str, list[float]] = {name: [] for name, _ in configs}
    for rep in range(args.reps):
        shift = rep % len(configs)          # each configuration runs first, second, ... in turn: no order effect
        for name, fn in configs[shift:] + configs[:shift]:
            t0 = time.perf_counter()
            fn(datas)
            runs[name].append((time.perf_counter() - t0) / len(datas) * 1e6)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{len(datas)} JPEGs, sizes {sorted(sizes)[:3]}, {args.reps} interleaved reps, median µs per image:")
    for k in runs:
        print(f"  {k:<16}{med[k]:8.1f}   baseline/{k} = {med['baseline'] / med[k]:.2f}x")
    out = Path("bench-out/bench_resize_ceiling.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "images": len(datas), "reps": args.reps, "rev": args.rev,
                               "us_per_image": runs, "median": med}, indent=1))


if __name__ == "__main__":
    main()
