"""``sysu30k export``: the ONNX file computes the PyTorch features (flip sum and L2 inside, dynamic batch) for
our checkpoints and the official layout, ``embed`` with the ``.onnx`` writes the checkpoint's features file,
and bad inputs are one-line errors."""

import numpy as np
import onnx
import pytest
import torch
from conftest import cli, official_net

from sysu30k.errors import UserError
from sysu30k.evaluation import read_features
from sysu30k.evaluation.config import EvalOptions
from sysu30k.evaluation.embed import embed_images
from sysu30k.loader.transforms import normalize_
from sysu30k.model.config import ExportOptions, ModelConfig
from sysu30k.model.export import export_onnx
from sysu30k.model.formats import load_network
from sysu30k.model.network import build_model
from sysu30k.model.onnxmodel import load_onnx

SIZE = (64, 32)
TOLERANCE = 1e-4


def _random_bn_stats(net: torch.nn.Module) -> None:
    """Trained-looking BatchNorm statistics (a fresh net's 0/1 would hide a BN left out of the graph)."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A train-weak (BN-neck) and a train-ssg checkpoint (resnet18, 64x32) and an official-layout one."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    paths = {}
    for head, emb in (("bnneck", 32), ("ssg", 16)):
        cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=emb, head=head)
        net = build_model(cfg)
        _random_bn_stats(net)
        paths[head] = root / f"{head}.pt"
        torch.save({"config": {"model": cfg.to_dict(), "height": SIZE[0], "width": SIZE[1]}, "model": net.state_dict()},
                   paths[head])
    official = official_net(40)
    _random_bn_stats(official)
    paths["official"] = root / "net_6.pth"
    torch.save(torch.nn.DataParallel(official).state_dict(), paths["official"])
    return paths


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """Each checkpoint exported with its auto feature: ours by the library, the official one by the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    got = {name: export_onnx(checkpoints[name], root / f"{name}.onnx") for name in ("bnneck", "ssg")}
    p = cli("export", checkpoints["official"], "--out", root / "official.onnx", "--height", SIZE[0], "--width", SIZE[1],
            quiet=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "40-d logits feature of" in p.stdout and "opset 18" in p.stdout
    got["official"] = {"out": str(root / "official.onnx"), "stdout": p.stdout}
    return got


def _pytorch(net, images: torch.Tensor) -> np.ndarray:
    """The evaluator's feature (sysu30k.evaluation.features): f(x) + f(flip(x)), L2-normalised."""
    x = normalize_(torch.empty(images.shape), images)
    with torch.inference_mode():
        return torch.nn.functional.normalize(net(x) + net(x.flip(3)), dim=1).numpy()


@pytest.mark.parametrize("name,feature,dim", [("bnneck", "neck", 32), ("ssg", "ssg", 3 * 512),
                                              ("official", "logits", 40)])
def test_onnx_gives_the_pytorch_features_at_any_batch(checkpoints, exported, name, feature, dim):
    """onnxruntime on the CPU against PyTorch on the same images, batches of 1 and 5 (the batch axis is
    dynamic): max deviation under 1e-4; the metadata says what the graph takes and holds."""
    model = load_onnx(exported[name]["out"])
    assert (model.format, model.feature, model.size, model.flip, model.normalize) == (
        "sysu30k" if name != "official" else "official", feature, SIZE, True, True)
    net = load_network(checkpoints[name]).network
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for batch in (1, 5):
        images = torch.randint(0, 256, (batch, 3, *SIZE), dtype=torch.uint8, generator=gen)
        got, ref = model.features(images.numpy()), _pytorch(net, images)
        assert got.shape == ref.shape == (batch, dim)
        worst = max(worst, float(np.abs(got - ref).max()))
    print(f"{name} ({feature}, {dim}-d): onnxruntime vs PyTorch max abs deviation {worst:.2e}")
    assert worst < TOLERANCE
    proto = onnx.load(exported[name]["out"])
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["sysu30k.mean"] == "0.485,0.456,0.406" and meta["sysu30k.std"] == "0.229,0.224,0.225"
    (inp,), (out,) = proto.graph.input, proto.graph.output
    shape = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, shape, out.name) == ("images", ["batch", 3, *SIZE], "features")
    if name != "official":
        assert exported[name]["max_deviation"] < TOLERANCE and exported[name]["dim"] == dim


