#!/usr/bin/env python
"""``sysu30k split`` (Dask, 2-worker LocalCluster) against the same checks in plain pyarrow/pandas, side by side.

Input: a synthetic DST with only manifests (no image bytes): ``images.parquet`` in the images schema
holding the official test shape (1,000 queries of ids 28311..29310, camera 2; their 1,000 true matches,
camera 1; 478,730 distractors ``0000others_c1_K.jpg``), 480,730 rows cut into ``--row-groups`` row
groups (default 1,900, about 253 rows each, as if every shard held that many images; real 256 MB test
shards would give about 100) plus ``--train-rows`` training rows (default 0) in further row groups, and
a ``summary.json`` whose source is not a synth tree (so the official counts are expected, and met).

Configurations (each rep runs every configuration once, in this order; every run is a fresh child
process writing to the same DST, whose split outputs are deleted first):

  dask-cold   build_splits(DST): starts its own LocalCluster(2 workers x 1 thread, processes), closes it
  dask-warm   the same on a LocalCluster started beforehand in the child (start-up not timed)
  plain       one process: pq.read_table(columns, filter subset in query/gallery) -> pandas ->
              the same split_checks functions on the whole table -> split.parquet + summary, atomically

Wall time: perf_counter around the call only (imports and, for dask-warm, cluster start-up excluded).
Memory: peak RSS of the client process (getrusage ru_maxrss) and of the Dask worker processes
(psutil sampling of the child's descendants every 20 ms; the max over workers and the sum of the
workers' peaks). Results: JSON per run under --out, medians printed as a Markdown table.

Usage: python benchmarks/bench_split.py [--reps 3] [--row-groups 1900] [--out bench-out/split]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import cpu_name  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["dask-cold", "dask-warm", "plain"]
OFFICIAL_IDS = range(28311, 29311)
N_DISTRACTORS = 478_730


# ----------------------------------------------------------------------------- the synthetic manifest

def make_dst(dst: Path, row_groups: int, train_rows: int) -> dict:
    """Write DST/manifests/{images.parquet, summary.json, bags.parquet}; returns what was written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sysu30k import manifests

    ids = np.array(OFFICIAL_IDS)
    ks = np.arange(1, N_DISTRACTORS + 1)
    n_test = 2 * len(ids) + N_DISTRACTORS
    q_key = [f"{i:09d}_c2_2" for i in ids]
    g_key = [f"{i:09d}_c1_1" for i in ids] + [f"0000others_c1_{k}" for k in ks]
    subset = ["query"] * len(ids) + ["gallery"] * (len(ids) + N_DISTRACTORS)
    path = ([f"sysu_test_set_all/query/{i:09d}/{k}.jpg" for i, k in zip(ids, q_key)]
            + [f"sysu_test_set_all/gallery/{i:09d}/{k}.jpg" for i, k in zip(ids, g_key)]
            + [f"sysu_test_set_all/gallery/0000others/{k}.jpg" for k in g_key[len(ids):]])
    pid = np.concatenate([ids, ids, np.full(N_DISTRACTORS, -1000)]).astype(np.int32)
    camid = np.concatenate([np.full(len(ids), 2), np.full(len(ids) + N_DISTRACTORS, 1)]).astype(np.int8)
    distractor = np.concatenate([np.zeros(2 * len(ids), bool), np.ones(N_DISTRACTORS, bool)])
    rng = np.random.default_rng(0)
    test = pa.table({
        "key": q_key + g_key, "subset": subset, "path": path,
        "folder": pa.nulls(n_test, pa.int32()), "pid": pid, "camid": camid, "distractor": distractor,
        "shard": [""] * n_test,
        "offset": np.arange(n_test, dtype=np.int64) * 4096, "size": rng.integers(8_000, 40_000, n_test),
        "width": np.full(n_test, 64, np.int32), "height": np.full(n_test, 128, np.int32),
        "sha256": [f"{x:064x}" for x in rng.integers(0, 2**62, n_test)],
    })
    schema = manifests.schema("images")
    out = dst / "manifests"
    out.mkdir(parents=True, exist_ok=True)
    # query rows and gallery rows get their own row groups (a shard holds one subset), sized alike
    per = max(1, -(-n_test // row_groups))
    cuts = []
    for lo, hi in ((0, len(ids)), (len(ids), n_test)):
        cuts += [(s, min(s + per, hi)) for s in range(lo, hi, per)]
    groups = 0
    with pq.ParquetWriter(out / "images.parquet", schema, compression="zstd") as w:
        if train_rows:
            per_t = max(1, -(-train_rows // max(1, row_groups // 4)))
            folder = (np.arange(train_rows) // 1000 + 1).astype(np.int32)
            for s in range(0, train_rows, per_t):
                n = min(per_t, train_rows - s)
                f = folder[s:s + n]
                keys = [f"{x:010d}_{j:06d}" for x, j in zip(f, range(s, s + n))]
                t = pa.table({"key": keys, "subset": ["train"] * n,
                              "path": [f"sysu_train_set_all/{x:010d}/{k}.jpg" for x, k in zip(f, keys)],
                              "folder": f, "pid": pa.nulls(n, pa.int32()), "camid": pa.nulls(n, pa.int8()),
                              "distractor": np.zeros(n, bool), "shard": [f"train-{groups:06d}"] * n,
                              "offset": np.zeros(n, np.int64), "size": np.zeros(n, np.int64),
                              "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
                              "sha256": ["0" * 64] * n}, schema=schema)
                w.write_table(t, row_group_size=n)
                groups += 1
        for i, (lo, hi) in enumerate(cuts):
            part = test.slice(lo, hi - lo)
            name = f"{part['subset'][0].as_py()}-{i:06d}"
            part = part.set_column(part.schema.get_field_index("shard"), "shard", pa.array([name] * (hi - lo)))
            w.write_table(part.cast(schema), row_group_size=hi - lo)
            groups += 1
    summary = {"version": 1, "source": str(dst / "no-such-source"), "subsets": {}, "bags": 0}
    (out / "summary.json").write_text(json.dumps(summary))
    return {"rows": n_test + train_rows, "row_groups": groups,
            "bytes": (out / "images.parquet").stat().st_size}


# ----------------------------------------------------------------------------- the measured workloads

def run_plain(dst: str) -> dict:
    """The same checks and outputs in one process with pyarrow and pandas (no Dask)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sysu30k import manifests
    from sysu30k.io.storage import Storage
    from sysu30k.manifests import SPLIT_SUMMARY
    from sysu30k.release.constants import OFFICIAL_TEST_IDS
    from sysu30k.split.checks import check_counts, check_split

    st = Storage(dst)
    cols = ["key", "subset", "path", "folder", "pid", "camid", "distractor"]
    with st.open(manifests.relpath("images")) as f:
        t = pq.read_table(f, columns=cols, filters=[("subset", "in", ["query", "gallery"])])
    n = t.num_rows
    split = pa.table({"split": pa.array(["test"] * n), "role": t["subset"], "key": t["key"], "pid": t["pid"],
                      "camid": t["camid"], "distractor": t["distractor"], "folder": pa.nulls(n, pa.int32()),
                      "path": t["path"]}, schema=manifests.schema("split"))
    rows = split.to_pandas()
    findings = check_split(rows, "test")
    queries = int(pc.sum(pc.equal(t["subset"], "query")).as_py())
    findings += check_counts("test", queries, n - queries, (1000, 479_730), rows, OFFICIAL_TEST_IDS)
    with st.open_atomic(manifests.relpath("split")) as f:
        pq.write_table(split, f, compression="zstd", row_group_size=1 << 16)
    summary = {"queries": queries, "gallery": n - queries, "findings": [x.as_dict() for x in findings]}
    st.write_atomic(SPLIT_SUMMARY, json.dumps(summary).encode())
    return {"queries": queries, "gallery": n - queries, "findings": len(findings)}


def run_dask(dst: str, scheduler: str | None) -> dict:
    from sysu30k.split.build import build_splits

    s = build_splits(dst, scheduler=scheduler, workers=2, expected="official")
    t = s["splits"]["test"]
    return {"queries": t["queries"], "gallery": t["gallery"], "findings": len(s["findings"])}


class Sampler:
    """Peak RSS of every descendant process of this one, sampled every 20 ms."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        import psutil

        while not self.stop.is_set():
            for p in self.me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    cmd = " ".join(p.cmdline()[-3:])
                except psutil.Error:
                    continue
                if rss > self.peaks.get(p.pid, ("", 0))[1]:
                    self.peaks[p.pid] = (cmd, rss)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child_main(spec: dict) -> None:
    import resource

    config, dst = spec["config"], spec["dst"]
    for name in ("split.parquet", "split_summary.json", "holdout.parquet"):
        Path(dst, "manifests", name).unlink(missing_ok=True)
    cluster = None
    with Sampler() as sampler:
        if config == "dask-warm":
            import logging

            from distributed import LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=":0", silence_logs=logging.WARNING)
        start = time.perf_counter()
        if config == "plain":
            out = run_plain(dst)
        else:
            out = run_dask(dst, cluster.scheduler_address if cluster else None)
        seconds = time.perf_counter() - start
        if cluster is not None:
            cluster.close()
    workers = [rss for cmd, rss in sampler.peaks.values() if "spawn" in cmd or "multiprocessing" in cmd]
    out.update(config=config, seconds=seconds,
               client_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               worker_peak_mb=max(workers, default=0) / 2**20, workers_sum_peak_mb=sum(workers) / 2**20,
               processes=len(sampler.peaks))
    print(json.dumps(out))


# ----------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--row-groups", type=int, default=1900)
    ap.add_argument("--train-rows", type=int, default=0)
    ap.add_argument("--out", default="bench-out/split")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    out = Path(args.out)
    dst = out / f"dst-rg{args.row_groups}-t{args.train_rows}"
    info = make_dst(dst, args.row_groups, args.train_rows)
    print(f"== {info['rows']:,} rows in {info['row_groups']:,} row groups, images.parquet {info['bytes'] / 1e6:.1f} MB",
          flush=True)
    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for c in configs:
            spec = json.dumps({"config": c, "dst": str(dst)})
            proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                                  cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{c} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[c].append(r)
            print(f"rep {rep} {c:<10} {r['seconds']:7.2f} s  client {r['client_peak_mb']:7.0f} MB  "
                  f"worker max {r['worker_peak_mb']:6.0f} MB  (q {r['queries']}, g {r['gallery']}, "
                  f"findings {r['findings']})", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "nproc": os.cpu_count(), "cpu": cpu_name(),
            "python": platform.python_version(), "argv": sys.argv, "input": info}
    (out / f"results-rg{args.row_groups}-t{args.train_rows}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n| config | wall s (median) | client peak MB | worker peak MB (max / sum) |")
    print("|---|---|---|---|")
    for c in configs:
        rs = results[c]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        workers = f"{med('worker_peak_mb'):.0f} / {med('workers_sum_peak_mb'):.0f}" if c != "plain" else "-"
        runs = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"| {c} | {med('seconds'):.2f} (runs: {runs}) | "
              f"{med('client_peak_mb'):.0f} | {workers} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
