"""``sysu30k eval`` against a literal copy of the official SYSU-30k test script (official_reference.py) on the
synthetic test set, with a random ft_net saved in the official nn.DataParallel layout: the same metrics
(1e-9) and the same features (1e-5) for the official feature (the classifier output). The authors'
self-supervised script L2-normalises the unflipped pooled feature before adding the flipped one; our
``pool`` normalises the sum once, so it is compared with the ft_net forward in test_formats.py instead."""

import json

import numpy as np
import official_reference
import pytest
import torch
from conftest import cli

CLASSES = 30


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("exact") / "net_6.pth"
    torch.save(torch.nn.DataParallel(official_reference.ft_net(CLASSES)).state_dict(), path)
    return path


@pytest.mark.parametrize("feature", ["logits"])
def test_eval_reproduces_the_official_script(packed_split, tiny_tree, official_ckpt, tmp_path, feature):
    ref = official_reference.run_official(str(tiny_tree / "sysu_test_set_all"), str(official_ckpt), CLASSES,
                                          feature=feature)
    p = cli("eval", packed_split, "--checkpoint", official_ckpt, "--out", tmp_path, "--workers", 0, "--device", "cpu",
            "--feature", feature, "--json", quiet=False, timeout=900)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["checkpoint_format"] == "official" and got["size"] == [256, 128] and got["decoder"] == "pil"
    m = got["metrics"]
    for k in (1, 5, 10):                  # the script divides a float32 CMC: the same number, in float32
        assert abs(float(np.float32(m[f"rank{k}"])) - ref[f"rank{k}"]) < 1e-9, (k, m[f"rank{k}"], ref[f"rank{k}"])
    assert abs(m["mAP_official"] - ref["mAP"]) < 1e-9, (m["mAP_official"], ref["mAP"])
    assert 0 < ref["mAP"] < 1
    from sysu30k.evaluation import read_features

    feats = read_features(next(tmp_path.glob("features-test-*.parquet")))
    index = {k: i for i, k in enumerate(feats.keys)}
    worst = 0.0
    for role in ("query", "gallery"):
        keys = [p.rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in ref[f"{role}_paths"]]
        mine = feats.feats[torch.as_tensor([index[k] for k in keys])].numpy()
        theirs = np.asarray(ref[f"{role}_features"], np.float32)
        assert mine.shape == theirs.shape
        worst = max(worst, float(np.abs(mine - theirs).max()))
    print(f"largest feature deviation ({feature}): {worst:.3g}")
    assert worst < 1e-5