def test_embed_with_the_onnx_file_writes_the_checkpoints_features(tiny_tree, checkpoints, exported, tmp_path):
    """``embed --checkpoint model.onnx`` gives the file ``embed --checkpoint CKPT`` gives: keys, labels and
    metadata equal, features within 1e-4."""
    query = tiny_tree / "sysu_test_set_all" / "query"
    common = ("--height", SIZE[0], "--width", SIZE[1], "--batch", 3, "--device", "cpu")
    for name, model in (("ckpt", checkpoints["official"]), ("onnx", exported["official"]["out"])):
        p = cli("embed", query, "--checkpoint", model, "--out", tmp_path / f"{name}.parquet", *common, quiet=False,
                timeout=600)
        assert p.returncode == 0, p.stderr
    assert "(ONNX, onnxruntime CPU)" in p.stdout
    a, b = (read_features(tmp_path / f"{n}.parquet") for n in ("ckpt", "onnx"))
    assert a.keys == b.keys and len(a) > 0
    np.testing.assert_array_equal(a.pids, b.pids)
    np.testing.assert_array_equal(a.camids, b.camids)
    worst = float((a.feats - b.feats).abs().max())
    print(f"embed: .onnx vs checkpoint features max abs deviation {worst:.2e} over {len(a)} images")
    assert worst < TOLERANCE
    import pyarrow.parquet as pq

    ma, mb = (pq.read_schema(tmp_path / f"{n}.parquet").metadata for n in ("ckpt", "onnx"))
    assert {k: v for k, v in ma.items() if k != b"checkpoint"} == {k: v for k, v in mb.items() if k != b"checkpoint"}


def _refused(call, needle: str) -> None:
    """``call()`` raises a one-line UserError saying ``needle``."""
    with pytest.raises(UserError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value), info.value


def _one_line_error(p, needle: str) -> None:
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_bad_inputs_are_one_line_errors(tiny_tree, checkpoints, exported, tmp_path):
    """A missing or foreign checkpoint (an .onnx among them), an --out that is not .onnx or exists, a --feature,
    size, flip, L2 or device the .onnx was not exported for, an .onnx that is no model or not sysu30k's: one
    line each, nothing written."""
    pickle = tmp_path / "pickle.pth"
    pickle.write_bytes(__import__("pickle").dumps(object()))
    out = tmp_path / "x.onnx"
    _one_line_error(cli("export", tmp_path / "none.pt", "--out", out, quiet=False, timeout=300), "no checkpoint at")
    for ckpt, dest, opts, needle in (
            (pickle, out, {}, "refused (checkpoints are loaded with weights_only=True"),
            (checkpoints["bnneck"], tmp_path / "x.bin", {}, "must end in .onnx"),
            (checkpoints["official"], out, {"feature": "neck"}, "has no BN-neck"),
            (checkpoints["bnneck"], exported["bnneck"]["out"], {}, "exists: give --overwrite"),
            (checkpoints["bnneck"], tmp_path, {}, "must end in .onnx"),
            (exported["official"]["out"], out, {}, "is an ONNX model, not a checkpoint: only embed runs it")):
        _refused(lambda: export_onnx(ckpt, dest, ExportOptions(**opts)), needle)
    _refused(lambda: ExportOptions(opset=17), "--opset must lie in [18, 25]")
    assert not out.exists() and not list(tmp_path.glob(".x.onnx.tmp-*"))
    onnx_official = exported["official"]["out"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a protobuf model \xff\xff")
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["images"], ["features"])
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [vi("images", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])],
                                   [vi("features", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), foreign)
    query = [str(tiny_tree / "sysu_test_set_all" / "query")]
    feats = tmp_path / "f.parquet"
    _one_line_error(cli("embed", *query, "--checkpoint", onnx_official, "--out", feats, "--feature", "pool",
                        quiet=False, timeout=300), "--feature pool: ")
    for model, opts, needle in ((onnx_official, {"feature": "pool"}, "was exported with the logits feature"),
                                (onnx_official, {"height": 128}, "was exported with height 64"),
                                (onnx_official, {"flip": False}, "the flip sum in its graph"),
                                (onnx_official, {"normalize": False}, "the L2 normalisation in its graph"),
                                (onnx_official, {"device": "cuda"}, "runs on onnxruntime's CPU provider"),
                                (garbage, {}, "is not an ONNX model onnxruntime can run"),
                                (foreign, {}, "without sysu30k export's metadata"),
                                (tmp_path / "none.onnx", {}, "no ONNX model at")):
        _refused(lambda: embed_images(query, str(model), str(feats), EvalOptions(**opts)), needle)
    assert not feats.exists()


def test_overwrite_replaces_the_file(checkpoints, tmp_path):
    """--overwrite replaces an existing file (written beside it, then renamed: no temporary file is left)."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    _refused(lambda: export_onnx(checkpoints["bnneck"], out, ExportOptions(verify=False)), "exists: give --overwrite")
    got = export_onnx(checkpoints["bnneck"], out, ExportOptions(feature="pool", overwrite=True, verify=False))
    assert got["max_deviation"] is None and got["feature"] == "pool" and got["dim"] == 512
    assert load_onnx(out).feature == "pool" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
