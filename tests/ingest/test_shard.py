"""`sysu30k shard` end to end on synthetic data: readers, byte identity, determinism, resume, bad input."""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import imagefiles as f
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import tree_digest
from PIL import Image

from sysu30k.cli import cli
from sysu30k.ingest.config import ShardingOptions, ShardJob
from sysu30k.ingest.shard import run_shard
from sysu30k.ingest.verify import verify

SMALL = ShardJob(ShardingOptions(shard_count=10))


def images_of(dst: Path):
    return pq.read_table(dst / "manifests/images.parquet").to_pylist()


def sources_on_disk(src: Path) -> list[str]:
    return sorted(str(p.relative_to(src)) for folder in ("sysu_train_set_all", "sysu_test_set_all")
                  for p in (src / folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def packed(tiny_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("packed") / "dst"
    summary = run_shard(str(tiny_tree), str(dst), SMALL, show_progress=False)
    return tiny_tree, dst, summary


def test_every_input_is_packed_byte_identical(packed):
    src, dst, summary = packed
    rows = images_of(dst)
    assert sorted(r["path"] for r in rows) == sources_on_disk(src)
    assert summary["rejects_by_reason"] == {}
    for r in rows:
        data = (src / r["path"]).read_bytes()
        with open(dst / "shards" / f"{r['shard']}.tar", "rb") as t:
            t.seek(r["offset"])
            assert t.read(r["size"]) == data
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
    assert len({r["key"] for r in rows}) == len(rows)


def test_manifest_fields(packed):
    src, dst, summary = packed
    rows = images_of(dst)
    train = [r for r in rows if r["subset"] == "train"]
    assert all(r["folder"] == int(Path(r["path"]).parent.name) and r["pid"] is None for r in train)
    query = [r for r in rows if r["subset"] == "query"]
    assert all(r["camid"] == 2 and not r["distractor"] and r["pid"] > 0 for r in query)
    distractors = [r for r in rows if r["distractor"]]
    assert len(distractors) == 12 and all(r["pid"] == -1000 and r["subset"] == "gallery" for r in distractors)
    assert all((r["width"], r["height"]) == (72, 144) for r in rows)
    shards = pq.read_table(dst / "manifests/shards.parquet").to_pylist()
    for s in shards:
        tar = (dst / "shards" / f"{s['shard']}.tar").read_bytes()
        assert len(tar) == s["bytes"] and hashlib.sha256(tar).hexdigest() == s["sha256"]
        assert s["count"] == sum(1 for r in rows if r["shard"] == s["shard"]) <= 10
    bags = pq.read_table(dst / "manifests/bags.parquet").to_pylist()
    assert len(bags) == 3 * 8 and summary["bag_source"] == "bag_level_label.json"
    per_folder = {k: sum(1 for r in train if r["folder"] == k) for k in range(1, 9)}
    for b in bags:
        assert b["images"] == sum(per_folder[int(x)] for x in set(b["folders"]))
    assert summary["subsets"]["train"]["images"] == len(train)


def expected_labels(r: dict) -> dict:
    return {k: r[k] for k in ("subset", "folder", "pid", "camid", "distractor")}


def test_tarfile_reads_every_member(packed):
    _, dst, _ = packed
    rows = {r["key"] + ".jpg": r for r in images_of(dst)}
    seen, labels = {}, {}
    for tar in sorted((dst / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            names = t.getnames()
            assert names[1::2] == [n.replace(".jpg", ".json") for n in names[::2]]     # KEY.jpg, then KEY.json
            for m in t.getmembers():
                data = t.extractfile(m).read()
                assert m.mtime == 0 and m.mode == 0o444 and m.uid == 0 and m.isfile()
                if m.name.endswith(".json"):
                    labels[m.name[:-5] + ".jpg"] = json.loads(data)
                else:
                    seen[m.name] = hashlib.sha256(data).hexdigest()
    assert seen == {name: r["sha256"] for name, r in rows.items()}
    assert labels == {name: expected_labels(r) for name, r in rows.items()}


def test_no_labels_packs_the_same_images_alone(packed, tmp_path):
    src, dst, _ = packed
    bare = tmp_path / "bare"
    run_shard(str(src), str(bare), dataclasses.replace(SMALL, labels=False), show_progress=False)
    for tar in sorted((bare / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            assert all(n.endswith(".jpg") for n in t.getnames())
    assert [(r["key"], r["sha256"]) for r in images_of(bare)] == [(r["key"], r["sha256"]) for r in images_of(dst)]
    assert not verify(str(bare), show_progress=False).problems


def test_webdataset_reads_each_image_once(packed):
    import webdataset as wds

    _, dst, _ = packed
    urls = [str(p) for p in sorted((dst / "shards").glob("*.tar"))]
    samples = [(s["__key__"], hashlib.sha256(s["jpg"]).hexdigest(), s["json"])
               for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys))
    assert {k: h for k, h, _ in samples} == {r["key"]: r["sha256"] for r in images_of(dst)}
    assert {k: j for k, _, j in samples} == {r["key"]: expected_labels(r) for r in images_of(dst)}


def test_hugging_face_datasets_reads_images_and_labels(packed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    _, dst, _ = packed
    tars = sorted(str(p) for p in (dst / "shards").glob("*.tar"))
    labels = {"subset": datasets.Value("string"), "folder": datasets.Value("int32"), "pid": datasets.Value("int32"),
              "camid": datasets.Value("int8"), "distractor": datasets.Value("bool")}
    features = datasets.Features({"jpg": datasets.Image(), "json": labels, "__key__": datasets.Value("string"),
                                  "__url__": datasets.Value("string")})       # a test shard alone has no folders
    ds = datasets.load_dataset("webdataset", data_files={"shards": tars}, split="shards", features=features,
                               cache_dir=str(tmp_path / "hf"))
    rows = {r["key"]: r for r in images_of(dst)}
    assert sorted(ds["__key__"]) == sorted(rows)
    for sample in ds:
        assert sample["json"] == expected_labels(rows[sample["__key__"]])
        assert sample["jpg"].size == (rows[sample["__key__"]]["width"], rows[sample["__key__"]]["height"])


def test_index_matches_wds2idx(packed, tmp_path):
    _, dst, _ = packed
    for tar in sorted((dst / "shards").glob("*.tar"))[:3]:
        ref = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(Path(sys.executable).with_name("wds2idx")), str(tar), str(ref)], check=True,
                       capture_output=True)
        assert ref.read_bytes() == tar.with_suffix(".idx").read_bytes()


def test_dali_reads_shards_with_written_index(packed):
    from nvidia.dali import fn, pipeline_def, types

    _, dst, _ = packed
    shards = pq.read_table(dst / "manifests/shards.parquet")["shard"].to_pylist()   # packing order
    tars = [dst / "shards" / f"{s}.tar" for s in shards]
    rows = images_of(dst)

    @pipeline_def(batch_size=len(rows), num_threads=2, device_id=None)
    def pipe():
        raw, labels = fn.readers.webdataset(paths=[str(t) for t in tars],
                                    index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                    ext=["jpg", "json"], random_shuffle=False, name="reader")
        return raw, labels, fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    raw, labels, decoded = p.run()
    got = [hashlib.sha256(raw.at(i).tobytes()).hexdigest() for i in range(len(raw))]
    assert got == [r["sha256"] for r in rows]                   # same images, in manifest order
    assert [json.loads(labels.at(i).tobytes()) for i in range(len(labels))] == [expected_labels(r) for r in rows]
    assert all(decoded.at(i).shape == (144, 72, 3) for i in range(len(decoded)))


def test_deterministic_across_runs_and_workers(packed, tmp_path):
    src, dst, _ = packed
    other = tmp_path / "again"
    run_shard(str(src), str(other), SMALL, workers=2, show_progress=False)
    assert tree_digest(other) == tree_digest(dst)


def test_rerun_of_complete_output_is_a_no_op_and_other_settings_refused(packed):
    from sysu30k.errors import UserError

    src, dst, summary = packed
    before = tree_digest(dst)
    assert run_shard(str(src), str(dst), SMALL, show_progress=False) == summary
    assert tree_digest(dst) == before
    with pytest.raises(UserError, match="--overwrite"):
        run_shard(str(src), str(dst), ShardJob(ShardingOptions(shard_count=11)), show_progress=False)


def test_shard_size_and_count_limits(tiny_tree, tmp_path):
    s = run_shard(str(tiny_tree), str(tmp_path / "a"), ShardJob(ShardingOptions(shard_size=20_000),
                                                               subsets=("train",)), show_progress=False)
    rows = pq.read_table(tmp_path / "a/manifests/shards.parquet").to_pylist()
    assert s["subsets"]["train"]["shards"] == len(rows) > 3
    # planned members fit the target; the tar adds its 1 KiB end marker and pads to a 10 KiB record
    assert all(r["bytes"] <= 20_000 + 1024 + 10240 for r in rows if r["count"] > 1)
    assert all(r["bytes"] > 20_000 - 2 * 4289 - 10240 for r in rows[:-1])        # not cut needlessly early


def test_bad_inputs_go_to_rejects_and_the_run_continues(tree_copy, tmp_path):
    folder = tree_copy / "sysu_train_set_all/0000000002"
    weird_name = "ﬁlé näme. with spaces.and.dots " + "x" * 62 + ".v2.jpg"
    assert len(weird_name) == 100
    files = {"zero.jpg": b"", "text.jpg": b"not an image", "cut.jpg": f.truncated_jpeg(),
             "bomb.jpg": f.bomb_jpeg(), "cmyk.jpg": f.cmyk_jpeg(), "grey.jpg": f.grey_jpeg(),
             "png.jpg": f.png_bytes(), "rotated.jpg": f.exif_rotated_jpeg(6), weird_name: f.rgb_jpeg(seed=9)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    dst = tmp_path / "dst"
    summary = run_shard(str(tree_copy), str(dst), SMALL, workers=2, show_progress=False)
    rejects = {Path(r["path"]).name: r["reason"] for r in pq.read_table(dst / "manifests/rejects.parquet").to_pylist()}
    assert rejects == {"zero.jpg": "empty", "text.jpg": "not-an-image", "cut.jpg": "truncated",
                       "bomb.jpg": "decompression-bomb"}
    rows = {Path(r["path"]).name: r for r in images_of(dst)}
    assert len(rows) + len(rejects) == len(sources_on_disk(tree_copy))
    for name in ("cmyk.jpg", "grey.jpg", "png.jpg", "rotated.jpg", weird_name):
        r = rows[name]
        im = Image.open(io.BytesIO(_member(dst, r)))
        im.load()
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r["width"], r["height"]) == (48, 96)
    key = rows[weird_name]["key"]
    assert key.isascii() and "." not in key and len(key) <= 64
    assert (tree_copy / "sysu_train_set_all/0000000002" / weird_name).read_bytes() == \
        _member(dst, rows[weird_name])
    assert summary["rejects_by_reason"] == {"decompression-bomb": 1, "empty": 1, "not-an-image": 1, "truncated": 1}


def _member(dst: Path, row: dict) -> bytes:
    with open(dst / "shards" / f"{row['shard']}.tar", "rb") as t:
        t.seek(row["offset"])
        return t.read(row["size"])


def test_resume_after_sigkill_is_byte_identical(tiny_tree, tmp_path):
    args = ["shard", str(tiny_tree), "", "--shard-count", "2", "--resize", "100"]
    reference = tmp_path / "reference"
    assert CliRunner().invoke(cli, args[:2] + [str(reference)] + args[3:]).exit_code == 0
    dst = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sysu30k", "-q"] + args[:2] + [str(dst)] + args[3:]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((dst / "_parts").glob("*.done.json"))) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dst / "manifests/summary.json").exists(), "the run finished before it could be killed"
    for marker in (dst / "_parts").glob("*.done.json"):                # whatever looks complete is complete
        stats = json.loads(marker.read_text())
        tar = (dst / "shards" / f"{stats['shard']}.tar").read_bytes()
        assert len(tar) == stats["bytes"] and hashlib.sha256(tar).hexdigest() == stats["sha256"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tree_digest(dst) == tree_digest(reference)
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]


def test_an_interrupted_plan_keeps_only_the_shards_it_plans_again(tree_copy, tmp_path):
    dst = tmp_path / "dst"
    run_shard(str(tree_copy), str(dst), SMALL, workers=2, show_progress=False)
    # as a run killed while planning leaves it: shards packed, no complete plan, no manifests
    (dst / "_plan/plan.json").unlink()
    shutil.rmtree(dst / "manifests")
    first = sorted((tree_copy / "sysu_train_set_all/0000000001").iterdir())[0]
    first.write_bytes(f.rgb_jpeg(40, 80, seed=5))          # the source changed meanwhile (another size)
    inodes = {p.name: p.stat().st_ino for p in (dst / "shards").glob("*.tar")}
    run_shard(str(tree_copy), str(dst), SMALL, workers=2, show_progress=False)
    repacked = {name for name, ino in inodes.items() if (dst / "shards" / name).stat().st_ino != ino}
    assert repacked == {"train-000000.tar"}
    fresh = tmp_path / "fresh"
    run_shard(str(tree_copy), str(fresh), SMALL, show_progress=False)
    assert tree_digest(dst) == tree_digest(fresh)


def test_a_plan_of_an_older_version_is_refused(packed, tmp_path):
    from sysu30k.errors import UserError

    src, dst, _ = packed
    old = tmp_path / "old"
    shutil.copytree(dst, old)
    shutil.rmtree(old / "manifests")
    plan = json.loads((old / "_plan/plan.json").read_text())
    (old / "_plan/plan.json").write_text(json.dumps({**plan, "version": 1}))
    with pytest.raises(UserError, match="--overwrite"):
        run_shard(str(src), str(old), SMALL, show_progress=False)


def test_overwrite_starts_over(packed, tmp_path):
    src, dst, _ = packed
    out = tmp_path / "out"
    run_shard(str(src), str(out), SMALL, show_progress=False)
    (out / "shards/train-000000.tar").write_bytes(b"garbage")
    run_shard(str(src), str(out), ShardJob(ShardingOptions(shard_count=10)), overwrite=True, show_progress=False)
    assert tree_digest(out) == tree_digest(dst)


@pytest.mark.parametrize("args, message", [
    (["shard", "/nonexistent/src", "{tmp}/d"], "not a folder"),
    (["shard", "{tmp}", "{tmp}/d"], "none of"),
    (["shard", "{src}", "{tmp}/d", "--shard-size", "12 parsecs"], "not a size"),
    (["shard", "{src}", "{tmp}/d", "--subsets", "train,holiday"], "--subsets"),
    (["shard", "{src}", "{tmp}/d", "--quality", "0"], "--quality"),
])
def test_user_errors_are_one_line_exit_2(tiny_tree, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, src=tiny_tree) for a in args]
    result = subprocess.run([sys.executable, "-m", "sysu30k"] + args, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([ln for ln in lines if ln.strip()]) <= 3          # click usage errors add a usage line


def test_src_is_read_safely_whatever_sits_in_it(tree_copy, tmp_path):
    """FIFOs, devices, links out of SRC or to nothing, linked folders, undecodable names and oversized files
    are rejects with a reason; the run neither hangs nor reads past SRC; nothing outside SRC is named in any
    manifest; a link to an image inside SRC is packed as that image."""
    from sysu30k.ingest.config import MAX_SOURCE_BYTES

    train = tree_copy / "sysu_train_set_all"
    folders = sorted(p for p in train.iterdir() if p.is_dir())
    first, second = folders[0], folders[1]
    outside = tmp_path / "outside"
    (outside / "0000009999").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(f.rgb_jpeg(seed=9))
    (outside / "0000009999" / "stolen.jpg").write_bytes(f.rgb_jpeg(seed=8))
    inside = sorted(first.glob("*.jpg"))[0]
    os.mkfifo(first / "fifo.jpg")
    os.symlink("/dev/zero", first / "zero.jpg")
    os.symlink(outside / "secret.jpg", first / "secret.jpg")
    os.symlink(tmp_path / "nothing.jpg", first / "dangling.jpg")
    os.symlink(inside, second / "alias.jpg")
    os.symlink(outside / "0000009999", train / "0000009999")
    os.symlink(second, first / "linked-folder")                     # inside SRC, but a folder: could loop
    with open(os.path.join(os.fsencode(first), b"caf\xe9.jpg"), "wb") as out:
        out.write(f.rgb_jpeg())
    with open(first / "huge.jpg", "wb") as out:                     # sparse: costs no disk
        out.truncate(MAX_SOURCE_BYTES + 1)
    dst = tmp_path / "dst"
    r = subprocess.run([sys.executable, "-m", "sysu30k", "-q", "shard", str(tree_copy), str(dst),
                        "--shard-count", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rejects = {row["path"]: row["reason"] for row in pq.read_table(dst / "manifests/rejects.parquet").to_pylist()}
    base = f"sysu_train_set_all/{first.name}"
    assert {rejects.get(f"{base}/{name}") for name in ("fifo.jpg", "zero.jpg", "secret.jpg", "dangling.jpg",
                                                     "linked-folder", "huge.jpg", "caf\\xe9.jpg")} == {
        "not-a-file", "symlink-outside", "dangling-symlink", "symlinked-folder", "too-large", "bad-name"}
    assert rejects[f"{base}/zero.jpg"] == rejects[f"{base}/secret.jpg"] == "symlink-outside"
    assert rejects["sysu_train_set_all/0000009999"] == "symlink-outside"
    images = {row["path"]: row for row in images_of(dst)}
    alias = images[f"sysu_train_set_all/{second.name}/alias.jpg"]
    assert alias["sha256"] == hashlib.sha256(inside.read_bytes()).hexdigest()
    named = json.dumps([*images, *rejects, json.loads((dst / "manifests/summary.json").read_text())])
    assert "stolen" not in named and str(outside) not in named


def test_a_fifo_for_a_meta_list_or_the_bag_file_is_one_line_not_a_hang(tree_copy, tmp_path):
    for rel in ("meta/train.txt", "bag_level_label.json"):
        src = tmp_path / rel.replace("/", "-")
        shutil.copytree(tree_copy, src)
        (src / rel).unlink(missing_ok=True)
        os.mkfifo(src / rel)
        r = subprocess.run([sys.executable, "-m", "sysu30k", "-q", "shard", str(src), str(tmp_path / f"d-{src.name}")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "regular file" in r.stderr, r.stderr


def test_a_folder_that_cannot_be_listed_is_a_reject_and_the_run_goes_on(tree_copy, tmp_path, monkeypatch):
    """Permission bits do not stop root (the tests' usual user), so the refusal is the filesystem's own
    error, raised for one training folder by os.scandir as a permission problem would."""
    import sysu30k.io.storage as storage

    train = tree_copy / "sysu_train_set_all"
    blocked = sorted(p for p in train.iterdir() if p.is_dir())[2]
    real = os.scandir

    def scandir(path):
        if os.path.realpath(path) == str(blocked.resolve()):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(storage.os, "scandir", scandir)
    summary = run_shard(str(tree_copy), str(tmp_path / "dst"), SMALL, show_progress=False)
    rejects = pq.read_table(tmp_path / "dst/manifests/rejects.parquet").to_pylist()
    listed = sorted(f"sysu_train_set_all/{blocked.name}/{p.name}" for p in blocked.iterdir())   # meta lists them all
    assert sorted(r["path"] for r in rejects) == listed and {r["reason"] for r in rejects} == {"unreadable"}
    assert summary["rejects_by_reason"] == {"unreadable": len(listed)}
    assert not any(r["path"].startswith(f"sysu_train_set_all/{blocked.name}/") for r in images_of(tmp_path / "dst"))
