"""Does SSG adapt? Source-only vs after SSG on the target test split, synthetic source and target domains.

Issue #8 item 5. Per seed: a labelled source dataset (``sysu30k synth --style 0 --impurity 0``: folder =
identity) and an unlabelled target in another style (other colour casts and background palettes) with
other people (``--id-offset``), both packed and split. ``train-ssg --stage source`` trains on the source;
that checkpoint is scored on the target test split (source only); ``train-ssg`` adapts it to the target
(its truth.csv is given only for the NMI/ARI of each clustering round) and the *last* checkpoint is
scored on the same split (no selection on the test set). Everything runs through the CLI, one process
per stage, under ``nice -n 19``. Target: the mean gain exceeds the spread (max − min) across seeds.

    nice -n 19 .venv/bin/python benchmarks/bench_ssg.py --seeds 0,1,2 --out bench-out/ssg
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    subprocess.run(["nice", "-n", "19", sys.executable, "-m", "sysu30k", "-q", *cmd], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _data(args, seed: int, base: Path) -> tuple[Path, Path, Path]:
    """(source DST, target DST, target truth.csv), built once per seed and settings."""
    out = []
    roles = (("src", args.source_style, 0, seed), ("tgt", args.target_style, 100_000, 1000 + seed))
    for role, style, offset, data_seed in roles:
        tree, dst = base / f"{role}-tree-s{seed}", base / f"{role}-dst-s{seed}"
        spec = {"folders": args.folders, "images_per_folder": args.images_per_folder, "test_ids": args.test_ids,
                "distractors": args.distractors, "style": style, "offset": offset, "seed": data_seed}
        stamp = dst / "bench_data.json"
        if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
            shutil.rmtree(tree, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            _run(["synth", str(tree), "--folders", str(args.folders),
                  "--images-per-folder", str(args.images_per_folder),
                  "--test-ids", str(args.test_ids), "--distractors", str(args.distractors), "--impurity", "0",
                  "--style", str(style), "--id-offset", str(offset), "--seed", str(data_seed), "--workers", "2"])
            _run(["shard", str(tree), str(dst), "--shard-size", "2MB", "--workers", "2"])
            _run(["split", str(dst), "--expect", "none", "--scheduler", "sync"])
            stamp.write_text(json.dumps(spec))
        out.append(dst)
    return out[0], out[1], base / f"tgt-tree-s{seed}" / "truth.csv"


def _score(dst: Path, ckpt: Path, out: Path) -> dict:
    _run(["eval", str(dst), "--checkpoint", str(ckpt), "--split", "test", "--out", str(out), "--workers", "1"])
    return json.loads((out / "metrics.json").read_text())["metrics"]


def run_seed(args, seed: int, base: Path) -> dict:
    src, tgt, truth = _data(args, seed, base)
    common = ["--height", str(args.height), "--width", str(args.width), "--workers", "2", "--seed", str(seed),
              "--per-group", str(args.per_group), "--device", "cpu"]
    t0 = time.perf_counter()
    src_run = base / f"run-src-s{seed}"
    _run(["train-ssg", str(src), "--stage", "source", "--out", str(src_run), "--arch", "resnet18",
          "--embedding", str(args.embedding), "--epochs", str(args.source_epochs), "--groups", str(args.source_groups),
          "--lr", str(args.source_lr), "--decay-from", str(args.source_epochs * 2 // 3), *common])
    source_s = time.perf_counter() - t0
    before = _score(tgt, src_run / "last.pt", base / f"eval-src-s{seed}")
    t0 = time.perf_counter()
    ssg_run = base / f"run-ssg-s{seed}"
    _run(["train-ssg", str(tgt), "--init", str(src_run / "last.pt"), "--source", str(src), "--truth", str(truth),
          "--out", str(ssg_run), "--iterations", str(args.iterations),
          "--epochs-per-iteration", str(args.epochs_per_iteration),
          "--optimizer", args.optimizer, "--lr", str(args.lr), "--rho", str(args.rho), "--k1", str(args.k1),
          "--k2", str(args.k2), "--groups", str(args.groups), *common])
    adapt_s = time.perf_counter() - t0
    after = _score(tgt, ssg_run / "last.pt", base / f"eval-ssg-s{seed}")
    rounds = [json.loads(line) for line in (ssg_run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "cluster"]
    return {"seed": seed, "source_only": before, "ssg": after, "source_s": source_s, "adapt_s": adapt_s,
            "rounds": [{k: r.get(k) for k in ("iteration", "clusters_g", "kept", "images", "nmi", "ari")}
                       for r in rounds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench-out/ssg")
    ap.add_argument("--folders", type=int, default=48)
    ap.add_argument("--images-per-folder", type=int, default=12)
    ap.add_argument("--test-ids", type=int, default=96)
    ap.add_argument("--distractors", type=int, default=200)
    ap.add_argument("--source-style", type=int, default=0)
    ap.add_argument("--target-style", type=int, default=1)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--embedding", type=int, default=512)
    ap.add_argument("--source-groups", type=int, default=16)
    ap.add_argument("--source-lr", type=float, default=1e-3)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--source-epochs", type=int, default=30)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--epochs-per-iteration", type=int, default=5)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rho", type=float, default=0.015)
    ap.add_argument("--k1", type=int, default=10)
    ap.add_argument("--k2", type=int, default=3)
    args = ap.parse_args()
    base = Path(args.out)
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = run_seed(args, seed, base)
        results.append(r)
        print(json.dumps({"seed": seed, **{f"{k}_{m}": round(100 * r[k][m], 1) for k in ("source_only", "ssg")
                                          for m in ("rank1", "mAP_official")}, "rounds": r["rounds"]}), flush=True)
    lines = ["| seed | source only R1 / mAP | after SSG R1 / mAP | gain R1 / mAP "
             "| last round: clusters, kept, NMI, ARI |",
             "|---|---|---|---|---|"]
    gains = {"rank1": [], "mAP_official": []}
    for r in results:
        g = {m: 100 * (r["ssg"][m] - r["source_only"][m]) for m in gains}
        for m in gains:
            gains[m].append(g[m])
        last = r["rounds"][-1] if r["rounds"] else {}
        lines.append(f"| {r['seed']} | {100 * r['source_only']['rank1']:.1f}"
                     f" / {100 * r['source_only']['mAP_official']:.1f}"
                     f" | {100 * r['ssg']['rank1']:.1f} / {100 * r['ssg']['mAP_official']:.1f}"
                     f" | {g['rank1']:+.1f} / {g['mAP_official']:+.1f}"
                     f" | {last.get('clusters_g')}, {last.get('kept')}/{last.get('images')}, "
                     f"{last.get('nmi') or 0:.3f}, {last.get('ari') or 0:.3f} |")
    verdict = {}
    for m, label in (("rank1", "rank-1"), ("mAP_official", "mAP (official)")):
        before = [100 * r["source_only"][m] for r in results]
        after = [100 * r["ssg"][m] for r in results]
        spread = max(max(before) - min(before), max(after) - min(after))
        gain = statistics.fmean(gains[m])
        verdict[m] = {"mean_gain": gain, "spread": spread, "met": gain > spread}
        lines.append(f"\n{label}: mean gain {gain:+.1f} points, spread across seeds {spread:.1f}: "
                     f"{'met' if gain > spread else 'not met'}")
    table = "\n".join(lines)
    print(table)
    (base / "results.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results,
                                                   "verdict": verdict}, indent=1))
    (base / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
