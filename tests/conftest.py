"""Shared fixtures: a small synthetic SYSU-30k tree, made once per session."""

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # test helpers (imagefiles) import as plain modules

TINY = dict(folders=8, images_per_folder=6, test_ids=5, distractors=12, height=144, seed=1)


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
