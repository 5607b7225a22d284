"""Benchmark: the k-NN pass of re-ranking (sysu30k.evaluation.rerank.neighbours: symmetric block pairs,
each multiplied once, thresholded tiles) against the pass it replaced (benchmarks/rerank_b759d24.py: row
chunks against every point, a top-k per chunk), side by side in one process on the same features.

Features: bench_rerank.py's set (``--queries`` identities with a true match each, Gaussian-mixture
distractors). Per size, ``--repeats`` rounds alternate old and new; the outputs (L_K, their squared
distances, the row maxima) must be identical, else the run stops. Quoted: medians and the median ratio.

    python benchmarks/bench_knn_pass.py --plan "256=50000 2048=25000"

Writes ``OUT/results.json`` and ``OUT/section.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run_once(module, feats, norms, k: int) -> tuple[float, tuple]:
    """(seconds, outputs) of one ``neighbours`` call of ``module``."""
    t0 = time.perf_counter()
    out = module.neighbours(feats, norms, k)
    return time.perf_counter() - t0, out


def main() -> None:
    import numpy as np
    import rerank_b759d24 as old
    import torch
    from bench_rerank import make_features

    from sysu30k.evaluation import rerank as new

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="256=50000 2048=25000", help="DIM=G ... : gallery size per dimension")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=21, help="list length (k1 + 1 for the default k1 = 20)")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--out", default="bench-out/knn-pass")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "machine": common.machine(), "package_sources": common.package_digest(),
              "threads": torch.get_num_threads(), "runs": []}
    for item in args.plan.split():
        dim, ng = map(int, item.split("="))
        qf, _, _, gf, _, _ = make_features(args.queries, ng, dim, args.noise, seed=ng + dim)
        feats = [qf.double(), gf.double()]
        norms = torch.cat([f.norm(dim=1) for f in feats])
        times: dict[str, list[float]] = {"old": [], "new": []}
        load = []
        for _ in range(args.repeats):
            load.append(os.getloadavg()[0])
            t_old, a = run_once(old, feats, norms, args.k)
            t_new, b = run_once(new, feats, norms, args.k)
            for x, y in zip(a[:3], b[:3]):
                if not np.array_equal(x, y):
                    raise SystemExit(f"{dim}-d G={ng}: the new pass disagrees with the old one")
            times["old"].append(t_old)
            times["new"].append(t_new)
        n = args.queries + ng
        row = {"dim": dim, "gallery": ng, "points": n, "old_s": times["old"], "new_s": times["new"],
               "old_median_s": statistics.median(times["old"]), "new_median_s": statistics.median(times["new"]),
               "ratio_median": statistics.median(o / w for o, w in zip(times["old"], times["new"])),
               "new_ns_per_pair": statistics.median(times["new"]) / n ** 2 * 1e9, "slow_rows": int(b[3]),
               "load1": load}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| features | points (Q+G) | old pass (median) | new pass (median) | old / new (median) | new, ns per "
             "point pair | identical outputs |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['dim']}-d | {r['points']:,} | {r['old_median_s']:.1f} s | {r['new_median_s']:.1f} s | "
                     f"{r['ratio_median']:.2f}× | {r['new_ns_per_pair']:.2f} | yes |")
    section = "\n".join(lines) + "\n"
    (out / "section.md").write_text(section)
    print(section)


if __name__ == "__main__":
    main()
