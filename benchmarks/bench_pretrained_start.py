"""The GPU recipes from a pretrained start (issue #22 item 4), at CPU size.

No ImageNet weights can be downloaded here, so the stand-in is a ResNet-18 pretrained with identity labels
on a disjoint synthetic domain: ``sysu30k synth --impurity 0 --style S --id-offset O`` (other people, another
look; with pure folders the folder is the identity), trained with ``--method folder``, its backbone saved as a
torchvision ``resnet18`` state_dict (the file ``--pretrained`` takes). Then, on each target dataset (the
grid's data, never a tuning seed), ``train-weak --config pipelines/gpu-dgl.toml`` and ``gpu-unary.toml`` with
only the size overridden (ResNet-18, 64×32, embedding 256, CPU), from that file and from scratch, and
``--epochs 0`` from it (the start itself); each scored with ``sysu30k eval`` on the test split.

    .venv/bin/python benchmarks/bench_pretrained_start.py --out bench-out/pretrained \\
      --targets bench-out/grid/data/dst-s11-style1-imp0.2,bench-out/grid/data/dst-s12-style1-imp0.2
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--arch", "resnet18", "--embedding", "256", "--height", "64", "--width", "32", "--device", "cpu",
        "--decoder", "pil", "--workers", "1", "--no-tensorboard"]
# name: (config file, from the pretrained file?, extra options); "start" is the pretrained network untrained here
RUNS = {"start": ("gpu-dgl.toml", True, ["--epochs", "0"]),
        "gpu-dgl-scratch": ("gpu-dgl.toml", False, []),
        "gpu-dgl-pretrained": ("gpu-dgl.toml", True, []),
        "gpu-unary-pretrained": ("gpu-unary.toml", True, []),
        "train-cpu-pretrained": ("train-cpu.toml", True, []),
        # 20 epochs: as many passes over the data as train-cpu.toml (127 steps of 180 images, not 460 of 48)
        "gpu-dgl-pretrained-e20": ("gpu-dgl.toml", True, ["--epochs", "20"]),
        "gpu-unary-pretrained-e20": ("gpu-unary.toml", True, ["--epochs", "20"])}


def sysu30k(*args: str, log: Path | None = None) -> None:
    """One ``sysu30k`` command under ``nice -n 19`` (output to ``log``); raises with its tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run(["nice", "-n", "19", sys.executable, "-m", "sysu30k", "-q", *args], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    if log:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"sysu30k {' '.join(args[:2])} failed ({p.returncode}): {p.stderr[-1500:]}")


def torchvision_state(checkpoint: Path, out: Path) -> None:
    """The trained ReIDNet's backbone as a torchvision resnet18 state_dict (stem → conv1/bn1, layers as is)."""
    import torch

    from sysu30k.model.checkpoint import load

    model = load(checkpoint)["model"]
    rename = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    state = {}
    for k, v in model.items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old):]
        if k.startswith(("conv1.", "bn1.", "layer")):
            state[k] = v
    torch.save(state, out)


def pretrain(a, base: Path) -> Path:
    """Synth the source domain, shard it, train on identities; the torchvision file (reused when present)."""
    weights = base / "source-resnet18.pth"
    if weights.exists():
        return weights
    tree, dst, run = base / "source-tree", base / "source-dst", base / "source-run"
    for d in (tree, dst, run):
        shutil.rmtree(d, ignore_errors=True)
    sysu30k("synth", str(tree), "--folders", str(a.source_folders), "--images-per-folder", "14", "--test-ids", "20",
            "--distractors", "0", "--impurity", "0", "--style", str(a.source_style), "--id-offset",
            str(a.id_offset), "--seed", "500", "--height", "144", "--workers", "2")
    sysu30k("shard", str(tree), str(dst), "--shard-size", "4MB", "--workers", "2")
    sysu30k("split", str(dst), "--expect", "none", "--scheduler", "sync")
    sysu30k("train-weak", str(dst), "--out", str(run), "--config", str(ROOT / "pipelines" / "train-cpu.toml"),
            "--method", "folder", "--warmup-epochs", "0", "--epochs", str(a.source_epochs), "--bags", "8",
            "--per-bag", "6", *SIZE, log=base / "source-train.log")
    torchvision_state(run / "last.pt", weights)
    return weights


def one(a, base: Path, weights: Path, target: Path, name: str) -> dict:
    """Train one recipe on one target and score its last checkpoint on the test split."""
    toml, pre, extra = RUNS[name]
    run = base / "runs" / target.name / name
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    sysu30k("train-weak", str(target), "--out", str(run), "--config", str(ROOT / "pipelines" / toml), *SIZE,
            *(["--pretrained", str(weights)] if pre else []), *extra, log=run.parent / f"{run.name}.log")
    train_s = time.perf_counter() - t0
    sysu30k("eval", str(target), "--checkpoint", str(run / "last.pt"), "--split", "test", "--out",
            str(run / "eval-test"), "--device", "cpu", "--workers", "1", "--decoder", "pil")
    m = json.loads((run / "eval-test" / "metrics.json").read_text())["metrics"]
    row = {"target": target.name, "run": name, "rank1": 100 * m["rank1"], "mAP_official": 100 * m["mAP_official"],
           "train_s": train_s}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/pretrained")
    p.add_argument("--targets", required=True, help="comma list of packed+split datasets (the grid's)")
    p.add_argument("--source-folders", type=int, default=200)
    p.add_argument("--source-epochs", type=int, default=15)
    p.add_argument("--source-style", type=int, default=3, help="a style none of the targets uses")
    p.add_argument("--id-offset", type=int, default=100_000)
    p.add_argument("--runs", default=",".join(RUNS), help="which of the recipes, comma list")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--pretrain-only", action="store_true")
    p.add_argument("--results", default="results.json", help="file under --out for this call's rows")
    a = p.parse_args()
    base = Path(a.out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = pretrain(a, base)
    print(f"pretrained start: {weights} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.pretrain_only:
        return
    names = [n for n in a.runs.split(",") if n]
    unknown = set(names) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    jobs = [(Path(t).resolve(), n) for t in a.targets.split(",") for n in names]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: one(a, base, weights, *j), jobs))
    summary = {n: {"rank1_mean": statistics.fmean(r["rank1"] for r in rows if r["run"] == n),
                   "rank1_by_target": [round(r["rank1"], 1) for r in rows if r["run"] == n],
                   "mAP_mean": statistics.fmean(r["mAP_official"] for r in rows if r["run"] == n)} for n in names}
    (base / a.results).write_text(json.dumps({"argv": sys.argv, "rows": rows, "summary": summary}, indent=1))
    print("\n| recipe | rank-1 by target | rank-1 mean | mAP official mean |\n|---|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {', '.join(map(str, s['rank1_by_target']))} | {s['rank1_mean']:.1f} | {s['mAP_mean']:.1f} |")


if __name__ == "__main__":
    main()
