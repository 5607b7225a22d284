"""The loader: bag-structured batches, exactly-once epochs across ranks and workers, resume, decoders
that agree, streaming from S3, and damaged members skipped and reported."""

import collections
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pack_synth

from sysu30k.loader import BagSpec, EvalLoader, LoaderOptions, TrainLoader, TransformSpec
from sysu30k.loader import loader as loader_module
from sysu30k.loader.catalog import ShardEntries, assign_streams
from sysu30k.loader.sampler import batches_for, plan_epoch
from sysu30k.loader.transforms import draw_params

SPEC = BagSpec(bags=6, per_bag=5)                  # small batches: several per epoch on the test data
SMALL = TransformSpec(height=64, width=32, pad=4)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return pack_synth(root / "raw", root / "dst", 24, workers=2, folders=24, images_per_folder=10, test_ids=6,
                      distractors=10, height=144, seed=5)


def train_keys(dst) -> dict[str, int]:
    table = pq.read_table(dst / "manifests/images.parquet", filters=[("subset", "=", "train")])
    return dict(zip(table["key"].to_pylist(), table["folder"].to_pylist()))


def epoch(loader) -> list:
    return [(b.keys, b.valid.clone(), b.bag.clone(), b.bag_labels.clone(), b.images.clone()) for b in loader]


def test_sampler_visits_each_image_once_with_predictable_batch_counts():
    rng = np.random.default_rng(1)
    folders = np.repeat(np.arange(1, 41), rng.integers(1, 30, 40)).astype(np.int32)
    catalog = [ShardEntries(f"s{i}", [f"k{i + j}" for j in range(len(f))], np.zeros(len(f)), np.zeros(len(f)),
                            [""] * len(f), f, np.zeros(len(f), np.int32), np.zeros(len(f), np.int8))
               for i in range(0, len(folders), 37) for f in [folders[i:i + 37]]]
    seen = collections.Counter()
    for order in assign_streams(catalog, 3):
        n = sum(len(catalog[i]) for i in order)
        plans = list(plan_epoch(catalog, order, SPEC, np.random.default_rng(0)))
        assert len(plans) == batches_for(n, SPEC)
        for p in plans[:-1]:                 # every batch full but the last; a bag that ran dry leaves its
            counts = np.bincount(p.bag)      # slots to another bag, never to folders outside its own
            assert p.valid.all() and len(counts) >= SPEC.bags and counts.max() <= SPEC.per_bag
            assert (counts[:SPEC.bags] == SPEC.per_bag).sum() >= SPEC.bags // 2
        for p in plans:
            for s, r, b, v in zip(p.shard, p.row, p.bag, p.valid):
                if v:
                    seen[(s, r)] += 1
                    assert catalog[s].folder[r] in p.labels[b]
    assert len(seen) == len(folders) and set(seen.values()) == {1}


def test_bag_batches_respect_bags_and_labels(packed):
    truth = train_keys(packed)
    loader = TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=False, decoder="pil", workers=0))
    batches = list(loader)
    assert len(batches) == len(loader) == batches_for(len(truth), SPEC)
    windows = collections.Counter()
    for b in batches:
        assert b.images.shape == (SPEC.batch_size, 3, 64, 32) and b.images.dtype == torch.uint8
        for key, valid, labels, folder in zip(b.keys, b.valid, b.bag_labels, b.folder):
            assert int(folder) == truth[key]
            if valid:
                assert int(folder) in labels.tolist()                 # the image's folder is in its bag's label
        for bag in range(SPEC.bags):
            labels = [x for x in b.bag_labels[b.bag == bag][:1].flatten().tolist() if x >= 0]
            if labels:
                windows[len(labels)] += 1
                assert max(labels) - min(labels) <= 4 + 2               # a window of <= 5 consecutive folders
    assert windows[1] and windows[3] and windows[5]                  # 1-, 3- and 5-folder bags are mixed


