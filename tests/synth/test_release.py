"""``synth --release``: the synthetic tree packaged as the download (tar parts that interleave and split folders in
an unsorted order, a test tar, lists at the root), byte-deterministic, every image once, no extracted tree left."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest
from click.testing import CliRunner
from conftest import cli as subprocess_cli

from sysu30k.cli import cli
from sysu30k.errors import UserError
from sysu30k.release.constants import BAG_LABEL_JSON, META_DIR, SUBSETS, TEST_DIR, TRAIN_DIR
from sysu30k.synth import package_release, write_synth
from sysu30k.synth.config import SynthConfig

CFG = SynthConfig(folders=12, images_per_folder=4, test_ids=5, distractors=10, seed=2)
ARGS = ["--folders", "12", "--images-per-folder", "4", "--test-ids", "5", "--distractors", "10", "--seed", "2"]
LISTS = {f"{s}.txt" for s in SUBSETS}
ROOT = {"train", "test", *LISTS, BAG_LABEL_JSON, "truth.csv", "synth.json"}


def files_under(root: str) -> list[str]:
    """Every regular file under ``root``, as sorted '/'-separated paths relative to it."""
    return sorted(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for n in names)


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def archives(release: str) -> list[str]:
    """The tar files of a release, training parts first (by part number), then the test archive."""
    parts = sorted(os.listdir(os.path.join(release, "train")), key=lambda n: int(n.split("part")[1][:-4]))
    return [os.path.join(release, "train", p) for p in parts] + [os.path.join(release, "test", f"{TEST_DIR}.tar")]


def members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def contents(release: str) -> list[tuple[str, str, bytes]]:
    """(archive, member name, bytes) of every file member of every archive of ``release``."""
    out = []
    for path in archives(release):
        with tarfile.open(path) as tar:
            out += [(path, m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    return out


def part_folders(path: str) -> dict[str, list[str]]:
    """Training folder -> its file names, in member order, of one part."""
    out: dict[str, list[str]] = {}
    for m in members(path):
        if m.isfile():
            _, folder, name = m.name.split("/")
            out.setdefault(folder, []).append(name)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CFG tree, written once."""
    root = str(tmp_path_factory.mktemp("release") / "tree")
    write_synth(root, CFG)
    return root


