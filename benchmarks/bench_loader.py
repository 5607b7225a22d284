#!/usr/bin/env python
"""Images/s into training-ready batches: the sysu30k TrainLoader (Pillow-SIMD and DALI decoders, local and
s3://) against a straightforward webdataset + PIL + torch DataLoader pipeline, side by side.

"Training-ready" = 256x128, train augmentation (pad-10 random crop, horizontal flip, random erasing),
normalised float32 NCHW on the CPU (the training device here), batches of 180.

Data (generated once under --out and reused while the recorded settings match):
  synth-h288-n<N>  ``sysu30k synth`` with N/20 folders x 20 images, 288 high
  dst-n<N>         ``sysu30k shard --resize 144 --shard-size S --workers 2``; S is 16MB at N >= 20000 and
                   scaled down with N below that (so a smoke run still has several shards per worker).

Configurations (each one epoch of the training subset; all with 2 DataLoader worker processes):
  base        "wds+PIL+DataLoader": wds.WebDataset(train tars, shardshuffle=False, split_by_node,
              split_by_worker, empty_check=False).decode("pil").to_tuple("jpg").map_tuple(torchvision
              Resize((256,128)), Pad(10), RandomCrop((256,128)), RandomHorizontalFlip, ToTensor,
              Normalize(mean,std), RandomErasing(p=0.5)).batched(180) -> DataLoader(batch_size=None)
  pil-f32     TrainLoader(decoder="pil", normalize=True): the workers normalise (training on the CPU);
              Batch.to("cpu", torch.float32) on every batch (a no-op then)
  pil-u8      TrainLoader(decoder="pil", normalize=False): uint8 batches as a GPU would receive them
              (it normalises them itself); shows what normalising on the CPU costs
  dali-f32    TrainLoader(decoder="dali") (the CPU graph here: no CUDA) + Batch.to("cpu", float32)
  dali-u8     TrainLoader(decoder="dali"), uint8
  pil-f32-s3  pil-f32 reading s3://bench/dst-n<N> from a local SeaweedFS (`weed mini`, started here);
              compared with pil-f32 on the local DST (target: S3 throughput >= 0.85 x local)
  pil-u8-s3   pil-u8 from s3://, compared with pil-u8 on the local DST: the same comparison without the
              main-process normalisation, which otherwise bounds both sides and hides the I/O difference

Method: every measurement is a fresh child process (this script with --child JSON). Images/s = valid
images / wall seconds from iterator creation to the last batch, worker start-up included ("total"); "steady"
excludes the first batch (images after it / time from its arrival to the last batch). Loader construction
(reading the manifest) is timed apart as init_s. cpu ms/img = user+sys CPU seconds of the child and its
DataLoader workers per image (less sensitive to a noisy machine than wall time). Each repetition runs every
configuration once (the order rotates from rep to rep); the DST is read once (untimed) before every rep.
Medians over --reps. Raw results: <out>/results-<timestamp>.json; Markdown table: <out>/table.md.

Usage: python benchmarks/bench_loader.py [--images 20000] [--reps 3] [--out bench-out/loader]
                                         [--configs base,pil-f32,...] [--no-s3] [--shard-size 16MB]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = ["base", "pil-f32", "pil-u8", "dali-f32", "dali-u8", "pil-f32-s3", "pil-u8-s3"]
LABEL = {"base": "wds+PIL+DataLoader", "pil-f32": "ours pil -> float32", "pil-u8": "ours pil, uint8",
         "dali-f32": "ours dali(CPU) -> float32", "dali-u8": "ours dali(CPU), uint8",
         "pil-f32-s3": "ours pil -> float32, s3://", "pil-u8-s3": "ours pil, uint8, s3://"}
BASELINE_OF = {"pil-f32": "base", "pil-u8": "base", "dali-f32": "base", "dali-u8": "base",
               "pil-f32-s3": "pil-f32", "pil-u8-s3": "pil-u8"}
# images/s ratio to BASELINE_OF (the issue: 3x "with Pillow-SIMD")
TARGET = {"pil-f32": 3.0, "pil-f32-s3": 0.85, "pil-u8-s3": 0.85}
BATCH, HEIGHT, WIDTH, PAD = 180, 256, 128, 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUCKET = "bench"


# ----------------------------------------------------------------------------- the measured workloads

class Clock:
    """Per-batch arrival times and valid-image counts of one epoch, started at iterator creation."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.arrivals: list[float] = []
        self.counts: list[int] = []
        self.first_shape = None

    def batch(self, images, n_valid: int) -> None:
        self.arrivals.append(time.perf_counter() - self.t0)
        self.counts.append(n_valid)
        if self.first_shape is None:
            self.first_shape = [list(images.shape), str(images.dtype).replace("torch.", "")]

    def result(self) -> dict:
        n, total = sum(self.counts), self.arrivals[-1] if self.arrivals else float("nan")
        steady_s = total - self.arrivals[0] if len(self.arrivals) > 1 else float("nan")
        steady_n = n - self.counts[0] if self.counts else 0
        return {"images": n, "batches": len(self.counts), "seconds": total, "first_batch_s": self.arrivals[0],
                "steady_s": steady_s, "img_s": n / total, "steady_img_s": steady_n / steady_s if steady_n else None,
                "shape": self.first_shape}


