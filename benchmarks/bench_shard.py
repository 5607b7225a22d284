#!/usr/bin/env python
"""Throughput of ``sysu30k shard`` against a straightforward webdataset.ShardWriter loop, side by side.

Two synthetic trees are generated once under ``--out`` (and reused while their recorded settings match):

* ``synth-h144``: 144-high JPEGs, packed as they are (pass-through);
* ``synth-h288``: 288-high JPEGs, packed with ``--resize 144``.

Configurations (each rep runs every configuration of a group once, in this order, so baseline and ours
alternate round after round; every run is a fresh child process and writes to a fresh, deleted, DST):

pass-through (synth-h144)
  base-wds        os.walk (sorted) + read bytes + webdataset.ShardWriter(maxsize=256e6); no validation
  ours-full-w1/2  run_shard(ImageOptions(verify="full")), workers 1 and 2, default sharding (256 MB)
  ours-head-w1/2  run_shard(ImageOptions(verify="header")), workers 1 and 2, default sharding
  ours-*-w2-s16   the same with --shard-size 16MB: the tree is ~76 MB, so default sharding gives ONE
                  training shard, and shards are the unit of parallel work (2 workers cannot help)
  bare-copy       os.walk (sorted) + read bytes + append to one open file (the physical limit)
resize (synth-h288)
  base-pil        Image.open(path).convert("RGB") -> resize long side 144 BICUBIC -> JPEG q95 -> ShardWriter
  ours-resize-w1/2 run_shard(ImageOptions(resize=144)), workers 1 and 2 (+ -s16: 16 MB shards)

Timing: perf_counter inside the child around the work only (imports and interpreter start excluded; the
whole child wall time is recorded too as ``proc_s``). For ours it covers planning + packing + publishing;
the planning and publishing shares are timed separately by wrapping ``sysu30k.ingest.shard.make_plan`` and
``sysu30k.ingest.shard.publish``. The page cache is warm: the parent reads every file of a tree once (untimed)
before its group, and DST deletion plus ``os.sync()`` between runs is not timed.

Usage: python benchmarks/bench_shard.py [--reps 3] [--out bench-out/shard] [--images 20000] [--configs a,b]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, package_digest  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent

PASS_CONFIGS = ["base-wds", "ours-full-w1", "ours-full-w2", "ours-full-w2-s16", "ours-head-w1", "ours-head-w2",
                "ours-head-w2-s16", "bare-copy"]
RESIZE_CONFIGS = ["base-pil", "ours-resize-w1", "ours-resize-w2", "ours-resize-w2-s16"]
BASELINE_OF = {c: "base-wds" for c in PASS_CONFIGS[1:]} | {c: "base-pil" for c in RESIZE_CONFIGS[1:]}
TARGET = {c: {"full": 1.0, "head": 3.0, "resize": 4.0}[c.split("-")[1]]  # images/s ratio, from the issue
          for c in PASS_CONFIGS + RESIZE_CONFIGS if c.startswith("ours-")}


# ----------------------------------------------------------------------------- the measured workloads

def list_jpegs(src: str) -> list[str]:
    """Every .jpg/.jpeg under ``src``, walked with os.walk in sorted order (what a user script does)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith((".jpg", ".jpeg")):
                out.append(os.path.join(dirpath, name))
    return out


def dot_free_key(src: str, path: str) -> str:
    return os.path.splitext(os.path.relpath(path, src))[0].replace("/", "_").replace(".", "_")


def run_base_wds(src: str, dst: str) -> dict:
    import webdataset as wds

    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    with wds.ShardWriter(os.path.join(dst, "shard-%06d.tar"), maxsize=256e6, verbose=0) as sink:
        for path in list_jpegs(src):
            with open(path, "rb") as f:
                data = f.read()
            sink.write({"__key__": dot_free_key(src, path), "jpg": data})
            n += 1
    return {"seconds": time.perf_counter() - t0, "images": n}


def run_bare_copy(src: str, dst: str) -> dict:
    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    with open(os.path.join(dst, "all.bin"), "wb") as out:
        for path in list_jpegs(src):
            with open(path, "rb") as f:
                out.write(f.read())
            n += 1
    return {"seconds": time.perf_counter() - t0, "images": n}


