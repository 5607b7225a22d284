"""Options declared once: the command line's defaults are the dataclasses' defaults, ranges and choices are
refused at the command line (one line, exit 2) and in library calls, --config files load through the same
types (flags override them, unknown keys are refused), and every recipe in pipelines/ is a valid config."""

import dataclasses
import math
from pathlib import Path

import click
import pytest
from conftest import cli

from sysu30k import cli as commands
from sysu30k.errors import UserError
from sysu30k.evaluation.config import EvalOptions
from sysu30k.ingest.config import ImageOptions, ShardingOptions, ShardJob, ShardRun
from sysu30k.options import apply_config, build, check
from sysu30k.split.config import SplitOptions
from sysu30k.synth.config import SynthConfig
from sysu30k.train.config import LossWeights, RunOptions, TrainConfig
from sysu30k.train.ssg.config import SOURCE_DEFAULTS, SSGConfig

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def parsed(command: click.Command, args: list[str]) -> tuple[click.Context, dict]:
    ctx = command.make_context(command.name, args)
    return ctx, dict(ctx.params)


@pytest.mark.parametrize("command,args,cls", [
    (commands.synth, ["out"], SynthConfig),
    (commands.shard, ["src", "dst"], ShardJob),
    (commands.shard, ["src", "dst"], ShardRun),
    (commands.split, ["dst"], SplitOptions),
    (commands.eval_, ["dst"], EvalOptions),
    (commands.train_weak, ["dst", "--out", "run"], TrainConfig),
    (commands.train_weak, ["dst", "--out", "run"], RunOptions),
    (commands.train_ssg, ["dst", "--out", "run"], RunOptions),
])
def test_no_flags_give_exactly_the_dataclass_defaults(command, args, cls):
    _, values = parsed(command, args)
    assert build(cls, values) == cls()


def test_train_ssg_leaves_unset_options_to_the_stage():
    _, values = parsed(commands.train_ssg, ["dst", "--out", "run", "--stage", "source", "--lr", "0.5"])
    fields = {f.name for f in dataclasses.fields(SSGConfig)} - {"model", "stage"}
    cfg = SSGConfig.for_stage("source", **{k: v for k, v in values.items() if k in fields})
    assert cfg.lr == 0.5 and cfg.groups == SOURCE_DEFAULTS["groups"] and cfg.k1 == SSGConfig().k1


@pytest.mark.parametrize("args,flag", [
    (["train-weak", "d", "--out", "r", "--bags", "0"], "--bags"),
    (["train-weak", "d", "--out", "r", "--erase-p", "1.5"], "--erase-p"),
    (["train-weak", "d", "--out", "r", "--lr", "0"], "--lr"),
    (["train-weak", "d", "--out", "r", "--lr", "nan"], "--lr"),
    (["train-weak", "d", "--out", "r", "--height", "0"], "--height"),
    (["train-weak", "d", "--out", "r", "--method", "oracle"], "--method"),
    (["train-ssg", "d", "--out", "r", "--rho", "0"], "--rho"),
    (["shard", "s", "d", "--workers", "0"], "--workers"),
    (["shard", "s", "d", "--quality", "101"], "--quality"),
    (["shard", "s", "d", "--shard-size", "lots"], "--shard-size"),
    (["synth", "o", "--impurity", "2"], "--impurity"),
    (["synth", "o", "--height", "100"], "--height"),
    (["split", "d", "--val-distractors", "1"], "--val-distractors"),
    (["split", "d", "--workers", "0"], "--workers"),
    (["eval", "d", "--checkpoint", "c", "--batch", "0"], "--batch"),
    (["peek", "d", "--bags", "-1"], "--bags"),
])
def test_values_out_of_range_are_one_line_and_exit_2(args, flag):
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and flag in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_library_callers_meet_the_same_ranges():
    with pytest.raises(UserError, match="--bags"):
        TrainConfig(bags=0)
    with pytest.raises(UserError, match="--pairwise-weight"):
        TrainConfig(weights=LossWeights(pairwise=-1.0))
    with pytest.raises(UserError, match="NaN"):
        SynthConfig(impurity=math.nan)
    with pytest.raises(UserError, match="--verify"):
        ShardJob(image=ImageOptions(verify="quick")).check()
    with pytest.raises(UserError, match="--shard-count"):
        check(ShardingOptions(shard_count=0))
    with pytest.raises(UserError, match="--mining"):
        SSGConfig(mining="all")
    check(TrainConfig())                                          # the defaults are inside their own ranges