@pytest.fixture(scope="module")
def release(tree: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CFG tree packaged in 3 parts."""
    out = str(tmp_path_factory.mktemp("release") / "rel")
    package_release(tree, out, parts=3)
    return out


def test_layout_and_lists_at_the_root(tree, release):
    assert set(os.listdir(release)) == ROOT
    assert os.listdir(os.path.join(release, "test")) == [f"{TEST_DIR}.tar"]
    assert sorted(os.listdir(os.path.join(release, "train"))) == [f"{TRAIN_DIR}_part{p}.tar" for p in (1, 2, 3)]
    for name in LISTS:
        assert sha(os.path.join(release, name)) == sha(os.path.join(tree, META_DIR, name))
    for name in (BAG_LABEL_JSON, "truth.csv", "synth.json"):
        assert sha(os.path.join(release, name)) == sha(os.path.join(tree, name))


def test_same_tree_gives_byte_identical_archives(tree, release, tmp_path):
    again = package_release(tree, str(tmp_path / "again"), parts=3)
    assert {p: sha(os.path.join(release, p)) for p in files_under(release)} == \
        {p: sha(os.path.join(again.root, p)) for p in files_under(again.root)}
    assert again.images == len([p for p in files_under(tree) if p.endswith(".jpg")])
    read = [*again.archives, *LISTS, BAG_LABEL_JSON]
    assert again.bytes == sum(os.path.getsize(os.path.join(again.root, p)) for p in read)


def test_every_image_is_in_exactly_one_archive_with_its_bytes(tree, release):
    found = contents(release)
    names = [name for _, name, _ in found]
    assert len(names) == len(set(names))
    images = [p for p in files_under(tree) if p.startswith((f"{TRAIN_DIR}/", f"{TEST_DIR}/"))]
    assert sorted(names) == images
    for path, name, data in found:
        with open(os.path.join(tree, name), "rb") as f:
            assert data == f.read(), name
        assert ("/train/" in path) == name.startswith(f"{TRAIN_DIR}/")


def test_members_have_fixed_metadata_and_gnu_headers(release):
    mtimes = set()
    for path in archives(release):
        with open(path, "rb") as f:
            assert f.read(512)[257:265] == b"ustar  \0"           # GNU magic, not POSIX ustar/pax
        with tarfile.open(path) as tar:
            assert tar.pax_headers == {}
            for m in tar.getmembers():
                assert (m.uid, m.gid, m.uname, m.gname, m.pax_headers) == (0, 0, "", "", {}), m.name
                assert m.mode == (0o755 if m.isdir() else 0o644) and (m.isdir() or m.isfile()), m.name
                mtimes.add(m.mtime)
    assert len(mtimes) == 1


def test_parts_interleave_and_split_folders(tree, release):
    parts = [part_folders(p) for p in archives(release)[:-1]]
    for folders in parts:
        ids = sorted(int(f) for f in folders)
        assert len(ids) >= 2 and ids != list(range(ids[0], ids[0] + len(ids)))   # not a contiguous range
    split = [f for f in os.listdir(os.path.join(tree, TRAIN_DIR)) if sum(f in p for p in parts) == 2]
    assert split and not [f for f in os.listdir(os.path.join(tree, TRAIN_DIR)) if sum(f in p for p in parts) > 2]
    for folder in split:
        halves = [p[folder] for p in parts if folder in p]
        assert not set(halves[0]) & set(halves[1])
        assert sorted(halves[0] + halves[1]) == sorted(os.listdir(os.path.join(tree, TRAIN_DIR, folder)))


def test_member_order_is_not_sorted_and_directories_come_first(release):
    orders = []
    for path in archives(release)[:-1]:
        ms = members(path)
        assert ms[0].isdir() and ms[0].name == TRAIN_DIR
        seen_dirs = set()
        for m in ms:
            if m.isdir():
                seen_dirs.add(m.name)
            else:
                assert m.name.rsplit("/", 1)[0] in seen_dirs, m.name
        orders.append([m.name for m in ms if m.isfile()])
    assert any(order != sorted(order) for order in orders)
    test = [m.name for m in members(archives(release)[-1])]
    assert test[0] == TEST_DIR and f"{TEST_DIR}/query" in test and f"{TEST_DIR}/gallery" in test


@pytest.mark.parametrize("prefix", ["", "./", "SYSU-30k-released/"])
def test_prefix_variants(tree, tmp_path, prefix):
    out = package_release(tree, str(tmp_path / "rel"), parts=2, prefix=prefix)
    names = []
    for path in archives(out.root):
        for m in members(path):
            name = m.name + "/" if m.isdir() else m.name
            assert name.startswith(prefix), name
            names.append(name[len(prefix):])
    images = [p for p in files_under(tree) if p.startswith((f"{TRAIN_DIR}/", f"{TEST_DIR}/"))]
    assert sorted(n for n in names if n.endswith(".jpg")) == images
    assert ("" in names) == bool(prefix)                       # the prefix folder itself is a member


@pytest.mark.parametrize("prefix", ["../", "a/b/", "/abs/", "top", ".hidden/", "/"])
def test_bad_prefix_is_a_one_line_error(tree, tmp_path, prefix):
    with pytest.raises(UserError) as err:
        package_release(tree, str(tmp_path / "rel"), prefix=prefix)
    assert "\n" not in str(err.value) and repr(prefix) in str(err.value)
    assert not (tmp_path / "rel").exists()


def test_refuses_a_release_over_a_release_and_a_non_tree(tree, release, tmp_path):
    with pytest.raises(UserError, match="already holds"):
        package_release(tree, release)
    with pytest.raises(UserError, match="not a synthetic tree"):
        package_release(release, str(tmp_path / "x"))
    with pytest.raises(UserError, match="--parts"):
        package_release(tree, str(tmp_path / "y"), parts=CFG.folders + 1)


def test_config_refuses_parts_without_release_and_more_parts_than_folders():
    with pytest.raises(UserError, match="--parts needs --release"):
        SynthConfig(parts=2)
    with pytest.raises(UserError, match="--folders"):
        SynthConfig(folders=2, release=True)
    with pytest.raises(UserError):
        SynthConfig(release=True, parts=0)
    assert (SynthConfig(release=True).release_parts, SynthConfig(release=True, parts=5).release_parts) == (3, 5)


def test_cli_refuses_parts_without_release(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["synth", str(out), "--parts", "2", *ARGS])
    assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output
    assert "\n" not in str(r.exception) and "--release" in str(r.exception)
    p = subprocess_cli("synth", out, "--parts", "2", quiet=False, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--release" in p.stderr, p.stderr
    assert not out.exists()


def test_cli_help_lists_the_options():
    r = CliRunner().invoke(cli, ["synth", "--help"])
    assert r.exit_code == 0 and "--release" in r.output and "--parts" in r.output


def test_cli_release_end_to_end(tree, tmp_path):
    out = tmp_path / "download"
    r = CliRunner().invoke(cli, ["synth", str(out), "--release", "--parts", "2", "--workers", "2", *ARGS])
    assert r.exit_code == 0, r.output
    assert set(os.listdir(out)) == ROOT                         # no .tree-* left, no extracted folders
    assert sorted(os.listdir(out / "train")) == [f"{TRAIN_DIR}_part{p}.tar" for p in (1, 2)]
    assert not [p for p in files_under(str(out)) if ".tmp" in p or p.endswith(".jpg")]
    found = contents(str(out))
    assert sorted(name for _, name, _ in found) == [p for p in files_under(tree) if p.endswith(".jpg")]
    assert all(sha(os.path.join(tree, name)) == hashlib.sha256(data).hexdigest() for _, name, data in found)
    for name in (*LISTS, "truth.csv"):
        assert sha(str(out / name)) == sha(os.path.join(tree, META_DIR if name in LISTS else "", name))

    with open(out / "synth.json") as f:
        meta = json.load(f)
    with open(os.path.join(tree, "synth.json")) as f:
        plain = json.load(f)
    assert meta["config"] == {**plain["config"], "release": True, "parts": 2}
    assert {k: v for k, v in meta["counts"].items() if k != "bytes"} == \
        {k: v for k, v in plain["counts"].items() if k != "bytes"}
    read = [*(f"train/{n}" for n in os.listdir(out / "train")), f"test/{TEST_DIR}.tar", *LISTS, BAG_LABEL_JSON]
    assert meta["counts"]["bytes"] == sum(os.path.getsize(out / p) for p in read)


def test_release_without_bag_json_or_test_set(tmp_path):
    out = tmp_path / "nobags"
    cfg = SynthConfig(folders=3, images_per_folder=2, test_ids=0, distractors=0, bag_json=False, release=True)
    summary = write_synth(str(out), cfg)
    assert set(os.listdir(out)) == ROOT - {BAG_LABEL_JSON}
    assert [m.name for m in members(str(out / "test" / f"{TEST_DIR}.tar"))] == [TEST_DIR]
    assert sum(m.isfile() for a in archives(str(out)) for m in members(a)) == summary.train_images
