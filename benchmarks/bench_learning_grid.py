"""Learning quality over a grid of conditions (issue #22): styles × impurities × seeds × methods.

Each condition (style, impurity) is one ``bench_learning.py`` run with its own tag (``style{S}-imp{I}``) under
``--out``; this script starts them one after another (``--run``, recipe options after ``--``) and then
summarises every finished condition: rank-1 per method with a t interval over the seeds, paired differences
(same data, same seed) dgl − folder, dgl − unary and dgl / oracle with t intervals, the issue's targets per
condition, the classifier's accuracy on pure and impure training images, and one plot.

    .venv/bin/python benchmarks/bench_learning_grid.py --run --out bench-out/grid -- \\
      --test-ids 300 --height 64 --width 32 --epochs 20 --bags 3 --per-bag 16 --lr 1e-3 --erase-p 0 \\
      --sigma 0 --margin 0.3 --w-triplet 0.5 --warmup-epochs 10 --jobs 2
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
CONFIDENCE = 0.95


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided 95 % Student-t interval of the mean; (mean, nan, nan) for one value."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def tag(style: int, impurity: float) -> str:
    return f"style{style}-imp{impurity:g}"


def load_condition(out: Path, style: int, impurity: float) -> dict | None:
    """{(seed, method): record} of one finished condition, or None when it has not run."""
    f = out / f"results-{tag(style, impurity)}.json"
    if not f.exists():
        return None
    doc = json.loads(f.read_text())
    return {(r["seed"], r["method"]): r for r in doc["results"] if r.get("test")}


def condition_summary(runs: dict, seeds: list[int]) -> dict:
    """Per method: rank-1 / mAP (t interval over seeds) and train-image accuracy; paired dgl comparisons; targets."""
    r1 = {m: [100 * runs[(s, m)]["test"]["rank1"] for s in seeds if (s, m) in runs] for m in METHODS}
    out: dict = {"methods": {}, "paired": {}}
    for m in METHODS:
        rows = [runs[(s, m)] for s in seeds if (s, m) in runs]
        if not rows:
            continue
        acc = [r["train_classifier"] for r in rows]
        out["methods"][m] = {
            "rank1": t_interval(r1[m]), "rank1_by_seed": r1[m],
            "mAP_official": t_interval([100 * r["test"]["mAP_official"] for r in rows]),
            "pure_acc_window": statistics.fmean(100 * a["pure_acc_window"] for a in acc),
            "impure_acc_window": statistics.fmean(100 * a["impure_acc_window"] for a in acc),
            "train_s": statistics.fmean(r["train_s"] for r in rows)}
    both = [s for s in seeds if all((s, m) in runs for m in METHODS)]

    def v(s: int, m: str) -> float:
        return 100 * runs[(s, m)]["test"]["rank1"]
    if both:
        diffs = {"dgl-folder": [v(s, "dgl") - v(s, "folder") for s in both],
                 "dgl-unary": [v(s, "dgl") - v(s, "unary") for s in both],
                 "dgl/oracle": [v(s, "dgl") / max(v(s, "oracle"), 1e-9) for s in both]}
        out["paired"] = {k: {"by_seed": d, "ci": t_interval(d)} for k, d in diffs.items()}
        out["paired_seeds"] = both
        gain, ratio = out["paired"]["dgl-folder"]["ci"], out["paired"]["dgl/oracle"]["ci"]
        out["targets"] = {"dgl >= folder + 5": gain[0] >= 5, "dgl >= 0.9 oracle": ratio[0] >= 0.9,
                          "interval excludes 0": gain[1] > 0}
    return out


def table(cond: str, s: dict) -> str:
    """The markdown table of one condition and its verdict lines."""
    lines = [f"**{cond}**", "",
             "| method | rank-1 by seed | rank-1 mean [95 % t] | mAP official mean | train images: true id "
             "within folder±2, pure / impure |", "|---|---|---|---|---|"]
    for m, a in s["methods"].items():
        mean, lo, hi = a["rank1"]
        lines.append(f"| {m} | {', '.join(f'{x:.1f}' for x in a['rank1_by_seed'])} | {mean:.1f} [{lo:.1f}, {hi:.1f}]"
                     f" | {a['mAP_official'][0]:.1f} | {a['pure_acc_window']:.0f} % / {a['impure_acc_window']:.0f} % |")
    if s["paired"]:
        def ci(k: str, fmt: str) -> str:
            m, lo, hi = s["paired"][k]["ci"]
            return f"{k} {m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
        lines += ["", f"paired over seeds {s['paired_seeds']}: {ci('dgl-folder', '+.1f')}; {ci('dgl-unary', '+.1f')}; "
                  f"{ci('dgl/oracle', '.2f')}. Targets: "
                  + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in s["targets"].items())]
    return "\n".join(lines)


def plot(summaries: dict[str, dict], path: Path) -> None:
    """Rank-1 by condition and method: bars at the mean, the 95 % t interval, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(summaries)
    fig, ax = plt.subplots(figsize=(1.9 * len(conds) + 1.5, 3.6), dpi=110)
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs, means, errs = [], [], [[], []]
        for i, c in enumerate(conds):
            a = summaries[c]["methods"].get(m)
            if not a:
                continue
            x = i + (j - (len(METHODS) - 1) / 2) * width
            mean, lo, hi = a["rank1"]
            xs.append(x)
            means.append(mean)
            errs[0].append(mean - lo if lo == lo else 0)
            errs[1].append(hi - mean if hi == hi else 0)
            ax.scatter([x] * len(a["rank1_by_seed"]), a["rank1_by_seed"], s=9, color="black", zorder=3)
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=m, alpha=0.85)
    ax.set_xticks(range(len(conds)), conds)
    ax.set_ylabel("test rank-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(METHODS), fontsize=8, loc="upper left")
    ax.set_title("rank-1 by condition: mean, 95 % t interval over seeds, seeds as dots", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/grid")
    p.add_argument("--styles", default="1,2")
    p.add_argument("--impurities", default="0.2,0.4")
    p.add_argument("--seeds", default="11,12,13", help="never the tuning seeds (97, 98)")
    p.add_argument("--run", action="store_true", help="train the conditions that have no results yet first")
    p.add_argument("--plot", default="benchmarks/figures/learning-grid.png")
    p.add_argument("recipe", nargs=argparse.REMAINDER, help="after --: bench_learning.py's recipe options")
    a = p.parse_args()
    out = Path(a.out)
    styles = [int(x) for x in a.styles.split(",")]
    imps = [float(x) for x in a.impurities.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    recipe = [x for x in a.recipe if x != "--"]
    if a.run:
        for style in styles:
            for imp in imps:
                done = load_condition(out, style, imp) or {}
                if len(done) < len(seeds) * len(METHODS):             # absent, or with failed runs: (re)train
                    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), "--seeds",
                                    a.seeds, "--out", str(out), "--tag", tag(style, imp), "--style", str(style),
                                    "--impurity", str(imp), "--reuse", *recipe],
                                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summaries = {}
    for style in styles:
        for imp in imps:
            runs = load_condition(out, style, imp)
            if runs:
                summaries[tag(style, imp)] = condition_summary(runs, seeds)
    if not summaries:
        raise SystemExit(f"no finished condition under {out}")
    pooled = {k: t_interval([d for s in summaries.values() if s["paired"] for d in s["paired"][k]["by_seed"]])
              for k in ("dgl-folder", "dgl-unary", "dgl/oracle")}
    for cond, s in summaries.items():
        print(table(cond, s) + "\n")
    print(f"pooled over {sum(len(s.get('paired_seeds', [])) for s in summaries.values())} (condition, seed) "
          f"pairs: dgl − folder {pooled['dgl-folder'][0]:+.1f} [{pooled['dgl-folder'][1]:+.1f}, "
          f"{pooled['dgl-folder'][2]:+.1f}], dgl / oracle {pooled['dgl/oracle'][0]:.2f} "
          f"[{pooled['dgl/oracle'][1]:.2f}, {pooled['dgl/oracle'][2]:.2f}]")
    (out / "grid-summary.json").write_text(json.dumps({"conditions": summaries, "pooled": pooled}, indent=1))
    plot(summaries, Path(a.plot))
    print(f"plot: {a.plot}")



if __name__ == "__main__":
    main()
