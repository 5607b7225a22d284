"""Benchmark: exact chunked scoring (sysu30k.evaluation.scoring.score) against the common ReID-library
approach (full Q×G distance matrix + np.argsort of every row + torchreid's eval_market1501 logic,
vectorised) and against the bare matrix product, at SYSU-30k scale.

Every measurement runs in its own child process (started through a small wrapper process whose
``RUSAGE_CHILDREN.ru_maxrss`` is the child's peak RSS); configurations are interleaved over ``--reps``
repetitions and medians reported. The features are random, L2-normalised float32, generated in chunks
(seeded; each query's true match is a noisy copy of it so the metrics are not all zero); generation is
not timed, and the RSS right after it (the input: gallery + queries) is reported beside the peak.

    python benchmarks/bench_scoring.py --gallery 100000 --reps 3          # smoke size
    python benchmarks/bench_scoring.py --reps 3                            # 1,000 × 479,730 × 2048

Writes ``OUT/results.json`` and ``OUT/section.md`` (a BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name  # noqa: E402  (benchmarks/common.py)

CONFIGS = ("ours", "baseline", "matmul_chunked", "matmul_full")
WRAPPER = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:]); "
           "print(json.dumps({'rc': p.returncode, "
           "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


# ----------------------------------------------------------------------------- child side

def make_features(nq: int, ng: int, dim: int, seed: int = 0):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, dim, generator=gen)
    q = torch.nn.functional.normalize(q, dim=1)
    g = torch.empty(ng, dim)
    step = 16384
    for a in range(0, ng, step):
        b = min(ng, a + step)
        g[a:b] = torch.nn.functional.normalize(torch.randn(b - a, dim, generator=gen), dim=1)
    m = min(nq, ng)
    g[:m] = torch.nn.functional.normalize(q[:m] + 12.0 * g[:m], dim=1)   # true match i of query i
    qpid = np.arange(28311, 28311 + nq)
    gpid = np.full(ng, -1000)
    gpid[:m] = qpid[:m]
    return q, qpid, np.full(nq, 2), g, gpid, np.full(ng, 1)


def baseline_eval(q, qpid, qcam, g, gpid, gcam, max_rank=20):
    """The common-library path: dense distance matrix, full argsort of every row, then the per-query
    metric loop of torchreid's eval_market1501 (with its per-element list comprehension vectorised).
    Reports the same metrics: CMC and both APs, averaged over ALL queries like the official script."""
    import numpy as np

    distmat = (1 - q @ g.T).numpy()                         # torchreid: cosine distance, Q×G float32
    indices = np.argsort(distmat, axis=1)
    matches = (gpid[indices] == qpid[:, np.newaxis]).astype(np.int32)
    nq = len(qpid)
    cmc_sum = np.zeros(max_rank)
    ap_off = ap_std = 0.0
    for i in range(nq):
        order = indices[i]
        remove = (gpid[order] == qpid[i]) & (gcam[order] == qcam[i])
        keep = np.invert(remove)
        raw_cmc = matches[i][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc_sum += cmc[:max_rank]
        rows = np.flatnonzero(raw_cmc)
        k = np.arange(len(rows))
        precision = (k + 1) / (rows + 1)
        old = np.where(rows != 0, k / np.maximum(rows, 1), 1.0)
        ap_off += float(np.mean((old + precision) / 2))
        ap_std += float(precision.mean())
    return {"rank1": cmc_sum[0] / nq, "rank5": cmc_sum[4] / nq, "rank10": cmc_sum[9] / nq, "rank20": cmc_sum[19] / nq,
            "mAP_official": ap_off / nq, "mAP_standard": ap_std / nq}


def child(config: str, nq: int, ng: int, dim: int, chunk: int) -> None:
    import torch

    q, qpid, qcam, g, gpid, gcam = make_features(nq, ng, dim)
    input_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    metrics = None
    if config == "ours":
        from sysu30k.evaluation.scoring import score

        s = score(q, qpid, qcam, g, gpid, gcam, chunk=chunk, device="cpu")
        metrics = s.summary()
    elif config == "baseline":
        metrics = baseline_eval(q, qpid, qcam, g, gpid, gcam)
    elif config == "matmul_chunked":
        with torch.inference_mode():
            for a in range(0, nq, chunk):
                s = q[a:a + chunk] @ g.T
                del s
    elif config == "matmul_full":
        with torch.inference_mode():
            s = q @ g.T
            del s
    else:
        raise SystemExit(f"unknown config {config}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"config": config, "seconds": seconds, "input_kb": input_kb, "load1": load,
                      "load1_end": os.getloadavg()[0], "threads": torch.get_num_threads(), "metrics": metrics}))


# ----------------------------------------------------------------------------- parent side

def measure(config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--queries", str(args.queries), "--gallery", str(args.gallery),
           "--dim", str(args.dim), "--chunk", str(args.chunk)]
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or len(lines) < 2:
        raise SystemExit(f"{config} failed:\n{p.stdout}\n{p.stderr}")
    out = json.loads(lines[-2])
    wrap = json.loads(lines[-1])
    if wrap["rc"]:
        raise SystemExit(f"{config} exited {wrap['rc']}:\n{p.stderr}")
    out["peak_kb"] = wrap["maxrss_kb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--gallery", type=int, default=479_730)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="bench-out/scoring")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.queries, args.gallery, args.dim, args.chunk)
        return
    configs = [c for c in args.configs.split(",") if c]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    t0 = time.time()
    for rep in range(args.reps):
        for c in configs:
            r = measure(c, args)
            runs[c].append(r)
            print(f"rep {rep} {c:<15} {r['seconds']:8.2f} s  peak {r['peak_kb'] / 2**20:6.2f} GiB  "
                  f"input {r['input_kb'] / 2**20:6.2f} GiB  load {r['load1']:.1f}->{r['load1_end']:.1f}", flush=True)
    med = {c: {"seconds": statistics.median(r["seconds"] for r in rs),
               "peak_gib": statistics.median(r["peak_kb"] for r in rs) / 2**20,
               "input_gib": statistics.median(r["input_kb"] for r in rs) / 2**20,
               "load": [round(r["load1"], 1) for r in rs]} for c, rs in runs.items()}
    for c in med:
        med[c]["extra_gib"] = med[c]["peak_gib"] - med[c]["input_gib"]
    check = {}
    if "ours" in runs and "baseline" in runs:
        mo, mb = runs["ours"][0]["metrics"], runs["baseline"][0]["metrics"]
        check["metrics_ours"] = mo
        check["metrics_baseline"] = mb
        check["max_abs_diff"] = max(abs(mo[k] - mb[k]) for k in mb)
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "median": med, "runs": runs, **check,
              "wall_s": time.time() - t0, "cpus": os.cpu_count(),
              "cpu": cpu_name(), "torch_threads": runs[configs[0]][0]["threads"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    (out / "section.md").write_text(section)
    print(section)


def markdown(r: dict) -> str:
    a, m = r["args"], r["median"]
    lines = ["## Scoring at SYSU-30k scale (`benchmarks/bench_scoring.py`)", "",
             f"{a['queries']:,} queries × {a['gallery']:,} gallery × {a['dim']}-d random L2-normalised float32 "
             f"features, CPU ({r['cpus']} cores, {r['cpu']}, torch threads {r['torch_threads']}), "
             f"chunk {a['chunk']}, {a['reps']} interleaved repetitions, medians; each measurement in its own "
             "process, peak = its `ru_maxrss`; input = RSS after generating the features (held by every "
             "configuration).", "",
             "| configuration | time (s) | × ours | peak RSS (GiB) | beyond input (GiB) | 1-min load seen |",
             "|---|---:|---:|---:|---:|---|"]
    names = {"ours": "ours: `score` (chunked, rank counting)",
             "baseline": "dense distmat + `np.argsort` + eval_market1501 loop",
             "matmul_chunked": f"bare matmul, chunks of {a['chunk']}", "matmul_full": "bare matmul, one Q×G product"}
    ours = m.get("ours", {}).get("seconds")
    for c, v in m.items():
        ratio = f"{v['seconds'] / ours:.2f}" if ours else "-"
        lines.append(f"| {names.get(c, c)} | {v['seconds']:.2f} | {ratio} | {v['peak_gib']:.2f} | "
                     f"{v['extra_gib']:.2f} | {', '.join(map(str, v['load']))} |")
    if "ours" in m and "baseline" in m:
        b, o = m["baseline"], m["ours"]
        lines += ["", f"- speed-up over the library approach: **{b['seconds'] / o['seconds']:.1f}×** (target ≥ 5×)",
                  f"- peak memory vs the library approach: **{o['peak_gib'] / b['peak_gib']:.2f}** of it in total "
                  f"(target ≤ 0.33); beyond the shared input: {o['extra_gib']:.2f} vs {b['extra_gib']:.2f} GiB "
                  f"({o['extra_gib'] / max(b['extra_gib'], 1e-9):.3f})"]
    for c in ("matmul_chunked", "matmul_full"):
        if "ours" in m and c in m:
            lines.append(f"- ours / {c}: **{m['ours']['seconds'] / m[c]['seconds']:.2f}×** (target ≤ 1.3×)")
    if "max_abs_diff" in r:
        lines.append(f"- same metrics: largest difference between ours and the library approach "
                     f"{r['max_abs_diff']:.2e} (rank-1 {r['metrics_ours']['rank1']:.4f}, "
                     f"mAP official {r['metrics_ours']['mAP_official']:.4f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
