"""Shared fixtures and helpers: a small synthetic SYSU-30k tree made once per session, packed datasets, the
real command line in a subprocess, a real S3 server, and readers of a run's records."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # test helpers (imagefiles) import as plain modules

TINY = dict(folders=8, images_per_folder=6, test_ids=5, distractors=12, height=144, seed=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # for Popen; cli() reads os.environ when called (the s3 fixture sets it)


def cli(*args, quiet: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m sysu30k [-q] ARGS`` in a subprocess: the real entry point (one-line errors, exit codes)."""
    return subprocess.run([sys.executable, "-m", "sysu30k", *(["-q"] if quiet else []), *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          **kw)


def records(run: Path, event: str) -> list[dict]:
    """The ``event`` records (step, epoch, cluster) of a training run's metrics.jsonl, in order."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def pack_synth(raw: Path, dst: Path, shard_count: int, workers: int = 1, **synth) -> Path:
    """A synthetic tree (``SynthConfig(**synth)``) written to ``raw`` and packed into ``dst``; returns ``dst``."""
    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    write_synth(str(raw), SynthConfig(**synth), workers=workers)
    run_shard(str(raw), str(dst), ShardJob(ShardingOptions(shard_count=shard_count)), show_progress=False)
    return dst


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A read-only synthetic tree (copy it before changing anything)."""
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("synth") / "tiny"
    write_synth(str(root), SynthConfig(**TINY))
    return root


@pytest.fixture
def tree_copy(tiny_tree, tmp_path) -> Path:
    """A private, writable copy of the tiny tree."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_tree, dst)
    return dst


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session, with the AWS variables pointing at it."""
    import s3fs
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("weed"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def packed_split(tiny_tree, tmp_path_factory) -> Path:
    """The tiny tree packed (7 images a shard) and split: read-only, shared by the evaluation tests."""
    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard
    from sysu30k.split.build import build_splits

    dst = tmp_path_factory.mktemp("evaldst") / "dst"
    run_shard(str(tiny_tree), str(dst), ShardJob(ShardingOptions(shard_count=7)), show_progress=False)
    build_splits(str(dst), scheduler="sync")
    return dst


def official_net(classes: int):
    """A module with the official ft_net's tree (Using_SYSU30k_Test_Set/model.py): what the released
    net_6.pth's keys are made of, with random weights (torch is imported here, not at collection)."""
    import torch

    from sysu30k.io.compat import import_torchvision

    class ClassBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Sequential(torch.nn.Linear(2048, classes))

    class FtNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = import_torchvision().models.resnet50(weights=None)
            self.classifier = ClassBlock()

    return FtNet()
