"""Benchmark: k-reciprocal re-ranking of the evaluation (sysu30k.evaluation.rerank: exact, sparse) next to the
plain evaluation (sysu30k.evaluation.scoring.score) on the same features, and its deviation from the dense
algorithm (tests/evaluation/rerank_reference.py: torchreid's code in float64).

(a) ``--compare``: Q × G sets for the dense reference: max |Δ| of the final distances (all pairs, and the pairs
    re-ranking changes, d_J < 1), identical rankings and metrics. (b) ``--plan``: per feature dimension, the
    gallery sizes to run with ``--queries`` queries: plain and re-ranked evaluation, each in its own child
    process, time per stage; input = the child's RSS once the features exist, peak = its VmHWM, reset at that
    point (/proc/self/clear_refs), so the generation's temporaries do not count. When the sizes are below
    ``--full``, the full size is extrapolated (said so in the table): times from the largest size of each
    dimension, the k-NN pass (every row against every point) in proportion to (Q+G)², the other stages to
    Q+G, plain scoring to G (on a shared machine two sizes measured minutes apart disagree too much for a
    fitted intercept); the re-ranked memory beyond the input as the line through the two largest sizes in
    Q+G (fixed buffers plus per-point lists), the plain one as measured (it streams Q × block).

Features: L2-normalised float32, generated in the child (not timed): ``--queries`` identities with one query
and one true match each (another camera), and distractors (pid -1000) from a Gaussian mixture with G/16
clusters on the unit sphere; noise ``--noise`` (norm of the per-image perturbation).

    python benchmarks/bench_rerank.py --plan "256=50000,100000 2048=25000,50000"

Writes ``OUT/results.json`` and ``OUT/section.md`` (a BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ----------------------------------------------------------------------------- child side

def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def make_features(nq: int, ng: int, dim: int, noise: float, seed: int):
    """(query features, pids, camids, gallery features, pids, camids): the module docstring's set."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    clusters = max(1, (ng - nq) // 16)
    ids = torch.nn.functional.normalize(torch.randn(nq, dim, generator=gen), dim=1)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=gen), dim=1)

    def around(c: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(c + noise / dim ** 0.5 * torch.randn(c.shape, generator=gen), dim=1)

    qf = around(ids)
    gf = torch.empty(ng, dim)
    gf[:nq] = around(ids)
    comp = torch.randint(0, clusters, (ng - nq,), generator=gen)
    for a in range(0, ng - nq, 8192):
        z = min(ng - nq, a + 8192)
        gf[nq + a:nq + z] = around(centres[comp[a:z]])
    rng = np.random.default_rng(seed)
    qcam = rng.integers(0, 4, nq)
    gpid = np.concatenate([np.arange(nq), np.full(ng - nq, -1000)])
    gcam = np.concatenate([(qcam + 1) % 4, rng.integers(0, 4, ng - nq)])
    return qf, np.arange(nq), qcam, gf, gpid, gcam


def child(config: str, nq: int, ng: int, dim: int, noise: float) -> None:
    import numpy as np
    import torch

    from sysu30k.evaluation.rerank import rerank, score_distances
    from sysu30k.evaluation.scoring import score

    qf, qp, qcam, gf, gp, gcam = make_features(nq, ng, dim, noise, seed=ng + dim)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                      # VmHWM := VmRSS: the peak from here on
    out = {"config": config, "queries": nq, "gallery": ng, "dim": dim, "threads": torch.get_num_threads(),
           "input_kb": status_kb("VmRSS"), "load1": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if config == "plain":
        s = score(qf, qp, qcam, gf, gp, gcam)
    elif config == "rerank":
        r = rerank(qf, gf, device="cpu")
        t1 = time.perf_counter()
        s = score_distances(r.distances, qp, qcam, gp, gcam)
        out["stages"] = {"knn": r.stats["knn_s"], "v": r.stats["v_s"], "jaccard": r.stats["jaccard_s"],
                         "score": time.perf_counter() - t1}
        out["sets"] = {k: r.stats[k] for k in ("v_rows", "support", "b_rows", "candidates", "pairs", "slow_rows")}
    elif config == "dense":
        sys.path.insert(0, str(common.ROOT / "tests" / "evaluation"))
        from rerank_reference import dense_inputs, re_ranking

        q64, g64 = qf.double(), gf.double()
        r = rerank(q64, g64, device="cpu")
        got = r.distances(np.arange(ng))
        out["sparse_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        want = re_ranking(*dense_inputs(q64.numpy(), g64.numpy()))
        out["dense_s"] = time.perf_counter() - t1
        stored = r.jaccard.tocoo()
        labels = (qp, qcam, gp, gcam)
        a, b = score_distances(r.distances, *labels), score_distances(lambda g: want[:, g], *labels)
        order = [np.lexsort((np.broadcast_to(np.arange(ng), d.shape), d), axis=1) for d in (got, want)]
        out.update(max_dev=float(np.abs(got - want).max()),
                   max_dev_changed=float(np.abs(got - want)[stored.row, stored.col].max()),
                   changed_pairs=int(stored.nnz), rankings_identical=bool(np.array_equal(*order)),
                   metrics_identical=bool(np.array_equal(a.cmc, b.cmc) and np.array_equal(a.first_rank, b.first_rank)
                                          and abs(a.map_official - b.map_official) < 1e-9
                                          and abs(a.map_standard - b.map_standard) < 1e-9))
        s = a
    else:
        raise SystemExit(f"unknown config {config}")
    out["seconds"] = time.perf_counter() - t0
    out["peak_kb"] = status_kb("VmHWM")
    out["extra_gib"] = (out["peak_kb"] - out["input_kb"]) / 2**20
    out["summary"] = s.summary()
    out["load1_end"] = os.getloadavg()[0]
    print(json.dumps(out))


# ----------------------------------------------------------------------------- parent side

def measure(config: str, nq: int, ng: int, dim: int, noise: float) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--queries", str(nq), "--n", str(ng), "--dim", str(dim),
           "--noise", str(noise)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"{config} Q={nq} G={ng} {dim}-d failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(lines[-1])


def extrapolate(small: dict, large: dict, full: int) -> dict:
    """The full size from two sizes (plain and re-ranked runs each), as the module docstring says."""
    n1, n2 = (p["rerank"]["queries"] + p["rerank"]["gallery"] for p in (small, large))
    n = large["rerank"]["queries"] + full
    stages = {k: v * (n / n2) ** (2 if k == "knn" else 1) for k, v in large["rerank"]["stages"].items()}
    e1, e2 = small["rerank"]["extra_gib"], large["rerank"]["extra_gib"]
    return {"stages": stages, "seconds": sum(stages.values()),
            "plain": large["plain"]["seconds"] * full / large["plain"]["gallery"],
            "extra_gib": e2 + (e2 - e1) * (n - n2) / (n2 - n1), "plain_extra_gib": large["plain"]["extra_gib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="256=50000,100000 2048=25000,50000",
                    help="DIM=G1,G2 ... : gallery sizes per feature dimension")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--full", type=int, default=479_730, help="the gallery size to extrapolate to")
    ap.add_argument("--compare", default="100x2000", help="QxG sets for the dense reference (comma list; '' none)")
    ap.add_argument("--compare-dims", default="32,256")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--out", default="bench-out/rerank")
    ap.add_argument("--report", default=None, help="print the section of an earlier OUT/results.json and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.queries, args.n, args.dim, args.noise)
        return
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "n", "dim")},
              "machine": common.machine(), "package_sources": common.package_digest(), "compare": [], "scale": []}
    t_start = time.time()
    for qg in filter(None, args.compare.split(",")):
        nq, ng = map(int, qg.split("x"))
        for dim in map(int, args.compare_dims.split(",")):
            r = measure("dense", nq, ng, dim, args.noise)
            result["compare"].append(r)
            print(f"dense Q={nq} G={ng} {dim}-d: max dev {r['max_dev']:.2e} (changed pairs {r['max_dev_changed']:.2e}),"
                  f" rankings identical {r['rankings_identical']}, metrics identical {r['metrics_identical']}",
                  flush=True)
    for item in args.plan.split():
        dim, sizes = item.split("=")
        for ng in map(int, sizes.split(",")):
            pair = {c: measure(c, args.queries, ng, int(dim), args.noise) for c in ("plain", "rerank")}
            result["scale"].append(pair)
            p, r = pair["plain"], pair["rerank"]
            print(f"{dim}-d G={ng}: plain {p['seconds']:.1f} s peak {p['peak_kb'] / 2**20:.2f} GiB | rerank "
                  f"{r['seconds']:.1f} s peak {r['peak_kb'] / 2**20:.2f} GiB stages "
                  f"{json.dumps({k: round(v, 1) for k, v in r['stages'].items()})} sets {json.dumps(r['sets'])}",
                  flush=True)
    result["wall_s"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    (out / "section.md").write_text(section)
    print(section)


def markdown(r: dict) -> str:
    a, m = r["args"], r["machine"]
    lines = ["## Re-ranked evaluation at SYSU-30k size (issue 20 item 1): `benchmarks/bench_rerank.py`", "",
             f"k-reciprocal re-ranking (k1 = 20, k2 = 6, λ = 0.3), exact, next to plain scoring on the same "
             f"features: {a['queries']:,} identities with one query and one true match each, distractors from a "
             f"mixture with G/16 clusters, noise {a['noise']}, L2-normalised float32 (synthetic: the rank-1 and mAP "
             f"columns check the pipeline, they are no quality figure). CPU only ({m['nproc']} cores, {m['cpu']}, "
             f"torch {m['torch']}, shared: see the load column). Each measurement in its own process; input = its "
             "RSS once the features exist, peak = its VmHWM from then on.", ""]
    if r["compare"]:
        lines += ["**Against the dense algorithm** (`tests/evaluation/rerank_reference.py`, torchreid's code in "
                  "float64; the same scorer on both):", "",
                  "| Q × G | dim | max abs. deviation, all pairs | on the pairs re-ranking changes (d_J < 1) | "
                  "changed pairs | rankings | CMC, both mAPs | dense (s) | sparse (s) |",
                  "|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for c in r["compare"]:
            lines.append(f"| {c['queries']} × {c['gallery']:,} | {c['dim']} | {c['max_dev']:.1e} | "
                         f"{c['max_dev_changed']:.1e} | {c['changed_pairs']:,} | "
                         f"{'identical' if c['rankings_identical'] else 'DIFFER'} | "
                         f"{'identical' if c['metrics_identical'] else 'DIFFER'} | {c['dense_s']:.1f} | "
                         f"{c['sparse_s']:.1f} |")
        lines.append("")
    if r["scale"]:
        lines += ["**Time and memory** (s; GiB). `knn` = the float32 pass over all Q+G rows with the float64 "
                  "certificate, `v` = k-reciprocal sets, V and query expansion on the needed rows, `jaccard` = the "
                  "overlapping pairs, `score` = the re-ranked distances streamed into the scorer:", "",
                  "| dim | gallery | plain (s) | re-ranked (s) | knn | v | jaccard | score | plain peak | re-ranked "
                  "peak | input | rows with V | candidate gallery items | stored pairs | rank-1 plain → re-ranked | "
                  "mAP plain → re-ranked | 1-min load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for pair in r["scale"]:
            p, q = pair["plain"], pair["rerank"]
            st = q["stages"]
            lines.append(f"| {q['dim']} | {q['gallery']:,} | {p['seconds']:.1f} | {q['seconds']:.1f} | "
                         f"{st['knn']:.1f} | {st['v']:.1f} | {st['jaccard']:.1f} | {st['score']:.1f} | "
                         f"{p['peak_kb'] / 2**20:.2f} | {q['peak_kb'] / 2**20:.2f} | {q['input_kb'] / 2**20:.2f} | "
                         f"{q['sets']['v_rows']:,} | {q['sets']['candidates']:,} | {q['sets']['pairs']:,} | "
                         f"{p['summary']['rank1']:.3f} → {q['summary']['rank1']:.3f} | "
                         f"{p['summary']['mAP_official']:.3f} → {q['summary']['mAP_official']:.3f} | "
                         f"{p['load1']:.1f}, {q['load1']:.1f} |")
        full = a["full"]
        per_dim: dict = {}
        for pair in r["scale"]:
            per_dim.setdefault(pair["rerank"]["dim"], []).append(pair)
        todo = {d: sorted(v, key=lambda p: p["rerank"]["gallery"])[-2:] for d, v in per_dim.items()
                if len(v) > 1 and max(p["rerank"]["gallery"] for p in v) < full}
        if todo:
            lines += ["", f"**Extrapolated to {full:,} gallery items** (not measured): times from the largest "
                      "size of each dimension, the k-NN pass in proportion to (Q+G)² (it compares every row with "
                      "every point), the other stages to Q+G, plain scoring to G; the re-ranked memory beyond the "
                      "input through the two largest sizes (fixed buffers + per-point lists), the plain one as "
                      f"measured (it streams); features = the {full:,} + {a['queries']:,} float32 rows.", "",
                      "| dim | plain (s) | re-ranked (s) | knn | v + jaccard + score | plain beyond input (GiB) "
                      "| re-ranked beyond input (GiB) | features (GiB) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for dim, (small, large) in todo.items():
                e = extrapolate(small, large, full)
                lines.append(f"| {dim} | {e['plain']:,.0f} | {e['seconds']:,.0f} ({e['seconds'] / 3600:.1f} h) | "
                             f"{e['stages']['knn']:,.0f} | {e['seconds'] - e['stages']['knn']:,.0f} | "
                             f"{e['plain_extra_gib']:.2f} | {e['extra_gib']:.2f} | "
                             f"{(full + a['queries']) * dim * 4 / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
