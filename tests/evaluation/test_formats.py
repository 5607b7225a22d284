"""Checkpoint formats (sysu30k, the official SYSU-30k layout, torchvision ResNet-50), ``--feature``, and
streamed extract-and-score giving the numbers of the in-memory path."""

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ENV, cli, official_net

from sysu30k.evaluation import read_features
from sysu30k.io.compat import import_torchvision
from sysu30k.model.formats import detect, load_network


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("official") / "net_6.pth"
    torch.save(torch.nn.DataParallel(official_net(40)).state_dict(), path)
    return path


def _eval(dst, ckpt, out, *extra):
    p = cli("eval", dst, "--checkpoint", ckpt, "--out", out, "--workers", 0, "--batch", 8, "--device", "cpu",
            "--json", *extra, quiet=False, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_detects_the_three_formats_and_refuses_others(official, tmp_path):
    """Formats by their keys; the feature auto resolves per format; neck only where there is one; a foreign
    file or a pickle is one line naming what is understood."""
    state = torch.load(official, weights_only=True)
    assert all(k.startswith("module.") for k in state) and "module.model.fc.weight" in state
    assert detect(state) == "official"
    assert detect({k[len("module."):]: v for k, v in state.items()}) == "official"        # saved without DataParallel
    tv = import_torchvision().models.resnet50(weights=None).state_dict()
    assert detect(tv) == "torchvision" and detect({"a": torch.zeros(1)}) is None
    x = torch.randn(2, 3, 64, 32)
    got = {}
    for feature in ("auto", "logits", "pool"):
        net = load_network(official, feature)
        assert net.format == "official" and net.size == (256, 128)
        with torch.no_grad():
            got[net.feature] = net.network(x)
    assert got["logits"].shape == (2, 40) and got["pool"].shape == (2, 2048)
    ref = official_net(40)                                  # the same weights through the official forward
    ref.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    ref.eval()
    with torch.no_grad():
        m = ref.model
        pooled = torch.squeeze(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))))
        np.testing.assert_allclose(got["pool"].numpy(), pooled.numpy(), atol=1e-5)
        np.testing.assert_allclose(got["logits"].numpy(), ref.classifier.classifier(pooled).numpy(), atol=1e-5)
    bad = {"foreign.pth": {"a": torch.zeros(1)}, "resnet18.pth": import_torchvision().models.resnet18().state_dict()}
    for name, content in bad.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "pickle.pth").write_bytes(__import__("pickle").dumps(object()))
    needles = {"foreign.pth": "not a checkpoint sysu30k understands; it reads: sysu30k", "resnet18.pth": "does not fit",
               "pickle.pth": "refused (checkpoints are loaded with weights_only=True"}
    for name, needle in needles.items():
        p = cli("eval", tmp_path, "--checkpoint", tmp_path / name, quiet=False, timeout=120)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
    p = cli("eval", tmp_path, "--checkpoint", official, "--feature", "neck", quiet=False, timeout=120)
    assert p.returncode == 2 and "official checkpoint has no BN-neck" in p.stderr, p.stderr


def test_streamed_scoring_equals_in_memory(packed_split, official, tmp_path):
    """Over --memory-budget the gallery is scored as it is extracted: the same metrics and per-query table as
    the in-memory path, no feature file unless --save-features, whose file holds the same features."""
    small = ("--height", 64, "--width", 32)
    mem = _eval(packed_split, official, tmp_path / "mem", *small)
    assert mem["checkpoint_format"] == "official" and mem["feature"] == "logits" and mem["feature_dim"] == 40
    assert mem["scoring"] == "in memory" and mem["decoder"] == "pil"
    streamed = _eval(packed_split, official, tmp_path / "stream", *small, "--memory-budget", "1k")
    assert streamed["scoring"] == "streamed" and streamed["metrics"] == mem["metrics"]
    a, b = (pq.read_table(tmp_path / d / "per_query.parquet") for d in ("stream", "mem"))
    assert a.drop_columns(["top_scores"]).equals(b.drop_columns(["top_scores"]))       # the batches differ: ulps
    np.testing.assert_allclose(np.array(a["top_scores"].to_pylist()), np.array(b["top_scores"].to_pylist()), atol=1e-6)
    assert not list((tmp_path / "stream").glob("features-*.parquet"))
    saved = _eval(packed_split, official, tmp_path / "saved", *small, "--memory-budget", "1k", "--save-features")
    assert saved["metrics"] == mem["metrics"]
    a, b = (read_features(next((tmp_path / d).glob("features-test-*.parquet"))) for d in ("mem", "saved"))
    order = {k: i for i, k in enumerate(b.keys)}
    assert sorted(a.keys) == sorted(b.keys)
    rows = torch.as_tensor([order[k] for k in a.keys])
    np.testing.assert_allclose(a.feats.numpy(), b.feats[rows].numpy(), atol=1e-6)
    np.testing.assert_array_equal(a.pids, b.pids[rows.numpy()])
    pool = _eval(packed_split, official, tmp_path / "pool", *small, "--feature", "pool")
    assert pool["feature"] == "pool" and pool["feature_dim"] == 2048


