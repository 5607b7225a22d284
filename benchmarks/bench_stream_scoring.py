"""Benchmark: the streaming scorer (sysu30k.evaluation.scoring.Scorer) against the bare matrix product of
the same sizes, and the in-memory score() against the query-chunked scorer it replaced
(benchmarks/chunked_scorer_436eeed.py).

* ``official``: 1,000 queries × G gallery × 28,310-d features generated block by block (seeded, L2-
  normalised; gallery item i < Q is a noisy copy of query i, its true match), never held whole.
  Configs: ``stream`` (generate, Scorer.add), ``matmul`` (generate, q @ block.T), ``generate`` alone.
* ``d2048``: 1,000 × G × 2048 in memory: ``new`` (score()), ``old`` (the 436eeed scorer), ``matmul``.

Every measurement runs in a child process (its peak RSS from ``ru_maxrss``); configurations are
interleaved over ``--reps`` and medians reported.

    OMP_NUM_THREADS=2 python benchmarks/bench_stream_scoring.py --part official --gallery 8192 --reps 3
    OMP_NUM_THREADS=2 python benchmarks/bench_stream_scoring.py --part d2048 --gallery 100000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PARTS = {"official": ("stream", "matmul", "generate"), "d2048": ("new", "old", "matmul")}


def _features(nq: int, dim: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(nq, dim, generator=gen), dim=1), gen


def _block(gen, n: int, dim: int):
    import torch

    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def child(part: str, config: str, nq: int, ng: int, dim: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from sysu30k.evaluation.scoring import Scorer, auto_chunk, score

    q, gen = _features(nq, dim)
    qpid, qcam = np.arange(nq), np.full(nq, 2)
    gpid = np.full(ng, -1000)
    gpid[:nq] = qpid
    gcam = np.ones(ng, np.int64)
    out: dict = {}
    if part == "official":
        step = auto_chunk(nq, ng, "cpu")
        t0 = time.perf_counter()
        s = Scorer(q, qpid, qcam, gpid, gcam) if config == "stream" else None
        first = torch.nn.functional.normalize(q + 1.5 * _block(gen, nq, dim), dim=1)
        if s is not None:
            s.add_matches(np.arange(nq), first)
        for a in range(nq, ng, step):
            b = min(ng, a + step)
            blk = _block(gen, b - a, dim)
            if config == "stream":
                s.add(np.arange(a, b), blk)
            elif config == "matmul":
                _ = q @ blk.T
        if s is not None:
            out["summary"] = s.result().summary()
        out["seconds"] = time.perf_counter() - t0
        return out
    g = torch.empty(ng, dim)
    for a in range(0, ng, 16384):
        g[a:a + 16384] = _block(gen, min(16384, ng - a), dim)
    g[:nq] = torch.nn.functional.normalize(q + 1.5 * g[:nq], dim=1)
    out["rss_input_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    if config == "new":
        out["summary"] = score(q, qpid, qcam, g, gpid, gcam).summary()
    elif config == "old":
        import chunked_scorer_436eeed as old

        out["summary"] = old.score(q, qpid, qcam, g, gpid, gcam, chunk=old.auto_chunk(nq, ng, "cpu")).summary()
    else:
        for a in range(0, nq, 208):
            _ = q[a:a + 208] @ g.T
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), default="official")
    ap.add_argument("--gallery", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=None, help="default: 28,310 (official) or 2048 (d2048)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        part, config, nq, ng, dim = a.child
        res = child(part, config, int(nq), int(ng), int(dim))
        res["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps(res))
        return
    dim = a.dim or (28_310 if a.part == "official" else 2048)
    runs: dict[str, list[dict]] = {c: [] for c in PARTS[a.part]}
    for _ in range(a.reps):
        for c in PARTS[a.part]:
            p = subprocess.run([sys.executable, __file__, "--child", a.part, c, str(a.queries), str(a.gallery),
                                str(dim)], capture_output=True, text=True, check=True)
            runs[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {c: statistics.median(r["seconds"] for r in rs) for c, rs in runs.items()}
    rss = {c: max(r["maxrss_gb"] for r in rs) for c, rs in runs.items()}
    sums = {c: rs[0]["summary"] for c, rs in runs.items() if "summary" in rs[0]}
    if a.part == "d2048":
        assert sums["new"] == sums["old"], sums
    print(f"{a.part}: {a.queries} x {a.gallery} x {dim}, median of {a.reps}")
    for c in runs:
        print(f"  {c:9s} {med[c]:8.2f} s   peak RSS {rss[c]:.2f} GB")
    base = "matmul"
    for c in runs:
        if c != base and c != "generate":
            print(f"  {c}/{base}: {med[c] / med[base]:.3f}")
    if a.part == "official":
        gen = med["generate"]
        print(f"  (stream-generate)/(matmul-generate): {(med['stream'] - gen) / (med['matmul'] - gen):.3f}")
    else:
        print(f"  new/old: {med['new'] / med['old']:.3f}")
    print("  summary:", json.dumps(next(iter(sums.values()))))


if __name__ == "__main__":
    main()
