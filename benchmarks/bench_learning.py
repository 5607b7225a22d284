"""Does it learn? Accuracy of weakly supervised training on ``sysu30k synth`` data with impure folders.

Issue #6 item 5: an oracle trained on the true identities (truth.csv), the ``folder`` baseline (every image
labelled with its own folder), ``unary`` (the released recipe's balanced pseudo-labels) and ``dgl`` (argmax
pseudo-labels + pairwise + weak triplet), all scored on the synth TEST split with the official protocol
(``sysu30k.evaluation.run.evaluate_split``). Target: dgl rank-1 >= 90 % of the oracle's, and dgl - folder >
the spread (max - min) across seeds.

Per seed the data is built once (data seed = seed): ``sysu30k synth`` → ``shard`` → ``split``. Every
(seed, method) trains and evaluates in its own child process under ``nice -n 19``; all methods share the
same hyper-parameters. Besides the test metrics each child reports, on the training images, how often the
trained classifier's argmax (over all classes, and over the folder's ±2 neighbourhood, i.e. a 5-folder
bag's label set) names the true identity: pure and impure images separately.

    nice -n 19 .venv/bin/python benchmarks/bench_learning.py --seeds 0,1,2 --out bench-out/learning
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("oracle", "folder", "unary", "dgl")


def _nice(cmd: list[str]) -> list[str]:
    return ["nice", "-n", "19", *cmd]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _sysu30k() -> list[str]:
    return [sys.executable, "-m", "sysu30k", "-q"]


# --------------------------------------------------------------------------------------------- data
def build_data(args, seed: int, base: Path) -> Path:
    """synth → shard → split for ``seed``; reused when it already exists with the same settings."""
    name = f"s{seed}-style{args.style}-imp{args.impurity:g}"
    tree, dst = base / f"tree-{name}", base / f"dst-{name}"
    spec = {"folders": args.folders, "images_per_folder": args.images_per_folder, "test_ids": args.test_ids,
            "distractors": args.distractors, "impurity": args.impurity, "style": args.style, "seed": seed}
    stamp = dst / "bench_data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return dst
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    env = _env()
    subprocess.run(_nice([*_sysu30k(), "synth", str(tree), "--folders", str(args.folders), "--images-per-folder",
                          str(args.images_per_folder), "--test-ids", str(args.test_ids), "--distractors",
                          str(args.distractors), "--impurity", str(args.impurity), "--style", str(args.style),
                          "--seed", str(seed),
                          "--height", "144", "--workers", "2"]), check=True, env=env)
    subprocess.run(_nice([*_sysu30k(), "shard", str(tree), str(dst), "--shard-size", "2MB", "--workers", "2"]),
                   check=True, env=env)
    subprocess.run(_nice([*_sysu30k(), "split", str(dst), "--expect", "none", "--scheduler", "sync"]),
                   check=True, env=env, stdout=subprocess.DEVNULL)
    shutil.copy(tree / "truth.csv", dst / "truth.csv")
    stamp.write_text(json.dumps(spec))
    return dst


def truth_by_key(dst: Path) -> dict[str, tuple[int, int]]:
    """{sample key: (true id, folder id)} of every training image (truth.csv joined on images.parquet)."""
    from sysu30k.synth.truth import read_truth

    return read_truth(str(dst / "truth.csv"), str(dst))


def train_diagnostics(model, dst: Path, truth: dict, height: int, width: int) -> dict:
    """Does the trained classifier name the true identity of the training images? Argmax over all classes,
    and over the folder's ±2 neighbourhood (a 5-folder bag's label set); pure and impure images apart."""
    import torch

    from sysu30k.loader import EvalLoader, LoaderOptions, TransformSpec

    loader = EvalLoader(str(dst), "train", 128, TransformSpec(height=height, width=width, train=False),
                        LoaderOptions(workers=1), flip=False)
    hits = {"pure": [0, 0, 0], "impure": [0, 0, 0]}   # [n, argmax over all classes, over folder±2]
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            b = batch.to("cpu", torch.float32)          # ImageNet normalisation, as in training
            logits = model.classifier(model(b.images))
            for i, key in enumerate(b.keys):
                if not bool(b.valid[i]):
                    continue
                true, folder = truth[key]
                kind = "pure" if true == folder else "impure"
                lo, hi = max(folder - 3, 0), min(folder + 2, logits.shape[1])
                hits[kind][0] += 1
                hits[kind][1] += int(int(logits[i].argmax()) == true - 1)
                hits[kind][2] += int(lo + int(logits[i, lo:hi].argmax()) == true - 1)
    out = {f"{kind}_{name}": h[j] / max(h[0], 1) for kind, h in hits.items()
           for j, name in ((1, "acc_all"), (2, "acc_window"))}
    out.update({f"{kind}_n": h[0] for kind, h in hits.items()})
    return out


# -------------------------------------------------------------------------------------------- child
def child(args) -> None:
    """Train one method on one DST, score it on the test split, and write a JSON record."""
    import torch

    from sysu30k.evaluation.run import evaluate_split
    from sysu30k.model import checkpoint
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model
    from sysu30k.train.config import LossWeights, RunOptions, TrainConfig
    from sysu30k.train.weak import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dst, run_dir = Path(args.dst), Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    truth = truth_by_key(dst)
    targets = {k: t - 1 for k, (t, _) in truth.items()} if args.method == "oracle" else None
    cfg = TrainConfig(method="folder" if args.method == "oracle" else args.method,
                      model=ModelConfig(arch="resnet18", embedding=args.embedding, pretrained=None),
                      epochs=args.epochs, bags=args.bags, per_bag=args.per_bag, height=args.height, width=args.width,
                      optimizer=args.optimizer, lr=args.lr, head_lr_mult=args.head_lr_mult,
                      weight_decay=args.weight_decay,
                      lr_steps=tuple(int(s) for s in args.lr_steps.split(",") if s),
                      erase_p=args.erase_p,
                      warmup_epochs=0 if args.method in ("oracle", "folder") else args.warmup_epochs,
                      weights=LossWeights(pairwise=args.w_pairwise, triplet=args.w_triplet, sigma=args.sigma,
                                          margin=args.margin),
                      resample=False, seed=args.train_seed)
    t0 = time.perf_counter()
    last = train(str(dst), str(run_dir), cfg, RunOptions(workers=1, device="cpu", show_progress=False,
                                                        log_every=5), targets=targets)
    train_s = time.perf_counter() - t0
    state = checkpoint.load(run_dir / "last.pt")
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    model.eval()
    t0 = time.perf_counter()
    metrics = None
    for _ in range(10):                       # sysu30k.evaluation may still be in flux: retry
        try:
            metrics = evaluate_split(model, str(dst), "test", torch.device("cpu"), args.height, args.width, 128, 1)
            break
        except ImportError as exc:
            print(f"evaluation import failed ({exc}); retrying in 60 s", file=sys.stderr)
            time.sleep(60)
    eval_s = time.perf_counter() - t0

    train_acc = train_diagnostics(model, dst, truth, args.height, args.width)
    terms = {k: v for k, v in last.items() if k.startswith("train_")}
    record = {"method": args.method, "dst": str(dst), "config": cfg.to_dict(), "test": metrics,
              "train_classifier": train_acc, "last_epoch": terms, "train_s": train_s, "eval_s": eval_s,
              "images_per_s": last.get("images_per_s")}
    Path(args.result).write_text(json.dumps(record, indent=1))
    print(json.dumps({"method": args.method, "rank1": metrics and metrics["rank1"],
                      "mAP_official": metrics and metrics["mAP_official"], "train_s": round(train_s, 1),
                      **{k: round(v, 3) for k, v in train_acc.items() if "acc" in k}}))


# ------------------------------------------------------------------------------------------ summary
TUNED = ("bags", "per_bag", "lr")           # what bench_learning_tune.py chooses per method
HP = ("height", "width", "epochs", "warmup_epochs", "erase_p", "bags", "per_bag", "optimizer", "lr", "head_lr_mult",
      "weight_decay", "lr_steps", "embedding", "w_pairwise", "w_triplet", "sigma", "margin", "train_seed")


def _agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "min": min(values),
            "max": max(values), "n": len(values)}


def summarise(results: list[dict], methods: list[str], seeds: list[int]) -> tuple[dict, str]:
    by = {(r["seed"], r["method"]): r for r in results if r.get("test")}
    agg: dict = {}
    for m in methods:
        rows = [by[(s, m)] for s in seeds if (s, m) in by]
        if not rows:
            continue
        agg[m] = {k: _agg([100 * r["test"][k] for r in rows]) for k in ("rank1", "mAP_official", "mAP_standard")}
        agg[m]["train_s"] = _agg([r["train_s"] for r in rows])
        agg[m]["impure_acc_window"] = _agg([100 * r["train_classifier"]["impure_acc_window"] for r in rows])
    lines = ["| method | " + " | ".join(f"seed {s} R1 / mAP" for s in seeds)
             + " | rank-1 mean (spread) | mAP official mean (spread) | mAP standard mean (spread) "
               "| impure train images: true id within folder±2 | train s/run |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for m in methods:
        if m not in agg:
            continue
        cells = []
        for s in seeds:
            r = by.get((s, m))
            cells.append(f"{100 * r['test']['rank1']:.1f} / {100 * r['test']['mAP_official']:.1f}" if r else "–")
        a = agg[m]
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {a['rank1']['mean']:.1f} ({a['rank1']['spread']:.1f})"
                       f" | {a['mAP_official']['mean']:.1f} ({a['mAP_official']['spread']:.1f})"
                       f" | {a['mAP_standard']['mean']:.1f} ({a['mAP_standard']['spread']:.1f})"
                       f" | {a['impure_acc_window']['mean']:.0f} %"
                       f" | {a['train_s']['mean']:.0f} |")
    verdict = {}
    if all(m in agg for m in ("dgl", "oracle")):
        ratio = agg["dgl"]["rank1"]["mean"] / max(agg["oracle"]["rank1"]["mean"], 1e-9)
        verdict["dgl_over_oracle_rank1"] = ratio
        verdict["target_90pct_oracle_met"] = ratio >= 0.9
        lines.append(f"\ndgl / oracle rank-1: {ratio:.3f} (target ≥ 0.90): "
                     f"{'met' if ratio >= 0.9 else 'not met'}")
    if all(m in agg for m in ("dgl", "folder")):
        gain = agg["dgl"]["rank1"]["mean"] - agg["folder"]["rank1"]["mean"]
        # per-seed differences (paired: same data) and the larger of the two methods' spreads
        paired = [100 * (by[(s, "dgl")]["test"]["rank1"] - by[(s, "folder")]["test"]["rank1"])
                  for s in seeds if (s, "dgl") in by and (s, "folder") in by]
        spread = max(agg["dgl"]["rank1"]["spread"], agg["folder"]["rank1"]["spread"])
        verdict.update({"dgl_minus_folder_rank1": gain, "spread_rank1": spread, "paired_diffs": paired,
                        "target_beats_folder_met": gain > spread})
        lines.append(f"dgl − folder rank-1: {gain:+.1f} points (per seed: "
                     f"{', '.join(f'{d:+.1f}' for d in paired)}); spread across seeds "
                     f"(max of dgl's {agg['dgl']['rank1']['spread']:.1f} and folder's "
                     f"{agg['folder']['rank1']['spread']:.1f}): {spread:.1f} → "
                     f"{'met' if gain > spread else 'not met'}")
    return {"aggregate": agg, "verdict": verdict}, "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="bench-out/learning")
    p.add_argument("--tag", default="final", help="name of this run's results (runs/<tag>/, results-<tag>.json)")
    p.add_argument("--folders", type=int, default=80)
    p.add_argument("--images-per-folder", type=int, default=14)
    p.add_argument("--test-ids", type=int, default=100)
    p.add_argument("--distractors", type=int, default=200)
    p.add_argument("--impurity", type=float, default=0.3)
    p.add_argument("--style", type=int, default=0, help="synth's visual style (camera casts, backgrounds)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bags", type=int, default=8)
    p.add_argument("--per-bag", type=int, default=6)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr-mult", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-steps", default="")
    p.add_argument("--embedding", type=int, default=256)
    p.add_argument("--w-pairwise", type=float, default=2.0)
    p.add_argument("--w-triplet", type=float, default=2.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--margin", type=float, default=1.2)
    p.add_argument("--warmup-epochs", type=int, default=0, help="dgl/unary: epochs on folder labels first")
    p.add_argument("--erase-p", type=float, default=0.5)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="children run at once (each under nice -n 19)")
    p.add_argument("--tuned", help="bench_learning_tune.py's tuned.json: each method listed there trains with its own "
                                    "bags, per-bag and lr (the others with the options given)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a finished run trained with these hyper-parameters on the same data (resume a grid)")
    p.add_argument("--from-runs", action="store_true", help="no training: summarise runs/<tag>/ as it is")
    p.add_argument("--rediag", action="store_true", help="with --from-runs: recompute the train-image diagnostics")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    out = Path(args.out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    runs = out / "runs" / args.tag
    runs.mkdir(parents=True, exist_ok=True)
    hp = {k: getattr(args, k) for k in HP}
    tuned = json.loads(Path(args.tuned).read_text()) if args.tuned else {}
    per_method = {m: {**hp, **{k: tuned[m][k] for k in TUNED if m in tuned}} for m in methods}
    t_start = time.time()
    jobs = []
    for seed in seeds:
        t0 = time.perf_counter()
        dst = build_data(args, seed, out / "data")
        print(f"seed {seed}: data ready in {time.perf_counter() - t0:.1f} s ({dst})", flush=True)
        jobs += [(seed, method, dst) for method in methods]

    def run_one(job):
        seed, method, dst = job
        res = runs / f"s{seed}-{method}.json"
        if args.reuse and res.exists():
            rec = json.loads(res.read_text())
            if rec.get("hyper_parameters") == per_method[method] and rec.get("dst") == str(dst):
                print(f"seed {seed} {method}: reused (rank-1 {rec['test']['rank1']})", flush=True)
                return rec
        res.unlink(missing_ok=True)
        cmd = _nice([sys.executable, str(Path(__file__).resolve()), "--child", "--method", method,
                     "--dst", str(dst), "--run-dir", str(runs / f"s{seed}-{method}"), "--result", str(res),
                     *[x for k, v in per_method[method].items() for x in (f"--{k.replace('_', '-')}", str(v))]])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not res.exists():
            print(f"seed {seed} {method}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            return {"seed": seed, "method": method, "failed": proc.stderr[-3000:]}
        rec = json.loads(res.read_text())
        rec.update(seed=seed, child_wall_s=wall, parallel_jobs=args.jobs, hyper_parameters=per_method[method])
        res.write_text(json.dumps(rec, indent=1))
        print(f"seed {seed} {method}: {proc.stdout.strip().splitlines()[-1]} (wall {wall:.0f} s)", flush=True)
        return rec

    def read_one(job):
        """--from-runs: a finished child's record (diagnostics recomputed with --rediag)."""
        seed, method, dst = job
        res = runs / f"s{seed}-{method}.json"
        if not res.exists():
            return {"seed": seed, "method": method, "failed": "no result"}
        rec = json.loads(res.read_text())
        if args.rediag:
            from sysu30k.model import checkpoint
            from sysu30k.model.network import build_model
            state = checkpoint.load(runs / f"s{seed}-{method}" / "last.pt")
            model = build_model(state["config"]["model"])
            model.load_state_dict(state["model"])
            rec["train_classifier"] = train_diagnostics(model, dst, truth_by_key(dst), args.height, args.width)
            res.write_text(json.dumps(rec, indent=1))
        rec.setdefault("seed", seed)
        return rec

    from concurrent.futures import ThreadPoolExecutor
    if args.from_runs:
        results = [read_one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(run_one, jobs))
    summary, table = summarise(results, methods, seeds)
    sources = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((ROOT / "sysu30k").rglob("*.py"))}
    import torch
    doc = {"argv": sys.argv, "seeds": seeds, "methods": methods, "hyper_parameters": hp, "per_method": per_method,
           "data": {k: getattr(args, k) for k in ("folders", "images_per_folder", "test_ids", "distractors",
                                                   "impurity", "style")},
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "loadavg_end": os.getloadavg()},
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
           "wall_s": time.time() - t_start, "results": results, **summary, "package_sources": sources}
    (out / f"results-{args.tag}.json").write_text(json.dumps(doc, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
