"""Write a deterministic SYSU-30k-shaped synthetic dataset (SYSU30K.md §1.3-1.4) with its ground truth beside it.

Every image has its own RNG, ``default_rng([seed, kind, a, b])``, so the tree is byte-identical whatever the
number of workers and the order in which chunks finish. Training folder k holds identity k, except that with
probability ``impurity`` an image shows a neighbour (k±1, k±2), like the impure folders of the real data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import UserError
from ..io.progress import progress as progress_counter
from ..release.bags import bags_to_json, consecutive_bags, train_folder_name
from ..release.constants import (
    BAG_LABEL_JSON,
    DISTRACTOR_FOLDER,
    GALLERY_CAMID,
    GALLERY_DIR,
    IMAGE_EXT,
    META_DIR,
    QUERY_CAMID,
    QUERY_DIR,
    TEST_DIR,
    TEST_ID_DIGITS,
    TRAIN_DIR,
)
from .config import SynthConfig
from .render import render_person

TRUTH_CSV = "truth.csv"
SYNTH_JSON = "synth.json"

# RNG stream kinds: the second element of every default_rng([seed, kind, ...]) key.
_SIZE, _TRAIN, _QUERY, _GALLERY, _DISTRACTOR = range(5)
_NEIGHBOUR_OFFSETS = (-2, -1, 1, 2)
_TEST_CHUNK = 64         # test ids per task (each gives a query and a gallery image)
_DISTRACTOR_CHUNK = 128  # distractors per task


@dataclass(frozen=True)
class SynthSummary:
    """What was written: images per subset (gallery_images includes the distractors), the bytes the pipeline
    reads (images or, for a release, archives; meta lists, bag json; not truth.csv or synth.json) and the wall
    time."""

    root: str
    train_images: int
    query_images: int
    gallery_images: int
    distractors: int
    folders: int
    bytes: int
    seconds: float


class _Task(NamedTuple):
    """One unit of work: ``count`` images of training folder ``first`` (kind _TRAIN), or ``count`` test ids
    (kind _QUERY: a query and a gallery image each) or distractors (kind _DISTRACTOR) from ``first`` on."""

    kind: int
    first: int
    count: int


@dataclass
class _Written:
    """What a task wrote: meta lines per subset, truth rows and the bytes of its images."""

    train: list[str] = field(default_factory=list)
    query: list[str] = field(default_factory=list)
    gallery: list[str] = field(default_factory=list)
    truth: list[tuple[str, int, int]] = field(default_factory=list)
    nbytes: int = 0


def folder_size(cfg: SynthConfig, folder_id: int) -> int:
    """Images in training folder ``folder_id``: uniform in mean*(1±jitter), at least 1 (own RNG stream)."""
    rng = np.random.default_rng([cfg.seed, _SIZE, folder_id])
    lo = round(cfg.images_per_folder * (1.0 - cfg.folder_size_jitter))
    hi = round(cfg.images_per_folder * (1.0 + cfg.folder_size_jitter))
    return max(1, int(rng.integers(lo, hi, endpoint=True)))


def true_identity(cfg: SynthConfig, folder_id: int, rng: np.random.Generator) -> int:
    """The identity one image of folder ``folder_id`` shows: with probability impurity a neighbour within ±2."""
    if rng.random() >= cfg.impurity:
        return folder_id
    # Only neighbours inside 1..folders, so edge folders keep the configured impurity rate.
    neighbours = [folder_id + d for d in _NEIGHBOUR_OFFSETS if 1 <= folder_id + d <= cfg.folders]
    return neighbours[rng.integers(len(neighbours))] if neighbours else folder_id


def train_image_name(folder_id: int, index: int) -> str:
    """File name of image ``index`` (1-based) in a training folder; the real names are undocumented."""
    return f"{train_folder_name(folder_id)}_{index:06d}.{IMAGE_EXT}"


def test_image_name(test_id: int, camera: int) -> str:
    """The released test name ``<id>_c<cam>_<k>.jpg``; released files repeat the camera as k (…_c2_2, …_c1_1)."""
    return f"{test_id:0{TEST_ID_DIGITS}d}_c{camera}_{camera}.{IMAGE_EXT}"


def distractor_name(k: int) -> str:
    """File name of gallery distractor ``k`` (1-based): ``0000others_c1_K.jpg``."""
    return f"{DISTRACTOR_FOLDER}_c{GALLERY_CAMID}_{k}.{IMAGE_EXT}"


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, so no reader sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _save_jpeg(path: str, img: Image.Image, quality: int) -> int:
    """Encode ``img`` with fixed options (no EXIF, no timestamps) and write it atomically; returns its size."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    data = buf.getvalue()
    _atomic_write(path, data)
    return len(data)


