"""The synthetic SYSU-30k writer: layout, meta lists, bags, determinism, ground truth, images and identity signal."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from sysu30k.errors import UserError
from sysu30k.release.bags import consecutive_bags, parse_bag_json
from sysu30k.release.constants import (
    BAG_LABEL_JSON,
    DISTRACTOR_FOLDER,
    GALLERY_DIR,
    META_DIR,
    QUERY_DIR,
    TEST_DIR,
    TRAIN_DIR,
)
from sysu30k.synth import SynthSummary, render_person, write_synth
from sysu30k.synth.config import SynthConfig

SMALL = SynthConfig(folders=6, images_per_folder=5, test_ids=4, distractors=5, seed=3)
TOP_LEVEL = {TRAIN_DIR, TEST_DIR, META_DIR, BAG_LABEL_JSON, "truth.csv", "synth.json"}


def files_under(root: str) -> list[str]:
    """Every regular file under ``root``, as sorted '/'-separated paths relative to it."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def digests(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    out = {}
    for rel in files_under(root):
        with open(os.path.join(root, rel), "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def read_truth(root: str) -> list[dict[str, str]]:
    """Rows of truth.csv."""
    with open(os.path.join(root, "truth.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, SynthSummary]:
    """The SMALL tree written once with one worker, and its summary."""
    root = str(tmp_path_factory.mktemp("synth") / "small")
    return root, write_synth(root, SMALL)


def test_layout_names_and_counts(small):
    root, summary = small
    assert set(os.listdir(root)) == TOP_LEVEL
    train_root = os.path.join(root, TRAIN_DIR)
    assert sorted(os.listdir(train_root)) == [f"{k:010d}" for k in range(1, 7)]
    train = files_under(train_root)
    for rel in train:
        folder, name = rel.split("/")
        assert re.fullmatch(rf"{folder}_\d{{6}}\.jpg", name), rel
    for folder in os.listdir(train_root):  # sizes uniform in 5*(1±0.5) = 2..8 (rounded), never empty
        assert 2 <= len(os.listdir(os.path.join(train_root, folder))) <= 8

    test_ids = [f"{k:09d}" for k in range(7, 11)]
    query = files_under(os.path.join(root, TEST_DIR, QUERY_DIR))
    gallery = files_under(os.path.join(root, TEST_DIR, GALLERY_DIR))
    assert query == [f"{t}/{t}_c2_2.jpg" for t in test_ids]
    assert gallery == sorted([f"{t}/{t}_c1_1.jpg" for t in test_ids]
                             + [f"{DISTRACTOR_FOLDER}/{DISTRACTOR_FOLDER}_c1_{k}.jpg" for k in range(1, 6)])
    assert set(os.listdir(os.path.join(root, TEST_DIR))) == {QUERY_DIR, GALLERY_DIR}
    assert not [p for p in files_under(root) if ".tmp" in p]

    assert (summary.train_images, summary.query_images, summary.gallery_images) == (len(train), 4, 9)
    assert (summary.distractors, summary.folders, summary.root) == (5, 6, os.path.abspath(root))
    pipeline_files = [p for p in files_under(root) if p not in ("truth.csv", "synth.json")]
    assert summary.bytes == sum(os.path.getsize(os.path.join(root, p)) for p in pipeline_files)
    with open(os.path.join(root, "synth.json")) as f:
        meta = json.load(f)
    assert meta["config"] == asdict(SMALL)
    assert meta["counts"]["train_images"] == len(train) and meta["counts"]["bytes"] == summary.bytes


def test_meta_lists_match_disk(small):
    root, _ = small
    subset_roots = {"train": os.path.join(root, TRAIN_DIR), "query": os.path.join(root, TEST_DIR, QUERY_DIR),
                    "gallery": os.path.join(root, TEST_DIR, GALLERY_DIR)}
    for subset, subset_root in subset_roots.items():
        with open(os.path.join(root, META_DIR, f"{subset}.txt")) as f:
            text = f.read()
        assert text.endswith("\n")
        lines = text.splitlines()
        assert lines == sorted(lines) == files_under(subset_root)


def test_bag_json_follows_consecutive_rule(small, tmp_path):
    root, _ = small
    with open(os.path.join(root, BAG_LABEL_JSON)) as f:
        bags = parse_bag_json(f.read())
    assert bags == consecutive_bags(sorted(os.listdir(os.path.join(root, TRAIN_DIR))))
    assert len(bags) == 3 * SMALL.folders
    out = tmp_path / "nobags"
    write_synth(str(out), SynthConfig(folders=2, images_per_folder=1, test_ids=0, distractors=0, bag_json=False))
    assert BAG_LABEL_JSON not in os.listdir(out)


def test_same_config_is_byte_identical_across_workers(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    write_synth(str(again), SMALL, workers=2, progress=True)
    assert digests(root) == digests(str(again))


def test_different_seed_changes_every_image(small, tmp_path):
    root, _ = small
    other = tmp_path / "other"
    cfg = SynthConfig(**{**asdict(SMALL), "seed": SMALL.seed + 1, "folder_size_jitter": 0.0})
    write_synth(str(other), cfg)
    base, changed = digests(root), digests(str(other))
    shared = [p for p in changed if p.endswith(".jpg") and p in base]
    assert len(shared) >= 4 + 5 + 4 + SMALL.folders  # test set, distractors and at least one image per folder
    assert all(base[p] != changed[p] for p in shared)


def test_truth_has_one_row_per_training_image(small):
    root, _ = small
    with open(os.path.join(root, "truth.csv")) as f:
        assert f.readline() == "path,true_id,folder_id\n"
    rows = read_truth(root)
    with open(os.path.join(root, META_DIR, "train.txt")) as f:
        assert [r["path"] for r in rows] == [f"{TRAIN_DIR}/{line}" for line in f.read().splitlines()]
    for r in rows:
        assert r["path"].split("/")[1] == f"{int(r['folder_id']):010d}"
        assert 1 <= int(r["true_id"]) <= SMALL.folders


def test_truth_impurity_rate_and_neighbourhood(tmp_path):
    pure = tmp_path / "pure"
    write_synth(str(pure), SynthConfig(folders=5, images_per_folder=6, test_ids=0, distractors=0, impurity=0.0))
    rows = read_truth(str(pure))
    assert rows and all(r["true_id"] == r["folder_id"] for r in rows)

    mixed = tmp_path / "mixed"
    cfg = SynthConfig(folders=30, images_per_folder=8, folder_size_jitter=0.0, test_ids=0, distractors=0,
                      impurity=0.5)
    write_synth(str(mixed), cfg, workers=2)
    rows = read_truth(str(mixed))
    assert len(rows) == 240
    true_ids, folder_ids = (np.array([int(r[c]) for r in rows]) for c in ("true_id", "folder_id"))
    assert np.all(np.abs(true_ids - folder_ids) <= 2)
    assert true_ids.min() >= 1 and true_ids.max() <= cfg.folders
    assert 0.35 <= np.mean(true_ids != folder_ids) <= 0.65  # 240 draws: sd ~0.03 around 0.5


@pytest.mark.parametrize("height", [144, 288])
def test_image_size_and_mode(tmp_path, height):
    out = tmp_path / "img"
    write_synth(str(out), SynthConfig(folders=2, images_per_folder=2, test_ids=1, distractors=1, height=height))
    images = [p for p in files_under(str(out)) if p.endswith(".jpg")]
    assert len(images) >= 2 + 2 + 1
    for rel in images:
        with Image.open(out / rel) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (height // 2, height))


def test_rejects_bad_height_and_config():
    with pytest.raises(UserError):
        SynthConfig(height=200)
    with pytest.raises(UserError):
        SynthConfig(impurity=1.5)
    with pytest.raises(UserError):
        SynthConfig(folders=0)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError):
        write_synth(str(tmp_path), SynthConfig(folders=1, images_per_folder=1, test_ids=0, distractors=0))
    assert os.listdir(tmp_path) == ["keep.txt"]
    with pytest.raises(UserError):
        write_synth(str(tmp_path / "keep.txt"), SynthConfig(folders=1, images_per_folder=1, test_ids=0,
                                                            distractors=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_synth(str(empty), SynthConfig(folders=1, images_per_folder=1, test_ids=0, distractors=0))
    assert TRAIN_DIR in os.listdir(empty)


def person_colours(img: Image.Image) -> np.ndarray:
    """Mean RGB of the upper and lower body area (central half of the width), a crude colour descriptor."""
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape[:2]
    centre = a[:, w // 4: 3 * w // 4]
    return np.concatenate([centre[int(0.15 * h): int(0.5 * h)].reshape(-1, 3).mean(0),
                           centre[int(0.5 * h): int(0.95 * h)].reshape(-1, 3).mean(0)])


def test_identity_is_visible_in_pixels(tmp_path):
    out = tmp_path / "ids"
    cfg = SynthConfig(folders=12, images_per_folder=6, folder_size_jitter=0.0, test_ids=0, distractors=0,
                      impurity=0.0)
    write_synth(str(out), cfg)
    by_folder: dict[str, list[np.ndarray]] = {}
    for rel in files_under(str(out / TRAIN_DIR)):
        with Image.open(out / TRAIN_DIR / rel) as img:
            by_folder.setdefault(rel.split("/")[0], []).append(person_colours(img))
    same = [np.linalg.norm(a - b) for v in by_folder.values() for a, b in itertools.combinations(v, 2)]
    folders = list(by_folder.values())
    different = [np.linalg.norm(a - b) for f, g in itertools.combinations(folders, 2) for a in f for b in g]
    assert np.mean(same) < 0.7 * np.mean(different)


def test_style_and_camera_change_the_look():
    def mean_colour(style: int, camera: int) -> np.ndarray:
        imgs = [render_person(i, np.random.default_rng([7, i]), 144, camera, style) for i in range(1, 31)]
        return np.mean([np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0) for img in imgs], axis=0)

    base = mean_colour(0, 1)
    assert np.allclose(base, mean_colour(0, 1))
    assert np.linalg.norm(mean_colour(1, 1) - base) > 15.0
    assert np.linalg.norm(mean_colour(0, 2) - base) > 2.0