def test_two_ranks_two_workers_visit_each_image_exactly_once(packed):
    truth = train_keys(packed)
    seen, lengths = collections.Counter(), []
    for rank in range(2):
        options = LoaderOptions(normalize=False, decoder="pil", workers=2, rank=rank, world=2)
        loader = TrainLoader(str(packed), SPEC, SMALL, options)
        batches = list(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            seen.update(k for k, v in zip(b.keys, b.valid.tolist()) if v)
    assert lengths[0] == lengths[1]                                   # no DDP hang
    assert set(seen) == set(truth) and set(seen.values()) == {1}


def test_epochs_differ_and_mid_epoch_resume_continues_the_same_order(packed):
    opts = LoaderOptions(normalize=False, decoder="pil", workers=2, seed=7)
    full = TrainLoader(str(packed), SPEC, SMALL, opts)
    reference = epoch(full)
    assert len(reference) >= 4
    first = TrainLoader(str(packed), SPEC, SMALL, opts)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = TrainLoader(str(packed), SPEC, SMALL, opts)
    resumed.load_state_dict(state)
    tail = epoch(resumed)
    got = [b.keys for b in head] + [t[0] for t in tail]
    assert got == [r[0] for r in reference]
    assert torch.equal(tail[0][4], reference[3][4])                   # same augmentation too
    full.set_epoch(1)
    assert [b.keys for b in full] != [r[0] for r in reference]


@pytest.mark.parametrize("size, tolerance", [((144, 72), 0), ((256, 128), 1)], ids=["native", "default-256x128"])
def test_decoders_agree_on_the_same_keys(packed, size, tolerance):
    spec = TransformSpec(height=size[0], width=size[1], pad=4)
    pil = epoch(TrainLoader(str(packed), SPEC, spec, LoaderOptions(normalize=False, decoder="pil", workers=0,
                                                                   seed=2)))
    dali = epoch(TrainLoader(str(packed), SPEC, spec, LoaderOptions(normalize=False, decoder="dali", workers=0,
                                                                    seed=2)))
    assert [p[0] for p in pil] == [d[0] for d in dali]
    assert any(p[4].float().std() > 10 for p in pil)
    diff = max(float((p[4].int() - d[4].int()).abs().max()) for p, d in zip(pil, dali))
    assert diff <= tolerance                                          # same crops, flips, erasing; rounding only


def test_eval_batches_carry_a_flipped_copy(packed):
    ev_pil = next(iter(EvalLoader(str(packed), "gallery", 8, SMALL, LoaderOptions(workers=0))))
    assert ev_pil.images.shape == (8, 3, 64, 32) and torch.equal(ev_pil.flipped, ev_pil.images.flip(3))


def test_eval_loader_reads_every_test_image_in_order(packed):
    table = pq.read_table(packed / "manifests/images.parquet", filters=[("subset", "=", "gallery")])
    batches = list(EvalLoader(str(packed), "gallery", 7, SMALL, LoaderOptions(workers=2)))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(table["key"].to_pylist())
    pids = {k: int(p) for b in batches for k, p in zip(b.keys, b.pid)}
    assert pids == dict(zip(table["key"].to_pylist(), table["pid"].to_pylist()))


def test_held_out_folders_never_reach_training(packed):
    held = frozenset({3, 4, 5, 17})
    loader = TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=False, workers=0), exclude_folders=held)
    for b in loader:
        assert not set(b.folder.tolist()) & held
        assert not set(b.bag_labels.flatten().tolist()) & held


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_damaged_member_is_skipped_and_reported(packed, tmp_path, decoder):
    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    row = pq.read_table(dst / "manifests/images.parquet", filters=[("subset", "=", "train")]).slice(5, 1).to_pylist()[0]
    with open(dst / "shards" / f"{row['shard']}.tar", "r+b") as f:
        f.seek(row["offset"] + row["size"] // 2)
        f.write(b"\x00\x11\x22\x33")
    loader = TrainLoader(str(dst), SPEC, SMALL, LoaderOptions(normalize=False, decoder=decoder, workers=0))
    seen = collections.Counter()
    for b in loader:
        seen.update(k for k, v in zip(b.keys, b.valid.tolist()) if v)
    assert loader.damaged == [row["key"]]
    assert row["key"] not in seen and len(seen) == len(train_keys(packed)) - 1


def test_streams_from_s3_like_local_files(s3, packed, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("loader")
    fs.put(str(packed) + "/", "loader/dst/", recursive=True)
    local = epoch(TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=False, workers=2, seed=4)))
    for cache in (None, str(tmp_path / "cache")):
        remote = epoch(TrainLoader("s3://loader/dst", SPEC, SMALL,
                                   LoaderOptions(normalize=False, workers=2, seed=4, cache_dir=cache)))
        assert [r[0] for r in remote] == [x[0] for x in local]
        assert all(torch.equal(r[4], x[4]) for r, x in zip(remote, local))
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(list((packed / "shards").glob("train-*.tar")))


