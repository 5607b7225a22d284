"""Progress and quiet: plain lines (no bar frames) when stderr is not a terminal, -q before or after the
command name silences info output and progress, eval's extraction reports images, eval --compare --json."""

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cli as subprocess_cli

from sysu30k.cli import cli
from sysu30k.evaluation import write_features
from sysu30k.io.progress import progress

SYNTH = ("--folders", 2, "--images-per-folder", 2, "--test-ids", 2, "--distractors", 2, "--height", 144)


def test_lines_at_each_tenth_and_none_repeated_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="sysu30k")
    with progress(100, "work", "img") as bar:             # stderr is captured here: not a terminal
        for _ in range(100):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("work: 10/100 img (10%") and "100/100 img (100%" in lines[-1]


def test_quiet_or_a_failure_prints_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="sysu30k")
    with progress(10, "quiet") as bar:
        bar.update(10)
    caplog.set_level(logging.INFO, logger="sysu30k")
    with pytest.raises(ValueError), progress(None, "failing") as bar:    # no total: no tenths, only the end
        bar.update(3)
        raise ValueError
    assert caplog.records == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_command_silences_info_and_progress(tmp_path, where):
    args = ["synth", tmp_path / "out", *SYNTH]
    p = subprocess_cli(*(["-q", *args] if where == "before" else [*args, "-q"]), quiet=False, timeout=120)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.startswith("wrote "), p.stderr


def test_synth_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    p = subprocess_cli("synth", tmp_path / "out", *SYNTH, quiet=False, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    lines = p.stderr.splitlines()
    assert lines and all(line.startswith("synth: ") for line in lines) and "img (100%" in lines[-1], lines


def test_every_command_takes_quiet_after_its_name():
    for name in cli.commands:
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "-q, --quiet" in r.output, name


def test_eval_extraction_reports_images(packed_split, tmp_path):
    from sysu30k.model.config import ModelConfig
    from sysu30k.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_classes=8, embedding=16)
    ckpt = tmp_path / "net.pth"
    torch.save({"config": {"model": cfg.to_dict()}, "model": build_model(cfg).state_dict()}, ckpt)
    p = subprocess_cli("eval", packed_split, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu", "--height", 64,
                       "--width", 32, "--out", tmp_path / "run", quiet=False, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    done = [line for line in p.stderr.splitlines() if line.startswith("features: ") and "(100%" in line]
    assert {line.split()[1] for line in done} >= {"5/5", "17/17"}, p.stderr      # queries; gallery with distractors


def test_compare_json(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 8)).astype(np.float32)
    write_features(tmp_path / "q.parquet", [f"q{i}" for i in range(6)], np.arange(6), np.full(6, 2), q)
    for name, noise in (("a", 0.1), ("b", 2.0)):
        g = q + noise * rng.standard_normal(q.shape).astype(np.float32)
        write_features(tmp_path / f"{name}.parquet", [f"g{i}" for i in range(6)], np.arange(6), np.ones(6), g)
        r = CliRunner().invoke(cli, ["eval", "--query-features", str(tmp_path / "q.parquet"), "--gallery-features",
                                     str(tmp_path / f"{name}.parquet"), "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    p = subprocess_cli("eval", "--compare", tmp_path / "a", tmp_path / "b", "--json", quiet=False, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text())["metrics"] for n in "ab")
    assert got["a"]["metrics"] == a and got["b"]["metrics"] == b
    assert got["b_minus_a"]["rank1"] == pytest.approx(b["rank1"] - a["rank1"])
    assert set(got["b_minus_a"]) >= {"rank1", "rank5", "mAP_official", "mAP_standard"}