def _run_task(out: str, cfg: SynthConfig, task: _Task) -> _Written:
    """Render and write the images of one task; runs in a worker process when workers > 1."""
    done = _Written()
    if task.kind == _TRAIN:
        folder = train_folder_name(task.first)
        directory = os.path.join(out, TRAIN_DIR, folder)
        os.makedirs(directory, exist_ok=True)
        for index in range(1, task.count + 1):
            rng = np.random.default_rng([cfg.seed, _TRAIN, task.first, index])
            identity = true_identity(cfg, task.first, rng)
            camera = (QUERY_CAMID, GALLERY_CAMID)[rng.integers(2)]
            name = train_image_name(task.first, index)
            img = render_person(identity + cfg.id_offset, rng, cfg.height, camera, cfg.style)
            done.nbytes += _save_jpeg(os.path.join(directory, name), img, cfg.quality)
            done.train.append(f"{folder}/{name}")
            done.truth.append((f"{TRAIN_DIR}/{folder}/{name}", identity, task.first))
    elif task.kind == _DISTRACTOR:
        directory = os.path.join(out, TEST_DIR, GALLERY_DIR, DISTRACTOR_FOLDER)
        os.makedirs(directory, exist_ok=True)
        for k in range(task.first, task.first + task.count):
            rng = np.random.default_rng([cfg.seed, _DISTRACTOR, k])
            identity = cfg.folders + cfg.test_ids + k  # never used by training or test identities
            img = render_person(identity + cfg.id_offset, rng, cfg.height, GALLERY_CAMID, cfg.style)
            done.nbytes += _save_jpeg(os.path.join(directory, distractor_name(k)), img, cfg.quality)
            done.gallery.append(f"{DISTRACTOR_FOLDER}/{distractor_name(k)}")
    else:
        for test_id in range(task.first, task.first + task.count):
            folder = f"{test_id:0{TEST_ID_DIGITS}d}"
            for kind, subset, camera, lines in ((_QUERY, QUERY_DIR, QUERY_CAMID, done.query),
                                                (_GALLERY, GALLERY_DIR, GALLERY_CAMID, done.gallery)):
                directory = os.path.join(out, TEST_DIR, subset, folder)
                os.makedirs(directory, exist_ok=True)
                rng = np.random.default_rng([cfg.seed, kind, test_id])
                img = render_person(test_id + cfg.id_offset, rng, cfg.height, camera, cfg.style)
                name = test_image_name(test_id, camera)
                done.nbytes += _save_jpeg(os.path.join(directory, name), img, cfg.quality)
                lines.append(f"{folder}/{name}")
    return done


def _images(task: _Task) -> int:
    """Number of images a task writes (for the progress bar)."""
    return 2 * task.count if task.kind == _QUERY else task.count


