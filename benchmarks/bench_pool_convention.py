"""Measurement: how far ``eval --feature pool`` (``normalize(f(x) + f(flip(x)))``, the rule of every feature here)
is from the authors' self-supervised test script (``normalize(normalize(f(x)) + f(flip(x)))``, RELEASE.md §2),
on the synthetic test set and the random ft_net of tests/evaluation/test_official_exact.py.

Both features come from the same pixels and network (the literal copy of the script: ImageFolder, its transforms,
its layer-4 mean); only the normalisation differs. Prints the pooled norms, the largest 1 - cosine between the two
conventions, the largest change of a query-gallery score, and rank-1/5 and official mAP under each.

    python benchmarks/bench_pool_convention.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "evaluation")]


def main() -> None:
    import official_reference as ref
    from conftest import TINY

    from sysu30k.evaluation.scoring import score
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    root = Path(tempfile.mkdtemp(prefix="pool-convention-"))
    write_synth(str(root / "tiny"), SynthConfig(**TINY))
    torch.manual_seed(3)                                  # the exactness test's model
    ckpt = root / "net_6.pth"
    torch.save(torch.nn.DataParallel(ref.ft_net(30)).state_dict(), ckpt)
    net = torch.nn.DataParallel(ref.ft_net(30))
    net.device_ids = []
    model = ref.ResNetOut4(ref.load_network(net, str(ckpt)).module.model).eval()
    unit = torch.nn.functional.normalize
    got = {}
    for role in ("query", "gallery"):
        images = ref.datasets.ImageFolder(str(root / "tiny" / "sysu_test_set_all" / role), ref.data_transforms)
        x = torch.stack([images[i][0] for i in range(len(images))])
        with torch.no_grad():
            f, flipped = (model(v)[0].mean(dim=[2, 3]) for v in (x, x.flip(dims=[-1])))
        cams, labels = ref.get_id(images.imgs)
        got[role] = {"ours": unit(f + flipped, dim=1), "theirs": unit(unit(f, dim=1) + flipped, dim=1),
                     "norm": f.norm(dim=1), "pid": np.array(labels), "camid": np.array(cams)}
    q, g = got["query"], got["gallery"]
    cos = torch.cat([(r["ours"] * r["theirs"]).sum(1) for r in (q, g)])
    norms = torch.cat([q["norm"], g["norm"]])
    moved = (q["ours"] @ g["ours"].T - q["theirs"] @ g["theirs"].T).abs().max()
    print(f"{len(cos)} images; |f(x)| {norms.min():.1f}..{norms.max():.1f}")
    print(f"largest 1 - cos(ours, theirs): {(1 - cos).max():.3g}; largest score change: {moved:.3g}")
    for conv in ("ours", "theirs"):
        s = score(q[conv], q["pid"], q["camid"], g[conv], g["pid"], g["camid"]).summary()
        print(f"  {conv:6s} rank-1 {s['rank1']:.3f}  rank-5 {s['rank5']:.3f}  mAP (official) {s['mAP_official']:.4f}")


if __name__ == "__main__":
    main()
