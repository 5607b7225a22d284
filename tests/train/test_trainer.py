"""train-weak: it learns, it resumes exactly after SIGTERM or SIGKILL, its checkpoints are safe to load,
and it runs under torchrun (DDP on CPU with gloo)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, cli, pack_synth, records
from ddp import torchrun_cli
from tbevents import assert_events_match_metrics, event_files

from sysu30k.model.checkpoint import load, save
from sysu30k.model.network import build_model

ARGS = ["--arch", "resnet18", "--embedding", "32", "--height", "64", "--width", "32", "--bags", "4",
        "--per-bag", "6", "--optimizer", "adam", "--lr", "0.001", "--head-lr-mult", "10", "--workers", "0",
        "--decoder", "pil", "--device", "cpu"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return pack_synth(root / "raw", root / "dst", 20, folders=8, images_per_folder=8, test_ids=4, distractors=6,
                      seed=2, impurity=0.0)


def weights(path: Path) -> dict:
    return load(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tiny_run_lowers_the_loss_and_checkpoints_rebuild(packed, tmp_path):
    run = tmp_path / "run"
    result = cli("train-weak", str(packed), "--out", str(run), "--method", "folder", "--epochs", "4",
                 "--keep-every", "1", *ARGS)
    assert result.returncode == 0, result.stderr
    losses = [e["train_total"] for e in records(run, "epoch")]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["config"]["method"] == "folder" and state["config"]["model"]["num_classes"] == 8
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    model.eval()
    assert model(torch.zeros(2, 3, 64, 32)).shape == (2, 32)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch-{i:03d}.pt" for i in range(1, 5)]


@pytest.mark.parametrize("method", ["dgl", "unary"])
def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_weights(packed, tmp_path, method):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["--method", method, "--epochs", "2", "--log-every", "1", *ARGS]
    assert cli("train-weak", str(packed), "--out", str(straight), *args).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "sysu30k", "-q", "train-weak", str(packed), "--out", str(stopped),
                             *args], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (stopped / "metrics.jsonl").exists():
        time.sleep(0.01)
    while time.monotonic() < deadline and '"event": "step"' not in (stopped / "metrics.jsonl").read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    state = load(stopped / "last.pt")
    assert state["loader"]["epoch"] == 0 and 0 < state["loader"]["consumed"]          # stopped mid-epoch 1
    assert len(state["cuda_rng"]) == torch.cuda.device_count()                      # one state per GPU
    assert cli("train-weak", str(packed), "--out", str(stopped), *args).returncode == 0
    assert same_weights(weights(straight / "last.pt"), weights(stopped / "last.pt"))
    optimizer_state = [load(run / "last.pt")["optimizer"]["state"].keys() for run in (stopped, straight)]
    assert optimizer_state[0] == optimizer_state[1]
    tb = assert_events_match_metrics(stopped)               # TensorBoard: the resumed process appended a file
    assert len(event_files(stopped)) == 2 and {"step/lr", "step/images_per_s", "epoch/images_per_s"} <= tb.keys()
    assert [step for step, _ in tb["step/total"]] == list(range(1, len(records(straight, "step")) + 1))


def test_sigkill_after_an_epoch_then_resume_gives_the_uninterrupted_weights(packed, tmp_path):
    """Also across the end of a folder-label warm-up (epoch 1 on folder pseudo-labels, epochs 2-3 on the argmax)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--method", "dgl", "--epochs", "3", "--keep-every", "1", "--warmup-epochs", "1", *ARGS]
    assert cli("train-weak", str(packed), "--out", str(straight), *args, "--no-tensorboard").returncode == 0
    assert (straight / "metrics.jsonl").exists() and not (straight / "tensorboard").exists()
    proc = subprocess.Popen([sys.executable, "-m", "sysu30k", "-q", "train-weak", str(packed), "--out", str(killed),
                             *args], env=ENV, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (killed / "checkpoints" / "epoch-001.pt").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "epoch-003.pt").exists() and load(killed / "last.pt")["epoch"] < 3
    assert cli("train-weak", str(packed), "--out", str(killed), *args).returncode == 0
    assert same_weights(weights(straight / "last.pt"), weights(killed / "last.pt"))


def test_other_settings_on_an_existing_run_are_refused(packed, tmp_path):
    run = tmp_path / "run"
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    again = cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", "--seed", "5", *ARGS)
    assert again.returncode == 2 and "other settings" in again.stderr
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", "--seed", "5", "--overwrite",
               *ARGS).returncode == 0
    bad = cli("train-weak", str(packed), "--out", str(tmp_path / "x"), "--lr-steps", "ten", *ARGS)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_a_checkpoint_from_before_the_optimiser_variants_resumes_as_it_was_trained(packed, tmp_path):
    """Runs written before --nesterov/--amsgrad existed hold configs without them; they trained with Nesterov
    SGD / AMSGrad Adam, so they resume with those and are refused with the other variant."""
    run = tmp_path / "run"
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    state = load(run / "last.pt")
    assert state["config"]["amsgrad"] is True and state["config"]["nesterov"] is True
    for key in ("amsgrad", "nesterov"):
        del state["config"][key]
    save(run / "last.pt", state)
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", "--no-amsgrad", *ARGS).returncode == 2
    resumed = cli("train-weak", str(packed), "--out", str(run), "--epochs", "2", *ARGS)
    assert resumed.returncode == 2 and "other settings" in resumed.stderr     # --epochs is part of the config
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    assert len(records(run, "epoch")) == 1                                    # resumed: nothing left to train


