"""The fair-baseline study (issue #22 item 2): every method gets the same tuning budget, on tuning seeds only.

The search space is batch composition (bags × images per bag, always 48 images a batch, so every
configuration takes the same steps) × learning rate. Each configuration is one ``bench_learning.py`` run
(tag ``b{B}x{P}-lr{LR}``) of the chosen methods on seeds 97 and 98 of style 0 at impurity 0.3, a condition
the grid never reports. The rest of the recipe is given after ``--`` and is the same for every
configuration. The summary gives mean rank-1 over the tuning seeds per method and configuration, picks
each method's best, and writes ``tuned.json`` (method → its bags, per-bag and lr).

    .venv/bin/python benchmarks/bench_learning_tune.py --run --methods folder --out bench-out/tune -- \\
      --test-ids 300 --height 64 --width 32 --epochs 20 --erase-p 0 --sigma 0 --margin 0.3 \\
      --w-triplet 0.5 --warmup-epochs 10 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("oracle", "folder", "unary", "dgl")
SEEDS = "97,98"                      # the tuning seeds: never reported
# options this study sets itself, refused in the recipe
OWNED = ("--bags", "--per-bag", "--lr", "--seeds", "--style", "--impurity", "--tag", "--methods", "--out")


def tag(comp: str, lr: str) -> str:
    return f"b{comp}-lr{lr}"


def results(out: Path, comp: str, lr: str) -> dict:
    """{method: [rank-1 % per tuning seed]} of one configuration's finished runs (their own records: a
    results file holds only the methods of the call that wrote it last)."""
    by: dict[str, list[float]] = {}
    for seed in SEEDS.split(","):
        for f in sorted((out / "runs" / tag(comp, lr)).glob(f"s{seed}-*.json")):
            r = json.loads(f.read_text())
            if r.get("test"):
                by.setdefault(r["method"], []).append(100 * r["test"]["rank1"])
    return by


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/tune")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--compositions", default="3x16,8x6,16x3", help="bags x images per bag, 48 images each")
    p.add_argument("--lrs", default="1e-3,3e-4")
    p.add_argument("--run", action="store_true", help="train the configurations first (finished runs are kept)")
    p.add_argument("recipe", nargs=argparse.REMAINDER, help="after --: bench_learning.py's other options")
    a = p.parse_args()
    out, methods = Path(a.out), a.methods.split(",")
    comps, lrs = a.compositions.split(","), a.lrs.split(",")
    recipe = [x for x in a.recipe if x != "--"]
    clash = [x for x in recipe if x in OWNED]
    if clash:
        raise SystemExit(f"{clash} are set by this study, not by the recipe")
    if any(int(b) * int(k) != 48 for b, k in (c.split("x") for c in comps)):
        raise SystemExit("every composition must give 48 images a batch (the same steps for each)")
    if a.run:
        for comp in comps:
            for lr in lrs:
                bags, per_bag = comp.split("x")
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), "--seeds", SEEDS,
                                "--methods", ",".join(methods), "--out", str(out), "--tag", tag(comp, lr),
                                "--bags", bags, "--per-bag", per_bag, "--lr", lr, "--reuse", *recipe],
                               check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows, tuned = [], {}
    for method in methods:
        scored = {(c, lr): results(out, c, lr).get(method, []) for c in comps for lr in lrs}
        complete = {k: v for k, v in scored.items() if len(v) == len(SEEDS.split(","))}
        for (c, lr), v in scored.items():
            cell = f"{statistics.fmean(v):.1f} ({' / '.join(f'{x:.1f}' for x in v)})" if v else "–"
            rows.append(f"| {method} | {c} | {lr} | {cell} |")
        if complete:
            (c, lr), v = max(complete.items(), key=lambda kv: statistics.fmean(kv[1]))
            bags, per_bag = c.split("x")
            tuned[method] = {"bags": int(bags), "per_bag": int(per_bag), "lr": float(lr),
                             "tuning_rank1": statistics.fmean(v), "configurations": len(complete)}
    print("| method | bags × per bag | lr | rank-1 mean over seeds 97, 98 (per seed) |\n|---|---|---|---|")
    print("\n".join(rows))
    space = len(comps) * len(lrs)
    for method, t in tuned.items():
        print(f"{method}: best {t['bags']}x{t['per_bag']} lr {t['lr']:g} ({t['tuning_rank1']:.1f}, "
              f"{t['configurations']} of {space} configurations"
              + ("" if t["configurations"] == space else "; not written: the search is incomplete") + ")")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned.json").write_text(json.dumps({m: t for m, t in tuned.items() if t["configurations"] == space},
                                               indent=1))


if __name__ == "__main__":
    main()