def test_a_config_file_fills_what_the_flags_do_not_give(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('per_bag = 16\nlr = 0.5\npairwise_weight = 3\nlr_steps = [4, 6]\nnesterov = false\n'
                 'storage_options = {anon = true}\nworkers = 0\n')
    ctx, values = parsed(commands.train_weak, ["dst", "--out", "run", "--lr", "0.25", "--config", str(f)])
    values = apply_config(ctx, values, values.pop("config_file"))
    cfg, run = build(TrainConfig, values), build(RunOptions, values)
    assert (cfg.per_bag, cfg.lr, cfg.weights.pairwise, cfg.lr_steps, cfg.nesterov) == (16, 0.25, 3.0, (4, 6), False)
    assert run.storage_options == {"anon": True} and run.workers == 0


@pytest.mark.parametrize("text,message", [
    ("per_bags = 16\n", "unknown option 'per_bags'"),
    ("bags = 0\n", "bags = 0"),
    ("method = 'oracle'\n", "method"),
    ("lr = 'fast'\n", "lr"),
    ("bags = [\n", "not valid TOML"),
])
def test_a_bad_config_file_is_refused_with_its_key(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    ctx, values = parsed(commands.train_weak, ["dst", "--out", "run", "--config", str(f)])
    with pytest.raises(UserError, match=message):
        apply_config(ctx, values, values.pop("config_file"))


def test_a_missing_config_file_is_one_line(tmp_path):
    r = cli("train-weak", str(tmp_path), "--out", str(tmp_path / "r"), "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "none.toml" in r.stderr, r.stderr


@pytest.mark.parametrize("recipe", sorted(PIPELINES.glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(recipe):
    command = commands.train_ssg if recipe.name.startswith("ssg-") else commands.train_weak
    ctx, values = parsed(command, ["dst", "--out", "run", "--config", str(recipe)])
    values = apply_config(ctx, values, values.pop("config_file"))
    if command is commands.train_weak:
        cfg = build(TrainConfig, values)
        assert cfg != TrainConfig()
    else:
        stage = values["stage"]
        assert stage in ("source", "adapt")
    build(RunOptions, values)


def test_ssg_adaptation_refuses_the_source_stage_architecture_options(tmp_path):
    r = cli("train-ssg", str(tmp_path), "--out", str(tmp_path / "r"), "--arch", "resnet18")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--arch" in r.stderr, r.stderr


def test_commands_that_read_dst_take_storage_options_and_eval_peek_take_a_decoder():
    for command in (commands.shard, commands.split, commands.peek, commands.eval_, commands.train_weak,
                    commands.train_ssg):
        flags = {o for p in command.params for o in getattr(p, "opts", [])}
        assert "--storage-option" in flags, command.name
    for command in (commands.peek, commands.eval_, commands.train_weak, commands.train_ssg):
        assert "--decoder" in {o for p in command.params for o in getattr(p, "opts", [])}, command.name
    _, values = parsed(commands.eval_, ["dst", "--storage-option", "anon=true", "--storage-option",
                                        'client_kwargs={"region_name": "x"}', "--decoder", "pil"])
    opts = build(EvalOptions, values)
    assert opts.storage_options == {"anon": True, "client_kwargs": {"region_name": "x"}} and opts.decoder == "pil"
