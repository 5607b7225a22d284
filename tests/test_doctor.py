"""``sysu30k doctor`` decodes one image with every decoder the machine offers and reports what really ran."""

import json

import pytest
import torch
from click.testing import CliRunner

from sysu30k.cli import cli


def rows(*args) -> dict:
    r = CliRunner().invoke(cli, ["doctor", "--json", *args])
    assert r.exit_code == 0, r.output
    return {c["name"]: c for c in json.loads(r.output)}


def test_every_available_decoder_decodes_one_image():
    got = rows()
    assert got["decode: Pillow"]["ok"]
    dali = got["decode: DALI cpu"]                       # DALI's CPU graph is installed here
    assert dali["ok"] and "max difference from Pillow" in dali["detail"]
    assert int(dali["detail"].split("Pillow ")[1].split()[0]) <= 1           # one grey level at 256x128
    if not torch.cuda.is_available():
        assert "decode: DALI mixed" not in got and got["decoder"]["value"] == "pil"
        assert not got["torch driver"]["ok"] and "CPU-only" in got["torch driver"]["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's decoder choice")
def test_a_dali_graph_that_cannot_run_is_reported_not_claimed(monkeypatch):
    from sysu30k.loader import decode_dali

    def broken(self):
        raise RuntimeError("nvjpeg: no decoder for this device\nmore lines")

    monkeypatch.setattr(decode_dali.DaliDecoder, "_build", broken)
    got = rows()
    assert not got["decode: DALI cpu"]["ok"] and "RuntimeError: nvjpeg" in got["decode: DALI cpu"]["detail"]
    assert got["decoder"]["value"] == "pil"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard of a machine without a GPU")
def test_gpu_node_recipe_counts_the_gpus_and_refuses_without_one(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "pipelines" / "gpu-node.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(script), str(tmp_path / "raw"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no GPU visible to torch" in p.stderr, p.stderr
    assert not (tmp_path / "out" / "data").exists()
