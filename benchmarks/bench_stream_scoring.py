"""Benchmark: the streaming scorer (sysu30k.evaluation.scoring.Scorer) against the bare matrix product of
the same sizes, and the in-memory score() against the query-chunked scorer it replaced
(benchmarks/chunked_scorer_436eeed.py).

* ``official``: 1,000 queries × G gallery × 28,310-d features generated block by block (seeded, L2-
  normalised; gallery item i < Q is a noisy copy of query i, its true match), never held whole.
  Configs: ``stream`` (generate, Scorer.add), ``matmul`` (generate, q @ block.T), ``generate`` alone.
* ``d2048``: 1,000 × G × 2048 in memory: ``new`` (score()), ``old`` (the 436eeed scorer), ``matmul``; with
  ``--rev REV`` also ``rev``: score() of ``sysu30k/evaluation/scoring.py`` as it was at git revision REV (the
  before of a change to the scorer, in the same rounds).

Every measurement runs in a child process (its peak RSS from ``ru_maxrss``); configurations are
interleaved over ``--reps`` and medians reported, with each round's ratios (the configurations of one
round ran back to back, so a ratio sees the same load) and their median, and each configuration's median
CPU time (its process's, over the same span: what a loaded machine inflates least). ``--chunk N`` gives
score() and the stream blocks of N items instead of auto_chunk's. Raw timings, the machine and the package's
source digests go to ``--out`` (a JSON file).

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
import types
from pathlib import Path

PARTS = {"official": ("stream", "matmul", "generate"), "d2048": ("new", "old", "matmul")}


def _features(nq: int, dim: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(nq, dim, generator=gen), dim=1), gen


def _block(gen, n: int, dim: int):
    import torch

    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def scoring_at(rev: str) -> types.ModuleType:
    """``sysu30k/evaluation/scoring.py`` as it was at git revision ``rev``, imported as a module of its own (its
    relative imports resolve in this tree)."""
    path = "sysu30k/evaluation/scoring.py"
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=Path(__file__).resolve().parent.parent,
                           capture_output=True, text=True, check=True)
    module = types.ModuleType(f"scoring_at_{rev}")
    module.__package__ = "sysu30k.evaluation"
    sys.modules[module.__name__] = module          # dataclasses look their module up while the class is created
    exec(compile(shown.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def child(part: str, config: str, nq: int, ng: int, dim: int, chunk: int | None = None, rev: str = "") -> dict:
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
        step = chunk or auto_chunk(nq, ng, "cpu")
        t0, c0 = time.perf_counter(), time.process_time()
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
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
        return out
    g = torch.empty(ng, dim)
    for a in range(0, ng, 16384):
        g[a:a + 16384] = _block(gen, min(16384, ng - a), dim)
    g[:nq] = torch.nn.functional.normalize(q + 1.5 * g[:nq], dim=1)
    out["rss_input_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0, c0 = time.perf_counter(), time.process_time()
    if config in ("new", "rev"):
        scorer = score if config == "new" else scoring_at(rev).score
        out["summary"] = scorer(q, qpid, qcam, g, gpid, gcam, chunk=chunk).summary()
    elif config == "old":
        import chunked_scorer_436eeed as old

        out["summary"] = old.score(q, qpid, qcam, g, gpid, gcam, chunk=old.auto_chunk(nq, ng, "cpu")).summary()
    else:
        for a in range(0, nq, 208):
            _ = q[a:a + 208] @ g.T
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), default="official")
    ap.add_argument("--gallery", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=None, help="default: 28,310 (official) or 2048 (d2048)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=0, help="gallery items per block of the new scorer (0: auto_chunk)")
    ap.add_argument("--rev", default="", help="d2048: also time score() of the scorer at this git revision")
    ap.add_argument("--out", default=None, help="raw results (default bench-out/stream_scoring_PART.json)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        part, config, nq, ng, dim, chunk, rev = a.child
        res = child(part, config, int(nq), int(ng), int(dim), int(chunk) or None, rev)
        res["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps(res))
        return
    import common

    started = common.machine()                    # the load when the run started
    dim = a.dim or (28_310 if a.part == "official" else 2048)
    configs = PARTS[a.part] + (("rev",) if a.rev and a.part == "d2048" else ())
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(a.reps):
        for c in configs:
            p = subprocess.run([sys.executable, __file__, "--child", a.part, c, str(a.queries), str(a.gallery),
                                str(dim), str(a.chunk), a.rev], capture_output=True, text=True, check=True)
            runs[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {c: statistics.median(r["seconds"] for r in rs) for c, rs in runs.items()}
    rss = {c: max(r["maxrss_gb"] for r in rs) for c, rs in runs.items()}
    sums = {c: rs[0]["summary"] for c, rs in runs.items() if "summary" in rs[0]}
    if a.part == "d2048":
        assert all(x == sums["new"] for x in sums.values()), sums
    print(f"{a.part}: {a.queries} x {a.gallery} x {dim}, median of {a.reps}"
          + (f", new scorer's block {a.chunk}" if a.chunk else "") + (f", rev = {a.rev}" if "rev" in runs else ""))
    for c in runs:
        each = " ".join(f"{r['seconds']:.2f}" for r in runs[c])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[c])
        print(f"  {c:9s} {med[c]:8.2f} s   cpu {cpu:8.2f} s   peak RSS {rss[c]:.2f} GB   (each: {each})")
    base = "matmul"
    pairs = [(c, base) for c in runs if c not in (base, "generate")] + [
        (c, b) for c, b in (("new", "old"), ("rev", "old"), ("new", "rev")) if c in runs and b in runs]
    ratios = {}
    for c, b in pairs:
        each = [x["seconds"] / y["seconds"] for x, y in zip(runs[c], runs[b])]
        ratios[f"{c}/{b}"] = each
        print(f"  {c}/{b}: {med[c] / med[b]:.3f} of the medians; per round {' '.join(f'{r:.3f}' for r in each)}, "
              f"median {statistics.median(each):.3f}")
    if a.part == "official":
        gen = med["generate"]
        print(f"  (stream-generate)/(matmul-generate): {(med['stream'] - gen) / (med['matmul'] - gen):.3f}")
    print("  summary:", json.dumps(next(iter(sums.values()))))
    out = Path(a.out or f"bench-out/stream_scoring_{a.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "child"}, "dim": dim,
                               "machine": started, "package_sources": common.package_digest(),
                               "runs": runs, "medians": med, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
