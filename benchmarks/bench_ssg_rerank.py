"""Benchmark: the sparse SSG clustering distance (sysu30k.train.ssg.rerank: k-reciprocal Jaccard + source term,
eps, DBSCAN) against the dense algorithm (tests/ssg_reference.py: the original N×N re-ranking code in
float64, with its per-row loops and the inverted-index Jaccard), and its absolute cost at scale.

(a) ``--compare-n``: both side by side, interleaved over ``--reps``, medians; checks that eps and the
    DBSCAN labels are the same. (b) ``--scale-n``: the sparse one alone, time per stage, peak memory and
    the number of stored pairs. Every measurement runs in its own child process (through a wrapper
    whose ``RUSAGE_CHILDREN.ru_maxrss`` is the child's peak RSS). Features: a Gaussian mixture on the
    unit sphere with N/16 clusters (``--noise`` sets how tight), plus N/2 source features from another
    mixture; generation and imports are not timed, and the RSS after them (the input) is reported.

    python benchmarks/bench_ssg_rerank.py --compare-n 3000,6000 --scale-n 20000 --reps 3
    python benchmarks/bench_ssg_rerank.py --compare-n "" --scale-n 100000 --reps 1

Writes ``OUT/results.json`` and ``OUT/section.md`` (a BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WRAPPER = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:]); "
           "print(json.dumps({'rc': p.returncode, "
           "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


# ----------------------------------------------------------------------------- child side

def make_features(n: int, dim: int, noise: float, seed: int):
    """Target (n × dim) and source (n/2 × dim) features: unit-sphere Gaussian mixtures, L2-normalised float32,
    and the target's true mixture component per row."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def mixture(rows: int, clusters: int):
        centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=gen), dim=1)
        comp = torch.randint(0, clusters, (rows,), generator=gen)
        x = torch.empty(rows, dim)
        for a in range(0, rows, 8192):
            z = min(rows, a + 8192)
            x[a:z] = torch.nn.functional.normalize(
                centres[comp[a:z]] + noise / dim ** 0.5 * torch.randn(z - a, dim, generator=gen), dim=1)
        return x, comp.numpy()

    target, truth = mixture(n, max(1, n // 16))
    source, _ = mixture(n // 2, max(1, n // 32))
    return target, source, truth


def child(config: str, n: int, dim: int, noise: float, rho: float, chunk: int) -> None:
    import numpy as np
    import sklearn.cluster  # noqa: F401  (import cost not timed)
    import torch
    from sklearn.metrics import adjusted_rand_score

    target, source, truth = make_features(n, dim, noise, seed=n)
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sysu30k").addHandler(handler)
    logging.getLogger("sysu30k").setLevel(logging.INFO)
    input_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = os.getloadavg()[0]
    out = {"config": config, "n": n, "input_kb": input_kb, "load1": load, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if config == "sparse":
        from sysu30k.train.ssg.rerank import cluster, select_eps, ssg_distance

        d = ssg_distance(target, source, chunk=chunk, device="cpu")
        t1 = time.perf_counter()
        eps = select_eps(d, rho)
        t2 = time.perf_counter()
        labels = cluster(d, eps)
        t3 = time.perf_counter()
        out["stages"] = {**d.timings, "eps": t2 - t1, "dbscan": t3 - t2}
        out.update(nnz=int(d.matrix.nnz), floor=d.floor,
                   eps_fallback=any("merging in the smallest unstored pairs" in x for x in messages))
    elif config == "dense":
        sys.path.insert(0, str(common.ROOT / "tests"))
        from ssg_reference import reference_distance, reference_eps, reference_labels

        dist = reference_distance(target.numpy(), source.numpy())
        eps = reference_eps(dist, rho)
        labels = reference_labels(dist, eps)
    else:
        raise SystemExit(f"unknown config {config}")
    out["seconds"] = time.perf_counter() - t0
    kept = labels >= 0
    out.update(eps=float(eps), clusters=int(labels.max() + 1), clustered=float(kept.mean()),
               ari_clustered=float(adjusted_rand_score(truth[kept], labels[kept])) if kept.any() else 0.0,
               load1_end=os.getloadavg()[0])
    np.save(os.environ["SSG_BENCH_LABELS"], labels)
    print(json.dumps(out))


# ----------------------------------------------------------------------------- parent side

def measure(config: str, n: int, args, labels_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--n", str(n), "--dim", str(args.dim), "--noise",
           str(args.noise), "--rho", str(args.rho), "--chunk", str(args.chunk)]
    env = {**os.environ, "SSG_BENCH_LABELS": str(labels_path)}
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or len(lines) < 2:
        raise SystemExit(f"{config} N={n} failed:\n{p.stdout}\n{p.stderr}")
    out, wrap = json.loads(lines[-2]), json.loads(lines[-1])
    if wrap["rc"]:
        raise SystemExit(f"{config} N={n} exited {wrap['rc']}:\n{p.stderr}")
    out["peak_kb"] = wrap["maxrss_kb"]
    return out


def summarise(runs: list[dict]) -> dict:
    med = {"seconds": statistics.median(r["seconds"] for r in runs),
           "peak_gib": statistics.median(r["peak_kb"] for r in runs) / 2**20,
           "input_gib": statistics.median(r["input_kb"] for r in runs) / 2**20,
           "load": [round(r["load1"], 1) for r in runs], "reps": len(runs)}
    med["extra_gib"] = med["peak_gib"] - med["input_gib"]
    for k in ("eps", "clusters", "clustered", "ari_clustered", "nnz", "floor", "eps_fallback"):
        if k in runs[0]:
            med[k] = runs[0][k]
    if "stages" in runs[0]:
        med["stages"] = {s: statistics.median(r["stages"][s] for r in runs) for s in runs[0]["stages"]}
    return med


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare-n", default="3000,6000", help="sizes for sparse vs dense (comma list; '' for none)")
    ap.add_argument("--scale-n", default="20000", help="sizes for the sparse one alone (comma list; '' for none)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--rho", type=float, default=1.6e-3)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scale-reps", type=int, default=1)
    ap.add_argument("--out", default="bench-out/ssg_rerank")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, args.dim, args.noise, args.rho, args.chunk)
        return
    compare = [int(x) for x in args.compare_n.split(",") if x]
    scale = [int(x) for x in args.scale_n.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "n")}, "machine": common.machine(),
              "package_sources": common.package_digest(), "compare": {}, "scale": {}}
    t_start = time.time()
    for n in compare:
        runs = {"sparse": [], "dense": []}
        same = []
        for rep in range(args.reps):
            for c in ("dense", "sparse"):
                r = measure(c, n, args, out / f"labels_{c}.npy")
                runs[c].append(r)
                print(f"N={n} rep {rep} {c:<6} {r['seconds']:8.2f} s  peak {r['peak_kb'] / 2**20:6.2f} GiB  "
                      f"eps {r['eps']:.6f}  clusters {r['clusters']}  load {r['load1']:.1f}", flush=True)
            same.append(bool(np.array_equal(np.load(out / "labels_sparse.npy"), np.load(out / "labels_dense.npy"))))
        result["compare"][n] = {c: summarise(v) for c, v in runs.items()}
        result["compare"][n]["labels_identical"] = all(same)
        result["compare"][n]["eps_rel_diff"] = max(abs(a["eps"] - b["eps"]) / b["eps"]
                                                   for a, b in zip(runs["sparse"], runs["dense"]))
        result["compare"][n]["runs"] = runs
    for n in scale:
        runs = []
        for rep in range(args.scale_reps):
            r = measure("sparse", n, args, out / "labels_sparse.npy")
            runs.append(r)
            print(f"N={n} rep {rep} sparse {r['seconds']:8.2f} s  peak {r['peak_kb'] / 2**20:6.2f} GiB  "
                  f"stages {json.dumps({k: round(v, 2) for k, v in r['stages'].items()})}", flush=True)
        result["scale"][n] = {**summarise(runs), "runs": runs}
    result["wall_s"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    (out / "section.md").write_text(section)
    print(section)


def markdown(r: dict) -> str:
    a, m = r["args"], r["machine"]
    lines = ["## SSG clustering distance, sparse vs dense (`benchmarks/bench_ssg_rerank.py`)", "",
             f"{a['dim']}-d L2-normalised float32 features: a Gaussian mixture with N/16 clusters (noise {a['noise']}) "
             f"and N/2 source features; k1 = 20, k2 = 6, λ = 0.1, ρ = {a['rho']}, DBSCAN min_samples 4. CPU only "
             f"({m['nproc']} cores, {m['cpu']}, torch {m['torch']}), k-NN chunk {a['chunk']}. Each measurement "
             "in its own process; peak = its `ru_maxrss`, input = RSS after generating the features and importing. "
             "Clusters: DBSCAN clusters found, the fraction of images not left out as outliers, and the adjusted "
             "Rand index of those images against the true mixture components.", ""]
    if r["compare"]:
        lines += [f"**(a) Side by side** ({a['reps']} interleaved repetitions, medians). Dense = "
                  "`tests/ssg_reference.py` (the original code's N×N matrices and loops, in float64).", "",
                  "| N | dense (s) | sparse (s) | speed-up | dense peak (GiB) | sparse peak (GiB) "
                  "| beyond input: dense / sparse (GiB) | same eps, same labels | clusters (clustered, ARI) "
                  "| 1-min load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for n, c in r["compare"].items():
            d, s = c["dense"], c["sparse"]
            same = "identical" if c["labels_identical"] else "DIFFER"
            lines.append(f"| {int(n):,} | {d['seconds']:.1f} | {s['seconds']:.1f} | "
                         f"**{d['seconds'] / s['seconds']:.1f}×** | {d['peak_gib']:.2f} | {s['peak_gib']:.2f} | "
                         f"{d['extra_gib']:.2f} / {s['extra_gib']:.2f} | "
                         f"eps rel. diff {c['eps_rel_diff']:.1e}, labels {same} | "
                         f"{s['clusters']} ({s['clustered']:.0%}, {s['ari_clustered']:.3f}) | "
                         f"{', '.join(map(str, d['load'] + s['load']))} |")
        lines.append("")
    if r["scale"]:
        stages = list(next(iter(r["scale"].values()))["stages"])
        lines += ["**(b) Sparse alone** (time per stage, s; `knn` = target k-NN + row max, `source` = target→source "
                  "nearest neighbour, `v_qe` = k-reciprocal sets + V + query expansion):", "",
                  "| N | " + " | ".join(stages) + " | total (s) | peak RSS (GiB) | beyond input (GiB) | stored pairs "
                  "(per row) | eps / floor (unstored pairs in eps) | clusters (clustered, ARI) | reps | 1-min load |",
                  "|---:|" + "---:|" * len(stages) + "---:|---:|---:|---:|---|---|---:|---|"]
        for n, s in r["scale"].items():
            lines.append(f"| {int(n):,} | " + " | ".join(f"{s['stages'][k]:.1f}" for k in stages)
                         + f" | {s['seconds']:.1f} | {s['peak_gib']:.2f} | {s['extra_gib']:.2f} | "
                         f"{s['nnz']:,} ({s['nnz'] / int(n):.0f}) | {s['eps']:.4f} / {s['floor']:.4f} "
                         f"({'yes' if s['eps_fallback'] else 'no'}) | {s['clusters']} ({s['clustered']:.0%}, "
                         f"{s['ari_clustered']:.3f}) | "
                         f"{s['reps']} | {', '.join(map(str, s['load']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
