"""Every GPU figure of sysu30k in one call: environment, GPU tests, train steps, the loader, JPEG decoding,
scoring and k-NN at SYSU-30k size, train-weak under torchrun with SIGTERM and resume, eval cuda vs cpu.

Made for a lent GPU machine whose Python has torch and torchvision but neither DALI nor webdataset (and
reaches no registry), run from a copy of the working tree:

    python benchmarks/gpu_check.py --build-data benchmarks/gpu-data        # here, once (the packed set, < 40 MiB)
    python benchmarks/gpu_check.py --data benchmarks/gpu-data --out $OUT    # there, one call of <= 8 minutes

Each stage runs in its own process under its own time box (``--box``, seconds) and the JSON
(``OUT/gpu_check.json``) is rewritten after every stage, so a stage that hangs or crashes costs only its
box and the figures before it survive. A stage whose packages are missing records why and is skipped.
``--stages`` picks stages (comma list, default all). ``--device cpu --smoke`` runs every stage at tiny
sizes on the CPU (the test suite does, so the script cannot rot). DALI runs where its wheel was brought
(BENCHMARKS.md says how: ``pip install --no-deps`` from the carried parts). Timing: CUDA events around
warmed-up repeats, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("env", "tests", "train_step", "loader_step", "decode", "score", "knn", "torchrun", "eval")
BOXES = {"env": 60, "tests": 90, "train_step": 60, "loader_step": 60, "decode": 45, "score": 45, "knn": 45,
         "torchrun": 120, "eval": 60}                         # seconds; 585 in all, the stages usually far less
BUDGET = 450                                                  # the whole call: under the 8 minutes a lent machine gives
GPU_TESTS = ("tests/io/test_device.py", "tests/evaluation/test_scoring.py", "tests/loader/test_dali_pipeline.py")


def sizes(smoke: bool) -> dict:
    """Problem sizes: SYSU-30k's on a GPU, tiny ones for the CPU smoke run."""
    if smoke:
        return {"arch": "resnet18", "hw": (64, 32), "bags": 2, "per_bag": 3, "steps": 2, "warm": 1, "classes": 50,
                "queries": 50, "gallery": 2000, "dim": 64, "knn_n": 1000, "decode_n": 16}
    return {"arch": "resnet50", "hw": (256, 128), "bags": 12, "per_bag": 15, "steps": 20, "warm": 5, "classes": 28_310,
            "queries": 1000, "gallery": 479_730, "dim": 2048, "knn_n": 50_000, "decode_n": 2048}


class Clock:
    """Wall time of a region on ``device``: CUDA events on a GPU (synchronised at the end), else perf_counter."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.a.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.seconds = self.a.elapsed_time(self.b) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def median_time(fn, device, repeats: int, warm: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warm`` unmeasured ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        with Clock(device) as c:
            fn()
        times.append(c.seconds)
    return statistics.median(times)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


# ----------------------------------------------------------------------------- stages (each in a child process)

def stage_env(a) -> dict:
    import torch

    from sysu30k.doctor import run_checks

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() \
        if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "nvidia_smi": smi,
            "cpus": os.cpu_count(), "doctor": [r.__dict__ for r in run_checks()]}


def stage_tests(a) -> dict:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS], cwd=ROOT,
                       capture_output=True, text=True, timeout=BOXES["tests"] - 10)
    tail = p.stdout.strip().splitlines()[-1:] or [p.stderr.strip()[-300:]]
    return {"returncode": p.returncode, "summary": tail[0], "files": list(GPU_TESTS)}


def _batch(s: dict, device, seed: int = 0):
    """A synthetic bag-structured batch like the loader's (uint8 images normalised on the device)."""
    import torch

    from sysu30k.loader.loader import Batch

    g = torch.Generator().manual_seed(seed)
    n = s["bags"] * s["per_bag"]
    h, w = s["hw"]
    bag = torch.arange(s["bags"]).repeat_interleave(s["per_bag"])
    folder = 1 + torch.randint(0, s["classes"] - 5, (s["bags"],), generator=g)[bag]
    labels = torch.stack([folder + i for i in range(3)], 1)
    return Batch(images=torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g),
                 keys=[f"k{i}" for i in range(n)], valid=torch.ones(n, dtype=torch.bool), folder=folder, bag=bag,
                 bag_labels=labels).to(device)


