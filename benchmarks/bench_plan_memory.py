#!/usr/bin/env python
"""Peak memory and speed of planning the full SYSU-30k listing (29,606,918 entries) through the real code.

A custom fsspec filesystem (protocol ``synthlist``) synthesises directory listings lazily, with the shape
of the release: ``sysu_train_set_all/`` with 28,310 folders ``%010d`` (29,126,188 files, ~2,800 B each),
``sysu_test_set_all/query/`` with 1,000 identity folders of one image, ``sysu_test_set_all/gallery/``
with 1,000 identity folders of one image plus ``0000others/`` with 478,730 distractors. No image bytes
exist. ``sysu30k.ingest.plan.make_plan`` runs on ``Storage("synthlist://sysu30k")`` with a local DST under
``--out``, in a child process per run; the child's peak RSS comes from ``os.wait4``.

Configurations (interleaved rep by rep):

  ours        make_plan as shipped (streaming: one Parquet file per shard, rows flushed every 65,536)
  baseline    make_plan with its shard cutter replaced by one that holds every row of a subset in a
              Python list of tuples and cuts/writes the shards only at the end; run at --base-scale
              (default 1/10 and 1/20 of the release) and extrapolated linearly to 29.6 M, because at full
              size it would need ~10 GB on a shared 24 GB machine
  listing     only Storage.listdir over every folder of the fake filesystem (at the largest baseline
              size): the part of every run's time that is the fake's, not the planner's

With ``--meta`` a 29,126,188-line ``meta/train.txt`` (written once under --out) is also served, and ours
is measured again with it (the reader holds that list in Arrow while walking).

Usage: python benchmarks/bench_plan_memory.py [--reps 3] [--out bench-out/plan_memory] [--meta]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import posixpath
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fsspec
from common import machine, package_digest  # noqa: E402  (benchmarks/common.py)
from fsspec import AbstractFileSystem

ROOT = Path(__file__).resolve().parent.parent

# The released shape (SYSU30K.md): 29,606,918 = 29,126,188 train + 1,000 query + 479,730 gallery.
FULL = {"folders": 28_310, "train": 29_126_188, "test_ids": 1_000, "distractors": 478_730}
TOTAL_FULL = FULL["train"] + FULL["test_ids"] + FULL["test_ids"] + FULL["distractors"]
assert TOTAL_FULL == 29_606_918


def scaled(scale: float) -> dict:
    """The release shape with folders, training images and distractors scaled by ``scale``."""
    if scale == 1:
        return dict(FULL)
    return {"folders": max(1, round(FULL["folders"] * scale)), "train": max(1, round(FULL["train"] * scale)),
            "test_ids": FULL["test_ids"], "distractors": round(FULL["distractors"] * scale)}


def total(shape: dict) -> int:
    return shape["train"] + 2 * shape["test_ids"] + shape["distractors"]


# ----------------------------------------------------------------------------- the fake filesystem

class SynthListFS(AbstractFileSystem):
    """Listings of a SYSU-30k-shaped tree, made up on demand (no data; ``open`` serves meta/train.txt only)."""

    protocol = "synthlist"
    root_marker = ""
    cachable = False
    ROOT = "sysu30k"
    shape: dict = dict(FULL)
    meta_file: str | None = None      # local file served as meta/train.txt

    # per-folder file counts: base or base+1, spread evenly (the first `extra` folders get one more)
    def _train_count(self, folder_id: int) -> int:
        base, extra = divmod(self.shape["train"], self.shape["folders"])
        return base + (1 if folder_id <= extra else 0)

    @staticmethod
    def _size(a: int, b: int) -> int:
        return 2_400 + (a * 2_654_435_761 + b * 40_503) % 801      # 2,400..3,200 B, mean ~2,800

    @staticmethod
    def _d(name: str) -> dict:
        return {"name": name, "type": "directory", "size": 0}

    def _parts(self, path: str) -> list[str]:
        p = self._strip_protocol(path).strip("/")
        parts = p.split("/") if p else []
        if not parts or parts[0] != self.ROOT:
            raise FileNotFoundError(path)
        return parts[1:]

    def ls(self, path, detail=True, **kwargs):
        parts = self._parts(path)
        base = "/".join([self.ROOT, *parts])
        s = self.shape
        n = len(parts)
        if n == 0:
            out = [self._d(f"{base}/sysu_train_set_all"), self._d(f"{base}/sysu_test_set_all")]
            if self.meta_file:
                out.append(self._d(f"{base}/meta"))
        elif parts == ["meta"] and self.meta_file:
            out = [{"name": f"{base}/train.txt", "type": "file", "size": os.path.getsize(self.meta_file)}]
        elif parts[0] == "sysu_train_set_all" and n == 1:
            out = [self._d(f"{base}/{i:010d}") for i in range(1, s["folders"] + 1)]
        elif parts[0] == "sysu_train_set_all" and n == 2:
            fid = self._folder_id(parts[1], s["folders"], 10)
            out = [{"name": f"{base}/{parts[1]}_{k:06d}.jpg", "type": "file", "size": self._size(fid, k)}
                   for k in range(1, self._train_count(fid) + 1)]
        elif parts == ["sysu_test_set_all"]:
            out = [self._d(f"{base}/query"), self._d(f"{base}/gallery")]
        elif parts[0] == "sysu_test_set_all" and n == 2 and parts[1] in ("query", "gallery"):
            out = [self._d(f"{base}/{i:09d}") for i in range(1, s["test_ids"] + 1)]
            if parts[1] == "gallery":
                out.append(self._d(f"{base}/0000others"))
        elif parts[0] == "sysu_test_set_all" and n == 3 and parts[1] == "gallery" and parts[2] == "0000others":
            out = [{"name": f"{base}/0000others_c1_{k}.jpg", "type": "file", "size": self._size(0, k)}
                   for k in range(1, s["distractors"] + 1)]
        elif parts[0] == "sysu_test_set_all" and n == 3 and parts[1] in ("query", "gallery"):
            pid = self._folder_id(parts[2], s["test_ids"], 9)
            cam = 2 if parts[1] == "query" else 1
            out = [{"name": f"{base}/{parts[2]}_c{cam}_1.jpg", "type": "file", "size": self._size(pid, cam)}]
        else:
            raise FileNotFoundError(path)
        return out if detail else [e["name"] for e in out]

    @staticmethod
    def _folder_id(name: str, count: int, digits: int) -> int:
        if len(name) != digits or not name.isdigit() or not 1 <= int(name) <= count:
            raise FileNotFoundError(name)
        return int(name)

    def info(self, path, **kwargs):
        parts = self._parts(path)
        name = "/".join([self.ROOT, *parts])
        if not parts:
            return self._d(name)
        if parts[-1].endswith((".jpg", ".txt")):   # a file: look it up in its folder's listing
            parent = posixpath.dirname(name)
            for e in self.ls(parent, detail=True):
                if e["name"] == name:
                    return e
            raise FileNotFoundError(path)
        self.ls(name, detail=False)                # raises FileNotFoundError for anything unknown
        return self._d(name)

    def _open(self, path, mode="rb", **kwargs):
        parts = self._parts(path)
        if parts == ["meta", "train.txt"] and self.meta_file and mode == "rb":
            return open(self.meta_file, "rb")
        raise FileNotFoundError(path)


fsspec.register_implementation(SynthListFS.protocol, SynthListFS, clobber=True)


def write_meta(path: Path, shape: dict) -> None:
    """meta/train.txt of ``shape``: one ``<folder>/<file>`` line per training image, in folder order."""
    fs = SynthListFS()
    tmp = path.with_suffix(".part")
    with open(tmp, "w", buffering=2**22) as f:
        for fid in range(1, shape["folders"] + 1):
            f.write("".join(f"{fid:010d}/{fid:010d}_{k:06d}.jpg\n" for k in range(1, fs._train_count(fid) + 1)))
    tmp.rename(path)


# ----------------------------------------------------------------------------- the child runs

def _list_cutter_class():
    """The baseline: a drop-in for plan._ShardCutter that keeps every row in a list of tuples until close."""
    import pyarrow as pa

    from sysu30k.ingest.plan import PLAN_SCHEMA, rows_digest, shard_name, shard_rows_path, tar_bytes

    class ListCutter:
        def __init__(self, dst, subset, opts, on_shard):
            self.dst, self.subset, self.opts, self.on_shard = dst, subset, opts, on_shard
            self.rows: list[tuple] = []

        def add(self, item) -> None:
            self.rows.append((item.key, item.path, item.folder, item.pid, item.camid, item.distractor, item.size))

        def close(self) -> tuple[list[int], list[str]]:
            sizes, count, nbytes = [], 0, 0
            for row in self.rows:
                cost = tar_bytes(row[6])
                if count and (count >= self.opts.shard_count or nbytes + cost > self.opts.shard_size):
                    sizes.append(count)
                    count, nbytes = 0, 0
                count += 1
                nbytes += cost
            if count:
                sizes.append(count)
            start, digests = 0, []
            for index, n in enumerate(sizes):
                cols = list(zip(*self.rows[start:start + n]))
                table = pa.table([pa.array(c, type=fld.type) for c, fld in zip(cols, PLAN_SCHEMA)], schema=PLAN_SCHEMA)
                self.dst.write_table(shard_rows_path(shard_name(self.subset, index)), table)
                digests.append(rows_digest(table))
                self.on_shard(self.subset, index, digests[-1])
                start += n
            return sizes, digests

    return ListCutter


def child_main(spec: dict) -> None:
    SynthListFS.shape = spec["shape"]
    SynthListFS.meta_file = spec.get("meta_file")
    from sysu30k.ingest import plan as plan_mod
    from sysu30k.ingest.layout import subset_root
    from sysu30k.ingest.source import Source
    from sysu30k.io.storage import Storage
    from sysu30k.release.constants import SUBSETS

    src = Storage(f"synthlist://{SynthListFS.ROOT}")
    dst = Storage(spec["dst"])
    t0 = time.perf_counter()
    if spec["config"] == "listing":
        entries = 0
        for subset in SUBSETS:
            for e in src.listdir(subset_root(subset)):
                entries += len(src.listdir(f"{subset_root(subset)}/{e.name}"))
        res = {"entries": entries}
    else:
        if spec["config"] == "baseline":
            plan_mod._ShardCutter = _list_cutter_class()
        plan = plan_mod.make_plan(Source(src, []), dst, SUBSETS, plan_mod.ShardingOptions(), settings={})
        res = {"entries": sum(s["images"] for s in plan["subsets"].values()) + plan["layout_rejects"],
               "shards": sum(s["shards"] for s in plan["subsets"].values()),
               "layout_rejects": plan["layout_rejects"], "bags": plan["bags"]}
    res["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(res), flush=True)


def run_child(spec: dict) -> dict:
    dst = Path(spec["dst"])
    if dst.exists():
        shutil.rmtree(dst)
    log = dst.parent / f"{dst.name}.log"
    t0 = time.perf_counter()
    with open(log, "w+") as f:
        # output to a file, and os.wait4 (not Popen.wait) reaps the child: it returns that child's own rusage
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        proc_s = time.perf_counter() - t0
        f.seek(0)
        out, err = f.read(), ""
    if code != 0:
        sys.stderr.write(out + err)
        raise SystemExit(f"{spec['config']} failed with exit status {code}")
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    res.update(peak_rss_mb=usage.ru_maxrss / 1024, proc_s=proc_s, plan_bytes=_du(dst))
    shutil.rmtree(dst, ignore_errors=True)
    return res


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ----------------------------------------------------------------------------- orchestration





def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/plan_memory")
    ap.add_argument("--scale", type=float, default=1.0, help="size of ours' run relative to the release (1 = 29.6 M)")
    ap.add_argument("--base-scales", default="0.05,0.1",
                    help="sizes of the list-of-tuples baseline (and of ours side by side), relative to the release")
    ap.add_argument("--full-reps", type=int, default=None, help="reps of ours at --scale (default: --reps)")
    ap.add_argument("--meta", action="store_true", help="also measure ours with a 29.1 M-line meta/train.txt")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    base_scales = [float(x) for x in args.base_scales.split(",") if x.strip()]

    def spec(config: str, scale: float, meta: str | None = None) -> dict:
        return {"config": config, "shape": scaled(scale), "dst": str((out / f"dst-{config}").resolve()),
                "meta_file": meta}

    runs: dict[str, list[dict]] = {}

    def record(name: str, s: dict) -> None:
        res = run_child(s)
        res["n"] = total(s["shape"])
        runs.setdefault(name, []).append(res)
        print(f"  {name:<22} {res['entries']:>11,} entries {res['seconds']:8.1f} s "
              f"{res['entries'] / res['seconds']:>10,.0f} entries/s  peak RSS {res['peak_rss_mb']:8.0f} MB", flush=True)

    # 1. side by side at the baseline sizes, interleaved: baseline, ours, baseline, ours ...
    #    (plus the fake filesystem's own listing cost at the largest of these sizes: the floor it sets)
    for _ in range(args.reps):
        for bs in base_scales:
            record(f"baseline@{bs:g}", spec("baseline", bs))
            record(f"ours@{bs:g}", spec("ours", bs))
        record(f"listing@{base_scales[-1]:g}", spec("listing", base_scales[-1]))
    # 2. the release size: ours (about 4 minutes a run on the 2-core machine)
    for _ in range(args.full_reps if args.full_reps is not None else args.reps):
        record(f"ours@{args.scale:g}", spec("ours", args.scale))
    # 3. optional: with meta/train.txt
    if args.meta:
        meta = out / f"train-{args.scale:g}.txt"
        if not meta.exists():
            t = time.perf_counter()
            write_meta(meta, scaled(args.scale))
            print(f"wrote {meta} ({meta.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
        for _ in range(args.reps):
            record(f"ours+meta@{args.scale:g}", spec("ours", args.scale, str(meta.resolve())))

    summary = {name: {"reps": len(rs), "entries": rs[0]["entries"], "median_s": med(rs, "seconds"),
                      "median_entries_s": statistics.median(r["entries"] / r["seconds"] for r in rs),
                      "median_peak_rss_mb": med(rs, "peak_rss_mb"), "plan_mb": rs[0]["plan_bytes"] / 1e6}
               for name, rs in runs.items()}
    # linear fit of the baseline's peak RSS and time over its sizes, extrapolated to the release size
    n_full = total(scaled(args.scale))
    extrap = {}
    if len(base_scales) >= 2:
        xs = [runs[f"baseline@{bs:g}"][0]["entries"] for bs in base_scales]
        for key, target_key in (("median_peak_rss_mb", "peak_rss_mb"), ("median_s", "seconds")):
            ys = [summary[f"baseline@{bs:g}"][key] for bs in base_scales]
            slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            extrap[target_key] = ys[0] + slope * (n_full - xs[0])
            extrap[target_key + "_per_million"] = slope * 1e6
    print(f"\n{'config':<22}{'reps':>5}{'entries':>13}{'median s':>10}{'entries/s':>12}{'peak RSS MB':>13}")
    for name, s in summary.items():
        print(f"{name:<22}{s['reps']:>5}{s['entries']:>13,}{s['median_s']:>10.1f}{s['median_entries_s']:>12,.0f}"
              f"{s['median_peak_rss_mb']:>13,.0f}")
    if extrap:
        print(f"{'baseline extrapolated':<22}{'':>5}{n_full:>13,}{extrap['seconds']:>10.1f}"
              f"{n_full / extrap['seconds']:>12,.0f}{extrap['peak_rss_mb']:>13,.0f}   (linear fit over "
              f"{', '.join(f'{b:g}' for b in base_scales)} of the release)")
    ours_full = summary.get(f"ours@{args.scale:g}")
    if ours_full:
        print(f"\nours at {ours_full['entries']:,} entries: peak RSS {ours_full['median_peak_rss_mb']:,.0f} MB; "
              f"target < 4 GB (4096 MB): {'met' if ours_full['median_peak_rss_mb'] < 4096 else 'NOT met'}")
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "package_sources": package_digest(),
            "summary": summary, "baseline_extrapolated": extrap, "runs": runs}
    stamp = started.replace(":", "").replace("-", "")
    for name in (f"bench_plan_memory-{stamp}.json", "bench_plan_memory.json"):
        (out.parent / name).write_text(json.dumps(info, indent=1))
    print(f"raw timings: {out.parent / 'bench_plan_memory.json'}")


if __name__ == "__main__":
    main()