def test_torchvision_weights_are_a_baseline(packed_split, tmp_path):
    """A plain torchvision ResNet-50 state dict evaluates on its pooled feature (auto) or the 1000 ImageNet
    logits."""
    torch.manual_seed(1)
    path = tmp_path / "resnet50.pth"
    torch.save(import_torchvision().models.resnet50(weights=None).state_dict(), path)
    m = _eval(packed_split, path, tmp_path / "tv", "--height", 64, "--width", 32)
    assert m["checkpoint_format"] == "torchvision" and m["feature"] == "pool" and m["feature_dim"] == 2048
    m = _eval(packed_split, path, tmp_path / "tv-logits", "--height", 64, "--width", 32, "--feature", "logits")
    assert m["feature_dim"] == 1000 and 0 <= m["metrics"]["rank1"] <= 1


def test_torchrun_ranks_split_the_gallery_with_one_process_numbers(packed_split, official, tmp_path):
    """Under torchrun (2 CPU ranks, gloo) each rank extracts its own gallery shards; the numbers and the
    per-query table are those of one process, and so is the --save-features file: the same rows in the same
    order (2 loader workers a rank: their batches interleave), values, schema and metadata; no part is left."""
    from ddp import torchrun_cli

    args = ("eval", packed_split, "--checkpoint", official, "--workers", 0, "--batch", 4, "--device", "cpu",
            "--height", 64, "--width", 32)
    one = _eval(packed_split, official, tmp_path / "one", "--height", 64, "--width", 32, "--batch", 4,
                "--memory-budget", "1k")
    p = subprocess.run([*torchrun_cli(2), *map(str, args), "--out", str(tmp_path / "two")], capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads((tmp_path / "two/metrics.json").read_text())
    assert two["processes"] == 2 and two["metrics"] == one["metrics"]
    a, b = (pq.read_table(tmp_path / d / "per_query.parquet") for d in ("one", "two"))
    assert a.drop_columns(["top_scores"]).equals(b.drop_columns(["top_scores"]))
    saving = ("--batch", 1, "--workers", 2, "--save-features")        # batches of one: the same values bit for bit
    single = _eval(packed_split, official, tmp_path / "one-saved", "--height", 64, "--width", 32, "--memory-budget",
                   "1k", *saving)
    p = subprocess.run([*torchrun_cli(2), *map(str, args + saving), "--out", str(tmp_path / "three")],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    three = json.loads((tmp_path / "three/metrics.json").read_text())
    assert three["metrics"] == single["metrics"] and three["features"] == single["features"]
    a, b = (tmp_path / d / single["features"] for d in ("one-saved", "three"))
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert tb.equals(ta) and ta.num_rows == 5 + 17
    assert pq.read_schema(b).equals(pq.read_schema(a), check_metadata=True)
    assert pq.read_schema(b).metadata[b"settings"] == pq.read_schema(a).metadata[b"settings"]
    listing = [sorted(x.name for x in (tmp_path / d).iterdir()) for d in ("one-saved", "three")]
    assert listing[0] == listing[1]                                    # no part file is left


def test_embed_folders_and_shards_score_like_eval(packed_split, tiny_tree, official, tmp_path):
    """``embed`` of the extracted test folders (labels from the names) and of the gallery shards (keys only,
    joined with the split) gives the features and the numbers of ``eval --checkpoint``."""
    test = tiny_tree / "sysu_test_set_all"
    small = ("--height", 64, "--width", 32, "--device", "cpu", "--batch", 5)
    for name, inputs in (("q", [test / "query"]), ("g", [test / "gallery"]),
                         ("gs", sorted((packed_split / "shards").glob("gallery-*.tar")))):
        p = cli("embed", *inputs, "--checkpoint", official, "--out", tmp_path / f"{name}.parquet", *small,
                quiet=False, timeout=600)
        assert p.returncode == 0, p.stderr
    assert "labelled from file names" in p.stdout or "keys only" in p.stdout
    q, g, gs = (read_features(tmp_path / f"{n}.parquet") for n in ("q", "g", "gs"))
    assert q.pids is not None and g.pids is not None and gs.pids is None
    assert sorted(g.keys) == sorted(gs.keys)
    mem = _eval(packed_split, official, tmp_path / "mem", *small[:4])
    cached = read_features(next((tmp_path / "mem").glob("features-test-*.parquet")))
    index = {k: i for i, k in enumerate(cached.keys)}
    for fs in (q, g):
        np.testing.assert_allclose(fs.feats.numpy(), cached.feats[torch.as_tensor([index[k] for k in fs.keys])].numpy(),
                                   atol=1e-5)
        np.testing.assert_array_equal(fs.pids, cached.pids[[index[k] for k in fs.keys]])
    for gallery in ("g", "gs"):
        p = cli("eval", packed_split, "--query-features", tmp_path / "q.parquet", "--gallery-features",
                tmp_path / f"{gallery}.parquet", "--out", tmp_path / f"from-{gallery}", "--json", quiet=False,
                timeout=300)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)["metrics"]
        assert all(abs(got[k] - mem["metrics"][k]) < 1e-9 for k in ("rank1", "rank5", "mAP_official", "mAP_standard"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    p = cli("embed", tmp_path / "bad", "--checkpoint", official, "--out", tmp_path / "bad.parquet", quiet=False)
    assert p.returncode == 2 and "x: not a readable image" in p.stderr and not (tmp_path / "bad.parquet").exists()
    p = cli("embed", tmp_path / "nothing-*.jpg", "--checkpoint", official, "--out", tmp_path / "n.parquet", quiet=False)
    assert p.returncode == 2 and "no image files there" in p.stderr