def test_peek_draws_a_batch_with_one_row_per_bag(packed, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sysu30k.cli import cli

    out = tmp_path / "batch.png"
    result = CliRunner().invoke(cli, ["peek", str(packed), "--out", str(out), "--bags", "6", "--per-bag", "5",
                                      "--height", "64", "--width", "32", "--decoder", "pil", "--batch", "1"])
    assert result.exit_code == 0, result.output
    sheet = Image.open(out)
    assert sheet.size == (150 + 5 * (48 + 2), 6 * (96 + 4))
    assert len(set(sheet.convert("L").get_flattened_data())) > 50                 # real pictures, not an empty canvas
    bad = CliRunner().invoke(cli, ["peek", str(packed), "--out", str(out), "--batch", "999"])
    assert bad.exit_code != 0 and "--batch must be below" in str(bad.exception or bad.output)


def test_resampling_keeps_exact_windows_and_the_epoch_length():
    rng = np.random.default_rng(3)
    folders = np.repeat(np.arange(1, 31), rng.integers(1, 12, 30)).astype(np.int32)
    catalog = [ShardEntries("s0", [f"k{j}" for j in range(len(folders))], np.zeros(len(folders)),
                            np.zeros(len(folders)), [""] * len(folders), folders,
                            np.zeros(len(folders), np.int32), np.zeros(len(folders), np.int8))]
    spec = BagSpec(bags=6, per_bag=6, resample=True)
    n = batches_for(len(folders), spec)
    plans = list(plan_epoch(catalog, [0], spec, np.random.default_rng(0), n_batches=n + 3))
    assert len(plans) == n + 3 and all(p.valid.all() for p in plans)
    sizes = collections.Counter()
    for p in plans:
        for bag, labels in enumerate(p.labels):
            rows = p.row[p.bag == bag]
            assert len(rows) == spec.per_bag and set(folders[rows].tolist()) <= set(labels)
            assert max(labels) - min(labels) <= 4                     # never widened beyond its window
            sizes[len(labels)] += 1
    assert sizes[1] and sizes[3] and sizes[5]
    counts = collections.Counter(int(r) for p in plans for r in p.row)
    assert max(counts.values()) > 1                                   # images repeat when resampling


def test_worker_normalisation_equals_device_normalisation(packed):
    as_uint8 = next(iter(TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=False, workers=0, seed=9))))
    as_float = next(iter(TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=True, workers=2, seed=9))))
    assert as_uint8.images.dtype == torch.uint8 and as_float.images.dtype == torch.float32
    assert as_uint8.keys == as_float.keys
    on_device = as_uint8.to("cpu", torch.float32).images
    assert torch.allclose(on_device, as_float.to("cpu", torch.float32).images, atol=1e-5)
    assert abs(float(on_device.mean())) < 1.5 and 0.3 < float(on_device.std()) < 2
    assert as_uint8.to("cpu", torch.bfloat16).images.dtype == torch.bfloat16


@pytest.mark.parametrize("normalize", [False, True], ids=["uint8", "float32"])
def test_batches_kept_without_copying_are_never_overwritten(packed, normalize):
    """Workers reuse shared batch buffers: a batch the consumer still holds must keep its pixels."""
    make = lambda: TrainLoader(str(packed), BagSpec(bags=2, per_bag=5), SMALL,
                               LoaderOptions(normalize=normalize, workers=2, seed=4))
    dropped = [b.images.clone() for b in make()]      # each batch freed at once: its slot is reused
    kept = list(make())                               # every batch held: later ones get fresh memory
    assert len(kept) > 2 * (loader_module.PREFETCH + 2)   # more batches than slots: reuse happened
    assert all(torch.equal(k.images, d) for k, d in zip(kept, dropped))
    assert len({float(d.float().sum()) for d in dropped}) == len(dropped)   # and the batches differ


def test_folders_held_out_by_split_are_excluded_by_default(packed, tmp_path):
    from sysu30k.split.build import build_splits
    from sysu30k.split.holdout import excluded_folders

    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    build_splits(str(dst), val_folders=4, val_block=2, seed=1, scheduler="sync")
    held = excluded_folders(str(dst))
    assert held
    loader = TrainLoader(str(dst), SPEC, SMALL, LoaderOptions(normalize=False, workers=0))
    assert loader.excluded == frozenset(held)
    seen = {int(f) for b in loader for f, v in zip(b.folder, b.valid) if v}
    assert seen and not seen & held and seen | held == set(train_keys(packed).values())


def test_crop_padding_scales_with_the_width_unless_given():
    """10 px at 256×128 as in ReID practice, proportionally less for CPU-sized inputs; an explicit pad is kept."""
    assert [TransformSpec(height=2 * w, width=w).pad for w in (128, 64, 32)] == [10, 5, 3]
    assert TransformSpec(height=64, width=32, pad=0).pad == 0
    params = draw_params(500, TransformSpec(height=64, width=32), np.random.default_rng(0))
    assert params.crop_x.min() == 0 and params.crop_x.max() == 6