def run_base_pil(src: str, dst: str, long_side: int = 144) -> dict:
    import webdataset as wds
    from PIL import Image

    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    with wds.ShardWriter(os.path.join(dst, "shard-%06d.tar"), maxsize=256e6, verbose=0) as sink:
        for path in list_jpegs(src):
            im = Image.open(path).convert("RGB")
            w, h = im.size
            scale = long_side / max(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            sink.write({"__key__": dot_free_key(src, path), "jpg": buf.getvalue()})
            n += 1
    return {"seconds": time.perf_counter() - t0, "images": n}


def run_ours(src: str, dst: str, verify: str, resize: int | None, workers: int, shard_mb: int | None) -> dict:
    import sysu30k.ingest.shard as shard_mod
    from sysu30k.ingest.config import ImageOptions, ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard

    shares = {"plan_s": 0.0, "publish_s": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                shares[name] += time.perf_counter() - t
        return wrapper

    shard_mod.make_plan = timed("plan_s", shard_mod.make_plan)
    shard_mod.publish = timed("publish_s", shard_mod.publish)
    sharding = ShardingOptions(shard_size=shard_mb * 10**6) if shard_mb else ShardingOptions()
    job = ShardJob(sharding=sharding, image=ImageOptions(verify=verify, resize=resize))
    t0 = time.perf_counter()
    summary = run_shard(src, dst, job=job, workers=workers, overwrite=False, show_progress=False)
    seconds = time.perf_counter() - t0
    images = sum(s["images"] for s in summary["subsets"].values())
    rejects = sum(s["rejects"] for s in summary["subsets"].values())
    shards = sum(s["shards"] for s in summary["subsets"].values())
    return {"seconds": seconds, "images": images, "rejects": rejects, "shards": shards, **shares}


def child_main(spec: dict) -> None:
    kind, src, dst = spec["config"], spec["src"], spec["dst"]
    if kind == "base-wds":
        res = run_base_wds(src, dst)
    elif kind == "bare-copy":
        res = run_bare_copy(src, dst)
    elif kind == "base-pil":
        res = run_base_pil(src, dst)
    elif kind.startswith("ours-"):
        # ours-<full|head|resize>-w<workers>[-s<shard MB>]; default sharding (256 MB) without -s
        _, mode, w, *rest = kind.split("-")
        workers, shard_mb = int(w[1:]), (int(rest[0][1:]) if rest else None)
        if mode == "resize":
            res = run_ours(src, dst, "full", 144, workers, shard_mb)
        else:
            res = run_ours(src, dst, {"full": "full", "head": "header"}[mode], None, workers, shard_mb)
    else:
        raise SystemExit(f"unknown config {kind}")
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- orchestration

def synth_args(args, height: int) -> list[str]:
    return ["--folders", str(args.folders), "--images-per-folder", str(args.images_per_folder),
            "--test-ids", str(args.test_ids), "--distractors", str(args.distractors), "--height", str(height),
            "--seed", "0"]


def ensure_tree(args, height: int) -> Path:
    """The synthetic tree of ``height``, generated once and reused while its settings match."""
    tree = Path(args.out) / f"synth-h{height}"
    marker = Path(args.out) / f"synth-h{height}.done.json"
    wanted = synth_args(args, height)
    if marker.exists() and tree.is_dir() and json.loads(marker.read_text()).get("args") == wanted:
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    exe = shutil.which("sysu30k") or str(Path(sys.executable).parent / "sysu30k")
    cmd = [exe, "synth", str(tree), *wanted, "--workers", str(args.synth_workers)]
    print("generating:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    n = len(list_jpegs(str(tree)))
    marker.write_text(json.dumps({"args": wanted, "jpegs": n, "seconds": time.perf_counter() - t0}))
    return tree


def warm_cache(tree: Path) -> tuple[int, int]:
    """Read every file of the tree once (untimed) so each measurement starts with a warm page cache."""
    n = size = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                size += len(f.read())
            n += 1
    return n, size


def clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.sync()


def run_child(config: str, src: Path, dst: Path) -> dict:
    clear(dst)
    spec = json.dumps({"config": config, "src": str(src), "dst": str(dst)})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec],
                          capture_output=True, text=True, cwd=ROOT)
    proc_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{config} failed with exit status {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["proc_s"] = proc_s
    clear(dst)
    return res


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    med_rate = {c: statistics.median(r["images"] / r["seconds"] for r in rs) for c, rs in runs.items()}
    for config, rs in runs.items():
        row = {
            "config": config, "reps": len(rs), "images": rs[0]["images"],
            "median_s": statistics.median(r["seconds"] for r in rs),
            "median_img_s": med_rate[config],
            "median_plan_s": statistics.median(r["plan_s"] for r in rs) if "plan_s" in rs[0] else None,
            "median_publish_s": statistics.median(r["publish_s"] for r in rs) if "publish_s" in rs[0] else None,
        }
        base = BASELINE_OF.get(config)
        if base in med_rate:
            row["baseline"] = base
            row["ratio"] = med_rate[config] / med_rate[base]
            if config in TARGET:
                row["target"] = TARGET[config]
                row["met"] = row["ratio"] >= TARGET[config]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'config':<20}{'reps':>5}{'images':>8}{'median s':>10}{'img/s':>9}{'plan s':>8}{'publ s':>8}"
          f"{'ratio':>8}{'target':>8}  met")
    for r in rows:
        plan = f"{r['median_plan_s']:.2f}" if r["median_plan_s"] is not None else "-"
        pub = f"{r['median_publish_s']:.2f}" if r["median_publish_s"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        target = f">={r['target']:.1f}x" if "target" in r else "-"
        met = ("yes" if r["met"] else "NO") if "met" in r else "-"
        print(f"{r['config']:<20}{r['reps']:>5}{r['images']:>8}{r['median_s']:>10.2f}{r['median_img_s']:>9.0f}"
              f"{plan:>8}{pub:>8}{ratio:>8}{target:>8}  {met}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000,
                    help="training images per tree (folders = images / images-per-folder); default 20000")
    ap.add_argument("--images-per-folder", type=int, default=20)
    ap.add_argument("--test-ids", type=int, default=100)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/shard")
    ap.add_argument("--groups", default="pass,resize", help="comma-separated: pass, resize")
    ap.add_argument("--configs", default="", help="comma-separated subset of the groups' configurations (default all)")
    ap.add_argument("--synth-workers", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    args.folders = max(1, args.images // args.images_per_folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    started = datetime.datetime.now().isoformat(timespec="seconds")
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started, "machine": machine(),
            "package_sources": package_digest(),
            "reps": args.reps, "trees": {}}
    runs: dict[str, list[dict]] = {}
    for group in groups:
        height, configs = {"pass": (144, PASS_CONFIGS), "resize": (288, RESIZE_CONFIGS)}[group]
        if args.configs:
            configs = [c for c in configs if c in args.configs.split(",")]
        tree = ensure_tree(args, height)
        n, size = warm_cache(tree)
        info["trees"][group] = {"path": str(tree), "files": n, "bytes": size, "height": height}
        print(f"{group}: {tree} ({n} files, {size / 1e6:.1f} MB), page cache warmed", flush=True)
        for rep in range(args.reps):
            for config in configs:
                res = run_child(config, tree, out / "dst" / config)
                res["rep"] = rep
                runs.setdefault(config, []).append(res)
                extra = f" plan {res['plan_s']:.2f} s, {res['shards']} shards" if "plan_s" in res else ""
                print(f"  rep {rep} {config:<20} {res['seconds']:7.2f} s  {res['images'] / res['seconds']:8.0f} img/s"
                      f"{extra}", flush=True)
    rows = summarise(runs)
    print_table(rows)
    info["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    info["summary"] = rows
    info["runs"] = runs
    stamp = started.replace(":", "").replace("-", "")
    raw = ROOT / "bench-out"              # beside the other benchmarks' JSON, wherever --out puts the trees
    raw.mkdir(exist_ok=True)
    for name in (f"bench_shard-{stamp}.json", "bench_shard.json"):
        (raw / name).write_text(json.dumps(info, indent=1))
    print(f"\nraw timings: {raw / f'bench_shard-{stamp}.json'}")


if __name__ == "__main__":
    main()