def test_gpu_random_states_that_cannot_be_restored_are_said(packed, tmp_path):
    """A run resumed on another number of GPUs (here: a CPU) cannot restore their RNG states: one warning line."""
    run = tmp_path / "run"
    assert cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    state = load(run / "last.pt")
    state["cuda_rng"] = [torch.get_rng_state()] * (torch.cuda.device_count() + 1)     # one GPU more than here
    save(run / "last.pt", state)
    resumed = cli("train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"random state of {torch.cuda.device_count() + 1} GPU(s)" in resumed.stderr


def test_a_config_file_trains_what_it_says_and_flags_override_it(packed, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "folder"\nper_bag = 5\nlr = 0.002\nepochs = 3\n')
    run = tmp_path / "run"
    r = cli("train-weak", str(packed), "--out", str(run), "--config", str(recipe), "--epochs", "0", *ARGS)
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["per_bag"], config["epochs"]) == ("folder", 6, 0)   # ARGS give --per-bag 6
    assert config["lr"] == 0.001                                                          # and --lr 0.001


def test_torchrun_two_ranks_on_cpu(packed, tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run([*torchrun_cli(2), "train-weak", str(packed), "--out", str(run), "--epochs", "1", *ARGS],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = records(run, "epoch")[-1]
    assert record["step"] >= 1 and (run / "best.pt").exists()
    assert len(event_files(run)) == 1 and assert_events_match_metrics(run)          # rank 0's events only


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun ``launcher``'s worker with RANK ``rank`` (its children, read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_batch_and_resumes_exactly(packed, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["--epochs", "2", "--log-every", "1", *ARGS]
    ddp = [*torchrun_cli(2), "train-weak", str(packed)]
    done = subprocess.run([*ddp, "--out", str(straight), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen([*ddp, "--out", str(stopped), *args], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    log = stopped / "metrics.jsonl"
    while time.monotonic() < deadline and not (log.exists() and '"event": "step"' in log.read_text()):
        time.sleep(0.01)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)                    # rank 1 only: rank 0 never sees a signal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM: saved" in err, err[-2000:]
    state = load(stopped / "last.pt")
    assert state["loader"]["epoch"] == 0 and 0 < state["loader"]["consumed"]          # mid-epoch 1, saved by rank 0
    resumed = subprocess.run([*ddp, "--out", str(stopped), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(weights(straight / "last.pt"), weights(stopped / "last.pt"))


def test_a_non_finite_validation_never_becomes_best_pt(packed, tmp_path, monkeypatch):
    """A diverged epoch's features are NaN, and NaN scored rank-1 = 1.0 before; now such an epoch is recorded
    (val_rank1 null) and never kept as best.pt, before or after a finite one."""
    import sysu30k.evaluation.run as evaluation
    from sysu30k.evaluation.scoring import NonFiniteFeatures
    from sysu30k.model.config import ModelConfig
    from sysu30k.train.config import RunOptions, TrainConfig
    from sysu30k.train.weak import train

    outcomes = iter([None, 0.5, None])                          # epochs 1 and 3 diverge, epoch 2 scores 0.5

    def validation(*args, **kw):
        rank1 = next(outcomes)
        if rank1 is None:
            raise NonFiniteFeatures("5 of 5 query features are not finite (NaN or inf), e.g. key q: nothing is scored")
        return {"rank1": rank1, "mAP_official": 0.1}

    monkeypatch.setattr(evaluation, "evaluate_split", validation)
    cfg = TrainConfig(method="folder", model=ModelConfig(arch="resnet18", embedding=32), epochs=3, bags=4, per_bag=6,
                      height=64, width=32, optimizer="adam", lr=1e-3)
    train(str(packed), str(tmp_path / "run"), cfg, RunOptions(workers=0, decoder="pil", device="cpu",
                                                               show_progress=False))
    assert [r["val_rank1"] for r in records(tmp_path / "run", "epoch")] == [None, 0.5, None]
    tb = assert_events_match_metrics(tmp_path / "run")
    second = records(tmp_path / "run", "epoch")[1]["step"]
    assert tb["epoch/val_rank1"] == [(second, 0.5)]                                  # the NaN epochs have none
    assert tb["epoch/val_mAP_official"] == [(second, pytest.approx(0.1, rel=1e-7))]    # float32
    best = load(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 2 and best["best_rank1"] == 0.5
    assert load(tmp_path / "run" / "last.pt")["best_rank1"] == 0.5


def test_best_checkpoint_rule_rank1_then_map_then_earlier():
    from sysu30k.train.loop import _better

    assert _better({"rank1": 0.4, "mAP_official": 0.1}, None, None)                   # the first finite epoch
    assert not _better({"rank1": math.nan}, None, None) and not _better(None, 0.4, 0.2)
    assert _better({"rank1": 0.5, "mAP_official": 0.0}, 0.4, 0.9)                      # rank-1 first
    assert not _better({"rank1": 0.3, "mAP_official": 0.9}, 0.4, 0.1)
    assert _better({"rank1": 0.4, "mAP_official": 0.3}, 0.4, 0.2)                      # a tie: the higher mAP
    assert not _better({"rank1": 0.4, "mAP_official": 0.2}, 0.4, 0.2)                  # both tied: the earlier
    assert _better({"rank1": 0.4, "mAP_official": 0.2}, 0.4, None)                     # older checkpoints
    assert not _better({"rank1": 0.4, "mAP_official": math.nan}, 0.4, 0.2)
    assert _better({"rank1": 0.4, "mAP_official": 0.1}, 0.4, math.nan)                 # a NaN mAP kept never blocks