def test_peek_draws_the_pixels_the_trainer_is_fed(packed):
    """Batches the workers normalised (CPU training) are drawn as their decoded pixels, not as the float
    values cast to uint8 (black backgrounds, clipped colours)."""
    from sysu30k.loader.peek import batch_sheet
    from sysu30k.loader.transforms import to_uint8

    def batch(normalize: bool):
        loader = TrainLoader(str(packed), SPEC, SMALL, LoaderOptions(normalize=normalize, decoder="pil", workers=0,
                                                                      seed=3))
        loader.load_state_dict({"epoch": 0, "consumed": 1})
        return next(iter(loader))

    decoded, normalised = batch(False), batch(True)
    assert decoded.images.dtype == torch.uint8 and normalised.images.dtype == torch.float32
    assert (to_uint8(normalised.images).int() - decoded.images.int()).abs().max() <= 1
    sheets = [np.asarray(batch_sheet(b, SPEC), dtype=np.int16) for b in (decoded, normalised)]
    assert np.abs(sheets[0] - sheets[1]).max() <= 1 and sheets[0].std() > 10


def test_a_manifest_shard_name_never_becomes_a_path_outside_dst(packed, tmp_path):
    import pyarrow as pa

    from sysu30k.errors import UserError

    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    table = pq.read_table(dst / "manifests/images.parquet")
    names = table["shard"].to_pylist()
    names[0] = "../../../etc/passwd"
    pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(names)),
                   dst / "manifests/images.parquet")
    with pytest.raises(UserError, match=r"'\.\./\.\./\.\./etc/passwd', which is not <subset>-NNNNNN"):
        TrainLoader(str(dst), SPEC, SMALL, LoaderOptions(decoder="pil", workers=0))


def test_training_bags_are_the_bag_manifests_not_the_folder_rule(tmp_path):
    """A bag_level_label.json whose bags are not consecutive windows (folder f with f + 6): every bag of every
    batch is one of its bags, its images come from that bag's folders only, and its label is that bag's."""
    import json

    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    write_synth(str(tmp_path / "raw"), SynthConfig(folders=12, images_per_folder=8, test_ids=2, distractors=2,
                                                   seed=6, bag_json=False))
    names = sorted(p.name for p in (tmp_path / "raw/sysu_train_set_all").iterdir())
    pairs = [(names[i], names[(i + 6) % 12]) for i in range(12)]
    records = [{"BagID": f"one{i}", "BagLabel": [int(n)], "BagImages": [f"{n}/*"]} for i, n in enumerate(names)]
    records += [{"BagID": f"two{i}", "BagLabel": [int(a), int(b)], "BagImages": [f"{a}/*", f"{b}/*"]}
                for i, (a, b) in enumerate(pairs)]
    (tmp_path / "raw/bag_level_label.json").write_text(json.dumps(records))
    run_shard(str(tmp_path / "raw"), str(tmp_path / "dst"), ShardJob(ShardingOptions(shard_count=20)),
              show_progress=False)
    allowed = {tuple(sorted(r["BagLabel"])) for r in records}
    loader = TrainLoader(str(tmp_path / "dst"), BagSpec(bags=4, per_bag=4), SMALL,
                         LoaderOptions(normalize=False, decoder="pil", workers=0))
    sizes, keys = collections.Counter(), collections.Counter()
    for b in loader:
        for bag in torch.unique(b.bag).tolist():
            rows = (b.bag == bag) & b.valid
            label = tuple(int(x) for x in b.bag_labels[b.bag == bag][0] if x >= 0)
            assert label in allowed, label
            assert set(b.folder[rows].tolist()) <= set(label)
            sizes[len(label)] += int(rows.sum())
        keys.update(k for k, v in zip(b.keys, b.valid) if v)
    assert sizes[1] > 0 and sizes[2] > 0                 # both sizes the manifest has were drawn
    assert set(keys.values()) == {1} and len(keys) == len(train_keys(tmp_path / "dst"))   # exactly once


def test_a_bag_file_naming_a_missing_folder_or_a_wrong_label_is_refused_before_the_walk(tiny_tree, tmp_path):
    import json

    from sysu30k.errors import UserError
    from sysu30k.ingest.config import ShardingOptions, ShardJob
    from sysu30k.ingest.shard import run_shard

    for records, needle in (([{"BagID": "b7", "BagLabel": [9999], "BagImages": ["0000009999/*"]}],
                             "bag b7 names folder '0000009999'"),
                            ([{"BagID": "b8", "BagLabel": [2], "BagImages": ["0000000001/*"]}],
                             "bag b8 is labelled [2] but holds the folders [1]")):
        src = tmp_path / needle[:6].replace(" ", "")
        shutil.copytree(tiny_tree, src)
        (src / "bag_level_label.json").write_text(json.dumps(records))
        with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            run_shard(str(src), str(tmp_path / f"dst-{src.name}"), ShardJob(ShardingOptions(shard_count=5)),
                      show_progress=False)