def _tasks(cfg: SynthConfig) -> list[_Task]:
    """All work in a fixed order: one task per training folder, then test-id chunks, then distractor chunks."""
    tasks = [_Task(_TRAIN, k, folder_size(cfg, k)) for k in range(1, cfg.folders + 1)]
    for first in range(0, cfg.test_ids, _TEST_CHUNK):
        tasks.append(_Task(_QUERY, cfg.folders + 1 + first, min(_TEST_CHUNK, cfg.test_ids - first)))
    for first in range(0, cfg.distractors, _DISTRACTOR_CHUNK):
        tasks.append(_Task(_DISTRACTOR, 1 + first, min(_DISTRACTOR_CHUNK, cfg.distractors - first)))
    return tasks


def _prepare_out(out: str) -> None:
    """Create ``out``, refusing to write into an existing non-empty directory or over a file."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"output path {out} exists and is not a directory")
        if os.listdir(out):
            raise UserError(f"output directory {out} is not empty; choose a new or empty directory")
    os.makedirs(out, exist_ok=True)


def _write_text(path: str, text: str) -> int:
    """Write UTF-8 ``text`` atomically, creating the parent directory; returns its size in bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text.encode("utf-8")
    _atomic_write(path, data)
    return len(data)


def _lines(lines: list[str]) -> str:
    """A sorted, newline-terminated list file."""
    return "".join(f"{line}\n" for line in sorted(lines))


def _render(out: str, cfg: SynthConfig, workers: int, progress: bool) -> dict[str, int]:
    """Write the images, meta lists, bag json and truth.csv under ``out``; returns the counts of synth.json."""
    tasks = _tasks(cfg)
    results: list[_Written | None] = [None] * len(tasks)
    with progress_counter(sum(_images(t) for t in tasks), "synth", "img", progress) as bar:
        if workers == 1:
            for i, task in enumerate(tasks):
                results[i] = _run_task(out, cfg, task)
                bar.update(_images(task))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_run_task, out, cfg, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(_images(tasks[i]))

    done = _Written()
    for r in results:
        done.train += r.train
        done.query += r.query
        done.gallery += r.gallery
        done.truth += r.truth
        done.nbytes += r.nbytes
    for subset, lines in (("train", done.train), ("query", done.query), ("gallery", done.gallery)):
        done.nbytes += _write_text(os.path.join(out, META_DIR, f"{subset}.txt"), _lines(lines))
    if cfg.bag_json:
        folders = [train_folder_name(k) for k in range(1, cfg.folders + 1)]
        done.nbytes += _write_text(os.path.join(out, BAG_LABEL_JSON), bags_to_json(consecutive_bags(folders)))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "true_id", "folder_id"))
    writer.writerows(sorted(done.truth))
    _write_text(os.path.join(out, TRUTH_CSV), buf.getvalue())
    return {"train_images": len(done.train), "query_images": len(done.query), "gallery_images": len(done.gallery),
            "distractors": cfg.distractors, "folders": cfg.folders, "bytes": done.nbytes}


def _render_release(out: str, cfg: SynthConfig, workers: int, progress: bool) -> dict[str, int]:
    """Render the tree into a temporary folder inside ``out``, package it there as the download and remove the
    tree; returns the counts, with the bytes of the release."""
    from .release import package_release  # release.py imports this module's names

    tree = os.path.join(out, f".tree-{os.getpid()}")
    try:
        counts = _render(tree, cfg, workers, progress)
        counts["bytes"] = package_release(tree, out, parts=cfg.release_parts).bytes
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return counts


def write_synth(out: str, cfg: SynthConfig, workers: int = 1, progress: bool = False) -> SynthSummary:
    """Write the synthetic SYSU-30k tree, meta lists, bag json, truth.csv and synth.json under ``out``; with
    ``cfg.release``, the same data in the packaging of the download instead of the extracted tree."""
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")
    _prepare_out(out)
    counts = (_render_release if cfg.release else _render)(out, cfg, workers, progress)
    _write_text(os.path.join(out, SYNTH_JSON),
                json.dumps({"config": asdict(cfg), "counts": counts}, indent=2, sort_keys=True) + "\n")
    return SynthSummary(root=os.path.abspath(out), seconds=time.perf_counter() - start, **counts)