def run_base(urls: list[str], workers: int) -> dict:
    import torch
    import webdataset as wds

    from sysu30k.io.compat import import_torchvision

    T = import_torchvision().transforms
    transform = T.Compose([T.Resize((HEIGHT, WIDTH)), T.Pad(PAD), T.RandomCrop((HEIGHT, WIDTH)),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD),
                           T.RandomErasing(p=0.5)])
    t_init = time.perf_counter()
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .decode("pil").to_tuple("jpg").map_tuple(transform).batched(BATCH))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    init_s = time.perf_counter() - t_init
    clock = Clock()
    for (images,) in loader:
        clock.batch(images, len(images))
    return {"init_s": init_s, **clock.result()}


def run_ours(dst: str, decoder: str, normalise: bool, workers: int) -> dict:
    import torch

    from sysu30k.loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec

    t_init = time.perf_counter()
    loader = TrainLoader(dst, bags=BagSpec(bags=12, per_bag=15),
                         transform=TransformSpec(height=HEIGHT, width=WIDTH, pad=PAD),
                         options=LoaderOptions(decoder=decoder, workers=workers, normalize=normalise))
    init_s = time.perf_counter() - t_init
    assert loader.bags.batch_size == BATCH
    clock = Clock()
    damaged = 0
    for b in loader:
        if normalise:
            b = b.to("cpu", torch.float32)
        clock.batch(b.images, int(b.valid.sum()))
        damaged += len(b.damaged)
    return {"init_s": init_s, "damaged": damaged, "decoder": loader.decoder, **clock.result()}


def child_main(spec: dict) -> None:
    config, workers = spec["config"], spec["workers"]
    if config == "base":
        res = run_base(spec["urls"], workers)
    else:
        decoder, dtype, *where = config.split("-")
        res = run_ours(spec["s3_url"] if where == ["s3"] else spec["dst"], decoder, dtype == "f32", workers)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    res.update(cpu_s=cpu, cpu_ms_per_img=1000 * cpu / max(1, res["images"]), max_rss_mb=me.ru_maxrss / 1024)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- data

def sysu30k_exe() -> str:
    return shutil.which("sysu30k") or str(Path(sys.executable).parent / "sysu30k")


def ensure(target: Path, cmd: list[str], resumable: bool = False) -> None:
    """Run ``cmd`` to create ``target`` unless a marker records the same command completed."""
    marker = target.with_name(target.name + ".done.json")
    if marker.exists() and target.exists() and json.loads(marker.read_text()).get("cmd") == cmd[1:]:
        return
    shutil.rmtree(target, ignore_errors=True)
    print("generating:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0 and resumable:
        # seen once in 7 runs: `sysu30k shard` completes its output, then aborts at exit with "terminate called
        # without an active exception" (SIGABRT); the command is resumable, so a rerun verifies/finishes it
        print(f"WARNING: exit status {rc}; rerunning (resumable)", flush=True)
        rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}")
    marker.write_text(json.dumps({"cmd": cmd[1:], "seconds": time.perf_counter() - t0}))


