"""`sysu30k verify`: a finished DST checked byte for byte against its manifests; a rerun of `shard` and the
loader notice a missing or resized tar."""

import shutil

import pytest
from conftest import cli

from sysu30k.errors import UserError
from sysu30k.ingest.config import ShardingOptions, ShardJob
from sysu30k.ingest.shard import run_shard
from sysu30k.ingest.verify import verify


@pytest.fixture(scope="module")
def packed(tiny_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("verify") / "dst"
    run_shard(str(tiny_tree), str(dst), ShardJob(ShardingOptions(shard_count=10)), show_progress=False)
    return dst


def damaged(packed, tmp_path, how: str):
    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    tars = sorted((dst / "shards").glob("*.tar"))
    if how == "flip":
        data = bytearray(tars[1].read_bytes())
        data[1024 + 700] ^= 0xFF                         # inside the first member's data
        tars[1].write_bytes(bytes(data))
    elif how == "delete":
        tars[0].unlink()
    elif how == "truncate":
        tars[2].write_bytes(tars[2].read_bytes()[:-1024])
    elif how == "extra":
        shutil.copy(tars[0], dst / "shards" / "train-999999.tar")
    elif how == "index":
        idx = tars[0].with_suffix(".idx")
        lines = idx.read_text().splitlines()
        idx.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    return dst, tars


def test_a_clean_dst_verifies(packed):
    r = verify(str(packed), show_progress=False)
    assert r.problems == [] and r.shards == len(list((packed / "shards").glob("*.tar"))) and r.images > 0
    ok = cli("verify", packed)
    assert ok.returncode == 0 and f"checked {r.shards} shards, {r.images} images" in ok.stdout


@pytest.mark.parametrize("how,kind,where", [("flip", "different", (1, ".tar")), ("delete", "missing", (0, ".tar")),
                                            ("truncate", "different", (2, ".tar")),
                                            ("extra", "extra", "train-999999.tar"),
                                            ("index", "different", (0, ".idx"))])
def test_every_kind_of_damage_is_named(packed, tmp_path, how, kind, where):
    dst, tars = damaged(packed, tmp_path, how)
    name = where if isinstance(where, str) else tars[where[0]].with_suffix(where[1]).name
    problems = verify(str(dst), show_progress=False).problems
    assert any(k == kind and w.startswith(f"shards/{name}") for k, w, _ in problems), problems
    r = cli("verify", dst)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "problem(s)" in r.stderr, r.stderr


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_a_rerun_of_shard_notices_a_missing_or_resized_tar(packed, tiny_tree, tmp_path, how):
    dst, tars = damaged(packed, tmp_path, how)
    r = cli("shard", tiny_tree, dst, "--shard-count", "10")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing or resized" in r.stderr, r.stderr


def test_the_loader_names_a_missing_tar_in_one_line(packed, tmp_path):
    from sysu30k.loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec

    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    train = sorted((dst / "shards").glob("train-*.tar"))[-1]
    train.unlink()
    with pytest.raises(UserError, match=f"{train.name} is missing"):
        TrainLoader(str(dst), BagSpec(bags=2, per_bag=2), TransformSpec(height=64, width=32),
                    LoaderOptions(decoder="pil", workers=0))


def test_labels_that_disagree_with_the_manifest_are_found(packed, tmp_path):
    import tarfile

    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    tar = sorted((dst / "shards").glob("train-*.tar"))[0]
    with tarfile.open(tar) as t:
        label = next(m for m in t.getmembers() if m.name.endswith(".json"))
        text = t.extractfile(label).read()
    data = bytearray(tar.read_bytes())
    forged = text.replace(b'"folder":1', b'"folder":2')
    assert forged != text and len(forged) == len(text)
    data[label.offset_data:label.offset_data + len(text)] = forged
    tar.write_bytes(bytes(data))
    problems = verify(str(dst), show_progress=False).problems
    assert any(where.endswith(label.name) and "labels" in detail for _, where, detail in problems), problems
