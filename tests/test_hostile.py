"""The one-line contract, end to end: what a careless or hostile user gives every command (options, trees,
manifests, markers, checkpoints, feature files, out folders, a full disk) ends in one line on stderr, exit
status 2, no traceback, and nothing half-written."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY

from sysu30k.evaluation import write_features

SMALL = ["--arch", "resnet18", "--embedding", "16", "--height", "64", "--width", "32", "--workers", "0",
         "--decoder", "pil", "--device", "cpu"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sysu30k-pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A packed and split DST, its source tree, and a checkpoint trained on it (0 epochs)."""
    root = tmp_path_factory.mktemp("hostile")                       # through the CLI alone
    synth = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert run("synth", root / "raw", *synth).returncode == 0
    dst = root / "dst"
    assert run("shard", root / "raw", dst, "--shard-count", "10").returncode == 0
    assert run("split", dst, "--scheduler", "sync").returncode == 0
    assert run("train-weak", dst, "--out", root / "run", "--epochs", "0", *SMALL).returncode == 0
    return root


def run(*args, limit_bytes: int | None = None, cwd=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "sysu30k", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=180, preexec_fn=limit if limit_bytes else None, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def copy_dst(world, tmp_path, *edits):
    """A private copy of the packed DST with ``edits`` (functions of its path) applied."""
    dst = tmp_path / "dst"
    shutil.copytree(world / "dst", dst)
    for edit in edits:
        edit(dst)
    return dst


def unlink(rel: str):
    return lambda d: (d / rel).unlink()


def cut(rel: str):
    return lambda d: truncated(next(d.glob(rel)))


def src_with(world, tmp_path, rel: str, data: bytes):
    src = tmp_path / "src"
    shutil.copytree(world / "raw", src)
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes(data)
    return src


def truncated(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def checkpoint_file(tmp_path, data: bytes | None = None, obj=None):
    path = tmp_path / "ckpt.pt"
    if obj is not None:
        torch.save(obj, path)
    else:
        path.write_bytes(data)
    return path


def features(tmp_path, name, **columns):
    t = pa.table(columns)
    pq.write_table(t, tmp_path / name)
    return tmp_path / name


def feature_pair(world, tmp_path):
    q = write_features_for(world, tmp_path, "query")
    g = write_features_for(world, tmp_path, "gallery")
    return q, g


def write_features_for(world, tmp_path, role):
    rows = [r for r in pq.read_table(world / "dst/manifests/split.parquet").to_pylist() if r["role"] == role]
    f = np.random.default_rng(0).standard_normal((len(rows), 8)).astype(np.float32)
    write_features(tmp_path / f"{role}.parquet", [r["key"] for r in rows], [r["pid"] for r in rows],
                   [r["camid"] for r in rows], f / np.linalg.norm(f, axis=1, keepdims=True))
    return tmp_path / f"{role}.parquet"


# (name, builder(world, tmp_path) -> args, needle in the message)
CASES = [
    # options
    ("bags 0", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--bags", "0"], "--bags"),
    ("height 0", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--height", "0"], "--height"),
    ("erase-p 2", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--erase-p", "2"], "--erase-p"),
    ("lr nan", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--lr", "nan"], "--lr"),
    ("device cuda", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--device", "cuda", *SMALL[:-2]],
     "--device cuda"),
    ("eval device cuda", lambda w, t: ["eval", w / "dst", "--checkpoint", w / "run/last.pt", "--device", "cuda:0",
                                       "--out", t / "e"], "--device"),
    ("device nonsense", lambda w, t: ["eval", w / "dst", "--checkpoint", w / "run/last.pt", "--device", "tpu",
                                      "--out", t / "e"], "--device"),
    ("unknown flag", lambda w, t: ["shard", w / "raw", t / "d", "--shards", "3"], "--shards"),
    ("size unit", lambda w, t: ["shard", w / "raw", t / "d", "--shard-size", "3 parsecs"], "--shard-size"),
    ("subsets", lambda w, t: ["shard", w / "raw", t / "d", "--subsets", "train,validation"], "--subsets"),
    ("config toml", lambda w, t: ["train-weak", w / "dst", "--out", t / "r", "--config",
                                  (t / "c.toml", (t / "c.toml").write_text("bags = [")) and t / "c.toml"],
     "not valid TOML"),
    # trees
    ("src missing", lambda w, t: ["shard", t / "nowhere", t / "d"], "nowhere"),
    ("src a file", lambda w, t: ["shard", (t / "f", (t / "f").write_text("x"))[0], t / "d"], "not a folder"),
    ("src empty", lambda w, t: ["shard", (t / "e", (t / "e").mkdir())[0], t / "d"], "holds none of"),
    ("bag json huge label", lambda w, t: ["shard", src_with(w, t, "bag_level_label.json", json.dumps(
        [{"BagID": "b", "BagLabel": [10 ** 29], "BagImages": ["0000000001/*"]}]).encode()), t / "d"],
     "bag_level_label.json"),
    ("bag json not utf-8", lambda w, t: ["shard", src_with(w, t, "bag_level_label.json", b"[\xff\xfe]"), t / "d"],
     "UTF-8"),
    ("bag json not a list", lambda w, t: ["shard", src_with(w, t, "bag_level_label.json", b'{"a": 1}'), t / "d"],
     "JSON list"),
    ("meta latin-1", lambda w, t: ["shard", src_with(w, t, "meta/train.txt", "0000000001/caf\xe9.jpg\n".encode(
        "latin-1")), t / "d"], "UTF-8"),
    ("dst a file", lambda w, t: ["shard", w / "raw", (t / "f", (t / "f").write_text("x"))[0]], "f"),
    # manifests and markers
    ("split no manifests", lambda w, t: ["split", t], "run `sysu30k shard"),
    ("split truncated images", lambda w, t: ["split", copy_dst(w, t, cut("manifests/images.parquet")),
                                             "--scheduler", "sync"], "images.parquet"),
    ("split text images", lambda w, t: ["split", copy_dst(w, t, lambda d: (d / "manifests/images.parquet").write_text(
        "key,subset\n")), "--scheduler", "sync"], "images.parquet"),
    ("split truncated summary", lambda w, t: ["split", copy_dst(w, t, cut("manifests/summary.json")),
                                              "--scheduler", "sync"], "summary.json"),
    ("shard truncated plan", lambda w, t: ["shard", w / "raw", copy_dst(w, t, cut("_plan/plan.json"),
                                                                         unlink("manifests/summary.json")),
                                           "--shard-count", "10"], "plan.json"),
    ("eval truncated split", lambda w, t: ["eval", copy_dst(w, t, cut("manifests/split.parquet")), "--checkpoint",
                                           w / "run/last.pt", "--out", t / "e"], "split.parquet"),
    ("train truncated images", lambda w, t: ["train-weak", copy_dst(w, t, cut("manifests/images.parquet")),
                                             "--out", t / "r", *SMALL], "images.parquet"),
    ("eval no split", lambda w, t: ["eval", copy_dst(w, t, unlink("manifests/split.parquet")), "--checkpoint",
                                    w / "run/last.pt", "--out", t / "e"], "split"),
    ("eval val missing", lambda w, t: ["eval", w / "dst", "--checkpoint", w / "run/last.pt", "--split", "val",
                                       "--out", t / "e"], "val"),
    # checkpoints
    ("ckpt missing", lambda w, t: ["eval", w / "dst", "--checkpoint", t / "none.pt", "--out", t / "e"], "none.pt"),
    ("ckpt empty", lambda w, t: ["eval", w / "dst", "--checkpoint", checkpoint_file(t, b""), "--out", t / "e"],
     "ckpt.pt"),
    ("ckpt text", lambda w, t: ["eval", w / "dst", "--checkpoint", checkpoint_file(t, b"hello, world\n"),
                                "--out", t / "e"], "ckpt.pt"),
    ("ckpt pickle payload", lambda w, t: ["eval", w / "dst", "--checkpoint", checkpoint_file(t, pickle.dumps(Evil())),
                                          "--out", t / "e"], "ckpt.pt"),
    ("ckpt torch pickle payload", lambda w, t: ["eval", w / "dst", "--checkpoint",
                                                checkpoint_file(t, obj={"model": Evil()}), "--out", t / "e"],
     "ckpt.pt"),
    ("ckpt wrong structure", lambda w, t: ["eval", w / "dst", "--checkpoint",
                                           checkpoint_file(t, obj={"weights": torch.zeros(3)}), "--out", t / "e"],
     "ckpt.pt"),
    ("ckpt truncated", lambda w, t: ["eval", w / "dst", "--checkpoint",
                                     checkpoint_file(t, (w / "run/last.pt").read_bytes()[:4096]), "--out", t / "e"],
     "ckpt.pt"),
    ("ssg init from weak", lambda w, t: ["train-ssg", w / "dst", "--out", t / "r", "--init", w / "run/last.pt"],
     "train-ssg checkpoint"),
    # feature files
    ("features a folder", lambda w, t: ["eval", "--query-features", t, "--gallery-features", t, "--out", t / "e"],
     "feature"),
    ("features no key column", lambda w, t: ["eval", "--query-features", features(t, "q.parquet", x=[1]),
                                             "--gallery-features", features(t, "g.parquet", x=[1]),
                                             "--out", t / "e"], "key"),
    ("features text vectors", lambda w, t: ["eval", "--query-features", features(t, "q.parquet", key=["a"],
                                                                                   feature=["1,2"]),
                                            "--gallery-features", t / "q.parquet", "--out", t / "e"], "feature"),
    ("features null vector", lambda w, t: ["eval", "--query-features", features(
        t, "q.parquet", key=["a", "b"], feature=pa.array([[1.0], None], pa.list_(pa.float32())), pid=[1, 2],
        camid=[1, 2]), "--gallery-features", t / "q.parquet", "--out", t / "e"], "no feature vector"),
    # out folders and disks
    ("eval out a file", lambda w, t: ["eval", "--query-features", (qg := feature_pair(w, t))[0],
                                      "--gallery-features", qg[1], "--out",
                                      (t / "o", (t / "o").write_text("x"))[0]], "o"),
    ("train out a file", lambda w, t: ["train-weak", w / "dst", "--out", (t / "o", (t / "o").write_text("x"))[0],
                                       *SMALL], "o"),
    ("peek out missing folder", lambda w, t: ["peek", w / "dst", "--out", t / "no" / "such" / "b.png", "--bags", "2",
                                              "--per-bag", "2", "--height", "64", "--width", "32", "--decoder",
                                              "pil"], "b.png"),
    ("peek batch too far", lambda w, t: ["peek", w / "dst", "--batch", "100000", "--bags", "2", "--per-bag", "2",
                                         "--decoder", "pil"], "--batch"),
    ("compare missing run", lambda w, t: ["eval", "--compare", t / "a", t / "b"], "metrics.json"),
]

DISK_FULL = [
    ("shard on a full disk", lambda w, t: ["shard", w / "raw", t / "d", "--shard-count", "10"]),
    ("eval on a full disk", lambda w, t: ["eval", "--query-features", (qg := feature_pair(w, t))[0],
                                          "--gallery-features", qg[1], "--out", t / "e"]),
]


@pytest.mark.parametrize("name,build,needle", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_exit_2(world, tmp_path, name, build, needle):
    args = build(world, tmp_path)
    r = run(*args)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (r.returncode, r.stderr)
    assert not os.path.exists("/tmp/sysu30k-pwned")


@pytest.mark.parametrize("name,build", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_a_full_disk_is_one_line_and_leaves_nothing_that_looks_complete(world, tmp_path, name, build):
    args = build(world, tmp_path)
    r = run(*args, limit_bytes=20_000)
    assert "Traceback" not in r.stderr and r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "File too large" in r.stderr or "No space" in r.stderr, r.stderr
    assert not (tmp_path / "d" / "manifests" / "summary.json").exists()
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_a_damaged_completion_marker_means_the_shard_is_packed_again(world, tmp_path):
    """Markers are written atomically, so a damaged one was damaged afterwards: it vouches for nothing."""
    from sysu30k.ingest.verify import verify

    dst = copy_dst(world, tmp_path, cut("_parts/*.done.json"), unlink("manifests/summary.json"))
    r = run("shard", world / "raw", dst, "--shard-count", "10")
    assert r.returncode == 0, r.stderr
    assert verify(str(dst), show_progress=False).problems == []


def test_the_table_is_long_enough():
    assert len(CASES) + len(DISK_FULL) >= 40