def _step_fn(s: dict, device, method: str):
    """One optimiser step of train-weak's network and losses (bf16 autocast on a GPU), as the trainer runs it."""
    import torch

    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model
    from sysu30k.train.loop import forward
    from sysu30k.train.losses import method_loss

    model = build_model(ModelConfig(arch=s["arch"], num_classes=s["classes"], embedding=2048)).to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(b):
        terms = method_loss(method, forward(model, b.images, torch.device(device)), b.bag_labels, b.bag, b.folder,
                            b.valid)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        return float(terms["total"])
    return step


def stage_train_step(a) -> dict:
    import torch

    s = sizes(a.smoke)
    out = {}
    batch = _batch(s, a.device)
    n = s["bags"] * s["per_bag"]
    for method in ("folder", "dgl"):                      # plain cross-entropy vs the DGL losses
        step = _step_fn(s, a.device, method)
        if torch.device(a.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = median_time(lambda: step(batch), a.device, s["steps"], s["warm"])
        out[method] = {"ms_per_step": 1e3 * sec, "img_per_s": n / sec, "peak_gib": peak_gib(a.device)}
    out["dgl_over_ce"] = out["dgl"]["ms_per_step"] / out["folder"]["ms_per_step"]
    out.update(batch=n, arch=s["arch"], size=list(s["hw"]))
    return out


def stage_loader_step(a) -> dict:
    import torch

    from sysu30k.loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec

    s = sizes(a.smoke)
    spec = BagSpec(bags=s["bags"], per_bag=s["per_bag"])
    transform = TransformSpec(height=s["hw"][0], width=s["hw"][1])
    step = _step_fn(s, a.device, "folder")
    synthetic = _batch(s, a.device)
    t_syn = median_time(lambda: step(synthetic), a.device, s["steps"], s["warm"])
    out = {"synthetic_ms": 1e3 * t_syn}
    for decoder in ("pil", "dali"):
        if decoder == "dali":
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                out["dali"] = "skipped: DALI not installed"
                continue
        loader = TrainLoader(a.data, spec, transform, LoaderOptions(decoder=decoder, workers=a.workers,
                                                                    device=a.device, normalize=None))
        batches, times, t0 = 0, [], None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and batches < s["steps"] + s["warm"]:
            for raw in loader:
                b = raw.to(a.device, torch.float32)
                step(b)
                if torch.device(a.device).type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if t0 is not None and batches >= s["warm"]:
                    times.append(now - t0)
                t0, batches = now, batches + 1
                if batches >= s["steps"] + s["warm"] or time.monotonic() > deadline:
                    break
            loader.set_epoch(loader.epoch + 1)
        med = statistics.median(times) if times else float("nan")
        out[decoder] = {"ms_per_step": 1e3 * med, "ratio_to_synthetic": t_syn / med if times else None,
                        "steps_timed": len(times), "decoder_ran": loader.decoder}
    return out


def stage_decode(a) -> dict:
    """JPEG decoding of the packed 144×x images into 256×128 batches: DALI (mixed on a GPU), torchvision."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from sysu30k.loader.transforms import TransformSpec, draw_params

    s = sizes(a.smoke)
    table = pq.read_table(Path(a.data) / "manifests/images.parquet", columns=["shard", "offset", "size"])
    rows = table.to_pylist()[:s["decode_n"]]
    datas = []
    for r in rows:
        with open(Path(a.data) / "shards" / f"{r['shard']}.tar", "rb") as f:
            f.seek(r["offset"])
            datas.append(f.read(r["size"]))
    while len(datas) < s["decode_n"]:
        datas += datas[:s["decode_n"] - len(datas)]
    n = len(datas)
    out = {"images": n}
    spec = TransformSpec(height=256, width=128)
    try:
        import nvidia.dali  # noqa: F401

        from sysu30k.loader.decode_dali import DaliDecoder

        batch = min(n, 256)
        dec = DaliDecoder(spec, batch, a.device, threads=min(8, os.cpu_count() or 1))
        raws = [{"datas": datas[i:i + batch], "params": draw_params(len(datas[i:i + batch]), spec,
                                                                    np.random.default_rng(i)),
                 "keys": [str(j) for j in range(i, i + batch)]} for i in range(0, n, batch)]
        list(dec.stream(raws[:2]))                                   # build and warm
        with Clock(a.device) as c:
            got = list(dec.stream(raws * 3))
        out["dali"] = {"img_per_s": 3 * n / c.seconds, "backend": "mixed" if dec.gpu else "cpu",
                       "batches": len(got), "rebuilds": dec.rebuilds}
    except ImportError:
        out["dali"] = "skipped: DALI not installed"
    from sysu30k.io.compat import import_torchvision

    tv = import_torchvision()
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    dev = torch.device(a.device)

    def decode():
        imgs = tv.io.decode_jpeg(encoded, device=dev)
        return [torch.nn.functional.interpolate(i[None].float(), size=(256, 128), mode="bilinear") for i in imgs]
    try:
        sec = median_time(decode, a.device, 3, 1)
        out["torchvision"] = {"img_per_s": n / sec, "device": str(dev)}
    except RuntimeError as exc:                      # torchvision without its image extension (this CPU build)
        out["torchvision"] = f"unavailable: {str(exc).splitlines()[0][:160]}"
    return out


def stage_score(a) -> dict:
    """The official scorer on 1,000 × 479,730 × 2048 features made on the device (no transfer timed)."""
    import numpy as np
    import torch

    from sysu30k.evaluation.scoring import score

    s = sizes(a.smoke)
    dev = torch.device(a.device)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(s["queries"], s["dim"], device=dev, generator=g), dim=1)
    gal = torch.nn.functional.normalize(torch.randn(s["gallery"], s["dim"], device=dev, generator=g), dim=1)
    gal[:s["queries"]] = torch.nn.functional.normalize(q + 0.5 * torch.randn_like(q), dim=1)
    qp, qc = np.arange(s["queries"]), np.zeros(s["queries"], np.int64)
    gp = np.concatenate([qp, np.full(s["gallery"] - s["queries"], -1000)])
    gcam = np.ones(s["gallery"], np.int64)
    result = {}

    def run():
        result["s"] = score(q, qp, qc, gal, gp, gcam, device=dev)
    sec = median_time(run, a.device, 3, 1)
    return {"seconds": sec, "queries": s["queries"], "gallery": s["gallery"], "dim": s["dim"],
            "rank1": result["s"].summary()["rank1"], "peak_gib": peak_gib(a.device)}


def stage_knn(a) -> dict:
    """SSG's exact k-NN (k = 20) of N points among themselves, and re-ranking's certified pass."""
    import torch

    from sysu30k.evaluation.rerank import neighbours
    from sysu30k.train.ssg.rerank import knn

    s = sizes(a.smoke)
    dev = torch.device(a.device)
    x = torch.nn.functional.normalize(torch.randn(s["knn_n"], s["dim"], device=dev), dim=1)
    sec = median_time(lambda: knn(x, x, 20, device=dev, exclude_self=True), a.device, 3, 1)
    with Clock(a.device) as c:
        _, _, _, slow = neighbours([x.double()], x.double().norm(dim=1), 21)
    return {"ssg_knn_s": sec, "rerank_neighbours_s": c.seconds, "slow_rows": slow, "n": s["knn_n"], "dim": s["dim"]}


def _train_args(a, out: Path, s: dict) -> list[str]:
    h, w = s["hw"] if not a.smoke else (64, 32)
    return ["train-weak", a.data, "--out", str(out), "--epochs", "1", "--arch", s["arch"], "--height", str(h),
            "--width", str(w), "--bags", str(s["bags"]), "--per-bag", str(s["per_bag"]), "--workers", str(a.workers),
            "--device", a.device,
            "--optimizer", "adam", "--lr", "1e-4", "--no-tensorboard", "--log-every", "1"]


def stage_torchrun(a) -> dict:
    """train-weak on every GPU for one short epoch: SIGTERM after the first step, then the same command resumes.

    The wait for the first step takes up to half the stage's box: a loaded 2-core CI machine needs over a
    minute to start two CPU ranks, and a SIGTERM before the trainer's handler is installed saves nothing."""
    import torch

    s = sizes(a.smoke)
    ranks = max(1, torch.cuda.device_count()) if torch.device(a.device).type == "cuda" else 2
    out = Path(a.out) / "torchrun-run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(ranks), "--master-port",
           str(29500 + os.getpid() % 1000), "-m", "sysu30k", "-q", *_train_args(a, out, s)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    log = out / "metrics.jsonl"

    def stepped() -> bool:
        return log.exists() and '"event": "step"' in log.read_text()
    while time.perf_counter() - t0 < a.stage_box / 2 and p.poll() is None and not stepped():
        time.sleep(0.2)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    first = {"returncode": p.returncode, "seconds": time.perf_counter() - t0, "stderr": err[-400:]}
    if (out / "last.pt").exists():                    # the SIGTERM checkpoint: where the epoch stopped
        first["saved_loader"] = torch.load(out / "last.pt", weights_only=True)["loader"]
    t1 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=max(5.0, a.stage_box - (time.perf_counter() - t0) - 5))
    epochs = [json.loads(x) for x in log.read_text().splitlines() if '"epoch"' in x] if log.exists() else []
    return {"ranks": ranks, "interrupted": first, "resumed": {"returncode": r.returncode,
            "seconds": time.perf_counter() - t1, "stderr": r.stderr[-400:]},
            "epoch_records": len([e for e in epochs if e.get("event") == "epoch"])}


