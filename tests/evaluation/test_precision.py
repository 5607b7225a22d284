"""Half-precision extraction: ``eval --precision bf16`` runs the model under autocast (weights stay float32, so
no dtype mismatch), records the precision and keys the feature cache by it; features stay close to fp32's."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sysu30k.cli import cli
from sysu30k.evaluation import read_features
from sysu30k.evaluation.features import iter_features
from sysu30k.loader import EvalLoader, LoaderOptions, TransformSpec


@pytest.fixture
def checkpoint(tmp_path):
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=32)
    path = tmp_path / "net_0.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": build_model(cfg).state_dict()}, path)
    return path, build_model(cfg)


def test_bfloat16_extraction_runs_under_autocast(packed_split, checkpoint):
    _, model = checkpoint
    model.load_state_dict(torch.load(checkpoint[0], weights_only=True)["model"])
    loader = EvalLoader(str(packed_split), "gallery", 8, TransformSpec(height=64, width=32, train=False),
                        LoaderOptions(workers=0, device="cpu"))
    full = torch.cat([f for f, *_ in iter_features(model, loader, "cpu")])
    half = torch.cat([f for f, *_ in iter_features(model, loader, "cpu", dtype=torch.bfloat16)])
    assert half.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert not torch.equal(half, full)                                   # bf16 arithmetic really ran
    assert float((half * full).sum(1).min()) > 0.99                      # and stays close to fp32


def test_eval_precision_is_recorded_and_keys_the_cache(packed_split, checkpoint, tmp_path):
    args = ["eval", str(packed_split), "--checkpoint", str(checkpoint[0]), "--workers", "0", "--device", "cpu",
            "--height", "64", "--width", "32", "--json", "-q"]
    plain = CliRunner().invoke(cli, args)
    half = CliRunner().invoke(cli, args + ["--precision", "bf16"])
    assert plain.exit_code == 0 and half.exit_code == 0, (plain.output, half.output)
    mp, mh = json.loads(plain.output), json.loads(half.output)
    assert (mp["precision"], mh["precision"]) == ("fp32", "bf16") and mp["features"] != mh["features"]
    fp, fh = (read_features(tmp_path / "eval-test" / m["features"]) for m in (mp, mh))
    assert fp.keys == fh.keys and not np.array_equal(fp.feats.numpy(), fh.feats.numpy())
    bad = CliRunner().invoke(cli, args + ["--precision", "fp8"])
    assert bad.exit_code == 2 and "fp32" in bad.output
