#!/usr/bin/env python
"""`sysu30k shard` to object storage and on a Dask cluster, each against its local baseline, side by side.

Groups (repetitions interleave the configurations of a group; every run writes a fresh DST):
  storage: local -> local (baseline) | local -> S3 | S3 -> S3, all with 2 local worker processes;
           S3 is a SeaweedFS server (`weed mini`) on 127.0.0.1, started by this script, keys enforced.
  dask:    a distributed.LocalCluster with 1 worker (baseline) | with 2 workers, local -> local,
           submitted through --scheduler as a user would to an existing cluster.
Timing covers planning + packing + publishing (what a user waits for). Medians of --reps runs.

Usage: python benchmarks/bench_remote.py [--tree bench-out/shard/synth-h144] [--reps 3] [--out bench-out/remote]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))            # the SeaweedFS launcher the tests use

from s3server import SeaweedS3  # noqa: E402

from sysu30k.ingest.config import ImageOptions, ShardingOptions, ShardJob  # noqa: E402
from sysu30k.ingest.shard import run_shard  # noqa: E402

JOB = ShardJob(ShardingOptions(shard_size=16 * 10**6), ImageOptions(verify="full"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default="bench-out/shard/synth-h144")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/remote")
    args = ap.parse_args()
    tree, out = Path(args.tree).resolve(), Path(args.out).resolve()
    if not tree.is_dir():
        subprocess.run([sys.executable, "-m", "sysu30k", "synth", str(tree), "--folders", "1000",
                        "--images-per-folder", "20", "--test-ids", "100", "--distractors", "1000",
                        "--workers", "2"], check=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server = SeaweedS3(out)
    os.environ.update(server.env())
    import s3fs
    from distributed import LocalCluster

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(tree) + "/", "bench/raw/", recursive=True)
    n = sum(len(files) for _, _, files in os.walk(tree))
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)
        print(f"{name:26s} {seconds:7.2f} s  {n / seconds:8.0f} img/s", flush=True)

    try:
        for rep in range(args.reps):
            local_dst = out / f"local-{rep}"
            record("local->local (2 proc)", timed(lambda: run_shard(str(tree), str(local_dst), JOB, workers=2,
                                                                    show_progress=False)))
            shutil.rmtree(local_dst)
            key = uuid.uuid4().hex[:8]
            record("local->S3 (2 proc)", timed(lambda: run_shard(str(tree), f"s3://bench/{key}-a", JOB, workers=2,
                                                                 show_progress=False)))
            record("S3->S3 (2 proc)", timed(lambda: run_shard("s3://bench/raw", f"s3://bench/{key}-b", JOB,
                                                              workers=2, show_progress=False)))
        clusters = {w: LocalCluster(n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None) for w in (1, 2)}
        try:
            for rep in range(args.reps):
                for workers, cluster in clusters.items():
                    dst = out / f"dask{workers}-{rep}"
                    record(f"dask {workers} worker(s)", timed(lambda: run_shard(
                        str(tree), str(dst), JOB, scheduler=cluster.scheduler_address, show_progress=False)))
                    shutil.rmtree(dst)
        finally:
            for cluster in clusters.values():
                cluster.close()
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"images": n, "reps": args.reps, "median_s": med, "runs_s": times,
              "ratios": {"local->S3 / local->local": med["local->local (2 proc)"] / med["local->S3 (2 proc)"],
                         "S3->S3 / local->local": med["local->local (2 proc)"] / med["S3->S3 (2 proc)"],
                         "dask 2 / dask 1": med["dask 1 worker(s)"] / med["dask 2 worker(s)"]}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"median_img_per_s": {k: round(n / v) for k, v in med.items()}, "ratios": result["ratios"]},
                     indent=1))


if __name__ == "__main__":
    main()