def prepare(args) -> tuple[Path, list[str], dict]:
    out = Path(args.out)
    n = args.images
    folders = max(10, n // 20)
    tree = (out / f"synth-h288-n{n}").resolve()
    ensure(tree, [sysu30k_exe(), "synth", str(tree), "--folders", str(folders), "--images-per-folder", "20",
                  "--test-ids", str(max(10, n // 200)), "--distractors", str(max(10, n // 20)), "--height", "288",
                  "--seed", "0", "--workers", "2"])
    size = args.shard_size or f"{max(1000, round(16000 * min(1.0, n / 20000)))}KB"
    dst = (out / f"dst-n{n}-s{size}").resolve()
    ensure(dst, [sysu30k_exe(), "shard", str(tree), str(dst), "--resize", "144", "--shard-size", size,
                 "--workers", "2"], resumable=True)
    from sysu30k.io.storage import Storage
    from sysu30k.loader.catalog import load_catalog
    from sysu30k.manifests import SHARD_DIR

    catalog = load_catalog(Storage(str(dst)), "train")
    urls = [str(dst / SHARD_DIR / f"{e.shard}.tar") for e in catalog]
    info = {"train_images": sum(len(e) for e in catalog), "train_shards": len(catalog), "shard_size": size,
            "train_bytes": sum(os.path.getsize(u) for u in urls)}
    if len(catalog) < 2 * args.workers:
        print(f"WARNING: only {len(catalog)} training shard(s) for {args.workers} workers: "
              "streams/workers will be unbalanced; use a smaller --shard-size", flush=True)
    return dst, urls, info


def warm(dst: Path) -> None:
    """Read every file of the DST once (untimed): each rep starts with a warm page cache."""
    for dirpath, _, files in os.walk(dst):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 22):
                    pass




# ----------------------------------------------------------------------------- orchestration

def run_child(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for config, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            summary[config] = {"runs": 0, "errors": len(runs)}
            continue
        summary[config] = {"runs": len(ok), "errors": len(runs) - len(ok),
                           "images": ok[0]["images"], "img_s": median([r["img_s"] for r in ok]),
                           "steady_img_s": median([r["steady_img_s"] for r in ok]),
                           "seconds": median([r["seconds"] for r in ok]),
                           "first_batch_s": median([r["first_batch_s"] for r in ok]),
                           "init_s": median([r["init_s"] for r in ok]),
                           "cpu_ms_per_img": median([r["cpu_ms_per_img"] for r in ok]),
                           "img_s_all": [round(r["img_s"], 1) for r in ok]}
    for config, s in summary.items():
        base = summary.get(BASELINE_OF.get(config, ""), {})
        if s.get("img_s") and base.get("img_s"):
            s["ratio"] = s["img_s"] / base["img_s"]
            s["steady_ratio"] = (s["steady_img_s"] / base["steady_img_s"]
                                 if s.get("steady_img_s") and base.get("steady_img_s") else None)
    return summary


def table(summary: dict[str, dict]) -> str:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    rows = ["| configuration | images | img/s (total) | img/s (steady) | epoch s | 1st batch s | init s "
            "| CPU ms/img | ratio (total / steady) | vs | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for config, s in summary.items():
        if not s.get("runs"):
            rows.append(f"| {LABEL[config]} | failed ({s.get('errors')} runs) | | | | | | | | | |")
            continue
        ratio = (f"{s['ratio']:.2f}× / {f(s.get('steady_ratio'), '.2f')}×" if "ratio" in s else "-")
        target = TARGET.get(config)
        verdict = (f"≥ {target:g}× {'✓' if s.get('ratio', 0) >= target else '✗'}" if target else "-")
        rows.append(f"| {LABEL[config]} | {s['images']} | {s['img_s']:.0f} | {f(s['steady_img_s'], '.0f')} "
                    f"| {s['seconds']:.2f} | {s['first_batch_s']:.2f} | {s['init_s']:.2f} "
                    f"| {s['cpu_ms_per_img']:.2f} | {ratio} | {LABEL.get(BASELINE_OF.get(config, ''), '-')} "
                    f"| {verdict} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000, help="training images of the synthetic tree (~)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/loader")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (every configuration)")
    ap.add_argument("--shard-size", default=None, help="default: 16000KB (16MB) at >= 20000 images, scaled down below")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--no-s3", action="store_true", help="skip the s3:// configurations (no SeaweedFS server)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    configs = [c for c in args.configs.split(",") if c and not (args.no_s3 and c.endswith("-s3"))]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dst, urls, data = prepare(args)
    info = machine()
    print(f"== {info['date']}  {info['nproc']} cores  {info['cpu']}  Python {info['python']}  "
          f"Pillow {info['pillow']}{' (SIMD)' if info['pillow_simd'] else ''}  torch {info['torch']}  "
          f"webdataset {info['webdataset']}  DALI {info['dali']}  load avg {info['loadavg_start'][0]:.1f}", flush=True)
    print(f"== data: {data['train_images']} training images in {data['train_shards']} shards "
          f"({data['train_bytes'] / 1e6:.1f} MB, --shard-size {data['shard_size']}) at {dst}", flush=True)

    server = None
    s3_url = None
    if any(c.endswith("-s3") for c in configs):
        sys.path.insert(0, str(ROOT / "tests"))            # the SeaweedFS launcher the tests use
        from s3server import SeaweedS3

        workdir = out / "s3"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        server = SeaweedS3(workdir.resolve())
        os.environ.update(server.env())                    # inherited by the child processes
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        t0 = time.perf_counter()
        fs.put(str(dst) + "/", f"{BUCKET}/{dst.name}/", recursive=True)
        s3_url = f"s3://{BUCKET}/{dst.name}"
        print(f"== uploaded to {s3_url} ({server.endpoint}) in {time.perf_counter() - t0:.1f} s", flush=True)

    results: dict[str, list[dict]] = {c: [] for c in configs}
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    raw_path = out / f"results-{stamp}.json"
    try:
        for rep in range(args.reps):
            warm(dst)
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for config in order:
                spec = {"config": config, "workers": args.workers, "dst": str(dst), "urls": urls, "s3_url": s3_url}
                res = run_child(spec, args.timeout)
                res.update(rep=rep, loadavg=os.getloadavg()[0])
                results[config].append(res)
                if "error" in res:
                    print(f"rep {rep} {LABEL[config]:28s} FAILED: {res['error']}", flush=True)
                else:
                    print(f"rep {rep} {LABEL[config]:28s} {res['images']:6d} img {res['seconds']:7.2f} s "
                          f"{res['img_s']:7.0f} img/s  steady {res['steady_img_s'] or 0:7.0f}  "
                          f"1st {res['first_batch_s']:5.2f} s  cpu {res['cpu_ms_per_img']:5.2f} ms/img  "
                          f"load {res['loadavg']:.1f}", flush=True)
                raw_path.write_text(json.dumps({"machine": info, "data": data, "args": vars(args),
                                                "results": results}, indent=1))
    finally:
        if server is not None:
            server.stop()

    summary = summarise(results)
    md = table(summary)
    raw_path.write_text(json.dumps({"machine": info, "data": data, "args": vars(args), "results": results,
                                    "summary": summary}, indent=1))
    header = (f"{info['date']}, {info['nproc']} cores ({info['cpu']}), Python {info['python']}, "
              f"Pillow {info['pillow']}{' (Pillow-SIMD)' if info['pillow_simd'] else ''}, torch {info['torch']}, "
              f"torchvision {info['torchvision']}, webdataset {info['webdataset']}, DALI {info['dali']}; "
              f"{data['train_images']} training images in {data['train_shards']} shards "
              f"(--resize 144, --shard-size {data['shard_size']}); {args.workers} workers; "
              f"medians of {args.reps} rep(s).")
    (out / "table.md").write_text(header + "\n\n" + md + "\n")
    print()
    print(header)
    print()
    print(md)
    print(f"\nraw results: {raw_path}")


if __name__ == "__main__":
    main()