def stage_eval(a) -> dict:
    """eval of one random checkpoint with --device cuda and --device cpu: the same metrics?"""
    import torch

    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=50, embedding=128)
    ckpt = Path(a.out) / "eval-net.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": build_model(cfg).state_dict()}, ckpt)
    got = {}
    for dev in dict.fromkeys([a.device, "cpu"]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "sysu30k", "-q", "eval", a.data, "--checkpoint", str(ckpt),
                            "--device", dev, "--out", str(Path(a.out) / f"eval-{dev.replace(':', '')}"), "--json",
                            "--workers", str(a.workers), "--height", "128", "--width", "64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=BOXES["eval"] / 2)
        if r.returncode:
            return {"error": f"{dev}: {r.stderr[-400:]}"}
        got[dev] = {"metrics": json.loads(r.stdout)["metrics"], "seconds": time.perf_counter() - t0}
    m = [v["metrics"] for v in got.values()]
    return {"runs": got, "equal": all(x == m[0] for x in m),
            "max_abs_diff": max(abs(m[0][k] - x[k]) for x in m for k in m[0])}


# ----------------------------------------------------------------------------- driver

def child(a) -> None:
    try:
        result = {"ok": True, **globals()[f"stage_{a.child}"](a)}
    except ImportError as exc:
        result = {"ok": False, "skipped": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # the stage failed: recorded, the next stage still runs
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
    print("RESULT " + json.dumps(result, default=str), flush=True)


def build_data(path: str) -> None:
    """The packed synthetic set the check reads (train, test and a val split), under 40 MiB."""
    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard
    from sysu30k.split.build import build_splits
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    raw = Path(path + "-raw")
    write_synth(str(raw), SynthConfig(folders=120, images_per_folder=10, test_ids=40, distractors=200, height=144,
                                      seed=2026), workers=os.cpu_count() or 1)
    run_shard(str(raw), path, ShardJob(ShardingOptions(shard_count=24)), show_progress=False)
    build_splits(path, scheduler="sync", val_folders=10)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(f"wrote {path}: {size / 2**20:.1f} MiB")


def run_stage(a: argparse.Namespace, name: str, box: float) -> dict:
    """One stage in a child process of its own session, killed with its descendants (torchrun's ranks) after
    ``box`` seconds; its RESULT line, or why there is none."""
    cmd = [sys.executable, __file__, "--child", name, "--out", a.out, "--data", a.data, "--device", a.device,
           "--workers", str(a.workers), "--stage-box", str(box), *(["--smoke"] if a.smoke else [])]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=box)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"ok": False, "error": f"timed out after {box:.0f} s"}
    line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"ok": False, "error": f"exit {p.returncode}", "stderr": err[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out/gpu-check"))
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "gpu-data"), help="the packed set (--build-data)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (with --device cpu: the test suite's run)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--box", type=float, default=1.0, help="scale every stage's time box")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole call: a stage's box is cut "
                    "to what is left, and stages that would get under 10 s are recorded as skipped")
    ap.add_argument("--build-data", default=None, metavar="DIR", help="write the packed set to DIR and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stage-box", type=float, default=BOXES["torchrun"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_data:
        build_data(a.build_data)
        return
    if a.child:
        child(a)
        return
    chosen = [x for x in a.stages.split(",") if x]
    unknown = set(chosen) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s): {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report = {"device": a.device, "smoke": a.smoke, "data": a.data, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "stages": {}}
    end = time.monotonic() + a.budget
    for name in chosen:
        box = min(BOXES[name] * a.box, end - time.monotonic())
        t0 = time.perf_counter()
        result = run_stage(a, name, box) if box >= 10 else {"ok": False, "error": "skipped: the --budget is spent"}
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        report["stages"][name] = result
        (Path(a.out) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"{name:<12} {'ok' if result.get('ok') else 'FAILED'} {result['wall_s']:7.1f} s  "
              f"{json.dumps({k: v for k, v in result.items() if k not in ('ok', 'wall_s', 'trace', 'doctor')})[:300]}",
              flush=True)


if __name__ == "__main__":
    main()
