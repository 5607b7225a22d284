"""The ``sysu30k`` command line: a thin Click layer over the library functions."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable

import click

from . import __version__
from .errors import UserError
from .evaluation.config import EvalOptions
from .ingest.config import ShardJob, ShardRun
from .model.config import ExportOptions
from .options import apply_config, build, cli_options
from .split.config import SplitOptions
from .synth.config import SynthConfig
from .train.config import RunOptions, TrainConfig
from .train.ssg.config import SOURCE_DEFAULTS, SSGConfig


def _quiet(**kw) -> Callable:
    """The -q/--quiet option, declared once: the group's, and the same flag after every command's name."""
    return click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (no progress either).", **kw)


def _quiet_after_command(ctx: click.Context, param: click.Parameter, quiet: bool) -> None:
    if quiet:                                # parsed after the group's callback has set the level
        logging.getLogger("sysu30k").setLevel(logging.WARNING)


class _Group(click.Group):
    """The command group: every command added to it also takes -q/--quiet after its name."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _quiet(expose_value=False, callback=_quiet_after_command)(cmd)
        super().add_command(cmd, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sysu30k")
@_quiet()
def cli(quiet: bool) -> None:
    """Shard, load, train and evaluate on SYSU-30k, the weakly labelled person re-ID dataset."""
    log = logging.getLogger("sysu30k")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@cli_options(SynthConfig)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
def synth(out: str, workers: int, **values) -> None:
    """Write a SYSU-30k-shaped synthetic dataset to OUT (deterministic by seed).

    The tree follows the released layout; OUT/truth.csv holds the true identity of every training
    image (for oracle benchmarks only; the pipeline never reads it).
    """
    from .synth import write_synth

    s = write_synth(out, build(SynthConfig, values), workers=workers, progress=True)
    click.echo(f"wrote {s.train_images} training images in {s.folders} folders, {s.query_images} queries, "
               f"{s.gallery_images} gallery images ({s.distractors} distractors), {s.bytes / 1e6:.1f} MB "
               f"to {s.root} in {s.seconds:.1f} s")


@cli.command()
@click.argument("src")
@click.argument("dst")
@cli_options(ShardJob)
@cli_options(ShardRun)
@click.option("--overwrite", is_flag=True, help="Delete previous output in DST and start over.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shard(src: str, dst: str, overwrite: bool, as_json: bool, **values) -> None:
    """Pack SYSU-30k at SRC into WebDataset shards and Parquet manifests under DST.

    SRC is the release folder as downloaded (train/*_partN.tar, test/*.tar, the lists at its root; read
    without extracting), the extracted tree, or a mix of both. SRC and DST are local paths or URLs such as
    s3://bucket/prefix. Resumable: rerun the same command
    after an interruption and it continues from the completed shards, ending byte-identical to an
    uninterrupted run.
    """
    from .ingest.shard import damage_line, run_shard
    from .io.retry import RetryPolicy

    run = build(ShardRun, values)
    summary = run_shard(src, dst, build(ShardJob, values), workers=run.workers, overwrite=overwrite,
                        storage_options=run.storage_options, scheduler=run.scheduler,
                        retry=RetryPolicy(attempts=run.retries + 1), strict=run.strict)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"{'subset':<8} {'images':>10} {'rejects':>8} {'shards':>7} {'MB':>10}")
    for subset, s in summary["subsets"].items():
        click.echo(f"{subset:<8} {s['images']:>10} {s['rejects']:>8} {s['shards']:>7} {s['bytes'] / 1e6:>10.1f}")
    if summary["rejects_by_reason"]:
        click.echo("rejects: " + ", ".join(f"{k} {v}" for k, v in summary["rejects_by_reason"].items()))
    click.echo(f"bags: {summary['bags']} ({summary['bag_source']}); manifests in {dst}/manifests/")
    if (line := damage_line(summary)) is not None:
        click.echo(line)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(as_json: bool) -> None:
    """Show what this environment offers: Pillow-SIMD, DALI and GPU, CUDA, S3 settings."""
    from .doctor import run_checks

    rows = run_checks()
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    for r in rows:
        click.echo(f"{'ok ' if r.ok else '-- '} {r.name:<24} {r.detail}")


@cli.command()
@click.argument("dst")
@cli_options(RunOptions, only=("storage_options",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(dst: str, as_json: bool, **values) -> None:
    """Check a finished DST against its manifests: every tar's size and sha256, every image's bytes, every
    DALI index, and tars no manifest names. Exit status 2 when anything differs."""
    from .ingest.verify import verify as run_verify

    report = run_verify(dst, build(RunOptions, values).storage_options)
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=1))
    else:
        for kind, where, detail in report.problems:
            click.echo(f"{kind:<9} {where}: {detail}")
        click.echo(f"checked {report.shards} shards, {report.images} images, {report.bytes / 1e6:.1f} MB")
    if report.problems:
        kind, where, _ = report.problems[0]
        raise UserError(f"{len(report.problems)} problem(s) in {dst}, the first: {kind} {where}")


@cli.command()
@click.argument("dst")
@cli_options(SplitOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def split(dst: str, as_json: bool, **values) -> None:
    """Build the official test split (and a val split) of DST into DST/manifests/split.parquet.

    Reads DST/manifests/images.parquet (local path or fsspec URL such as s3://...) with Dask, checks
    the protocol's invariants and reports every deviation, and writes split.parquet, holdout.parquet
    (folders a trainer must skip) and split_summary.json.
    """
    from dataclasses import asdict

    from .split.build import build_splits

    s = build_splits(dst, **asdict(build(SplitOptions, values)))
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    click.echo(f"{'split':<6} {'queries':>8} {'gallery':>10} {'matches':>8} {'distractors':>11} {'ids':>6}")
    for name, c in s["splits"].items():
        click.echo(f"{name:<6} {c['queries']:>8} {c['gallery']:>10} {c['true_matches']:>8} {c['distractors']:>11} "
                   f"{c['identities']:>6}")
    v = s["val"]
    if v["folders"]:
        click.echo(f"held out: {v['folders']} folders in {len(v['blocks'])} blocks "
                   f"({len(v['query_folders'])} query, {len(v['distractor_folders'])} distractor) "
                   f"+ {len(v['guard_folders'])} guard; training bags kept {s['training_bags']['kept']}, "
                   f"excluded {s['training_bags']['excluded']}")
    click.echo(f"{len(s['findings'])} warning(s); manifests in {dst}/manifests/"
               if s["findings"] else f"all invariants hold; manifests in {dst}/manifests/")


@cli.command()
@click.argument("dst")
@click.option("--out", default="batch.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the PNG.")
@click.option("--batch", "index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which batch of the epoch to show.")
@cli_options(TrainConfig, only=("bags", "per_bag", "height", "width", "seed"))
@cli_options(RunOptions, only=("decoder", "storage_options"))
def peek(dst: str, out: str, index: int, **values) -> None:
    """Draw one bag-structured training batch of DST as a PNG: a row per bag, with its weak label.

    The batch is the one train-weak would get with the same options (its defaults are train-weak's).
    """
    from .loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec
    from .loader.peek import batch_sheet

    cfg, run = build(TrainConfig, values), build(RunOptions, values)
    spec = BagSpec(bags=cfg.bags, per_bag=cfg.per_bag)
    loader = TrainLoader(dst, spec, TransformSpec(height=cfg.height, width=cfg.width),
                         LoaderOptions(decoder=run.decoder, workers=0, seed=cfg.seed,
                                       storage_options=run.storage_options))
    if not 0 <= index < len(loader):
        raise UserError(f"--batch must be below {len(loader)} (batches per epoch)")
    loader.load_state_dict({"epoch": 0, "consumed": index})
    batch = next(iter(loader))
    batch_sheet(batch, spec).save(out)
    click.echo(f"wrote {out}: batch {index} of {len(loader)}, {int(batch.valid.sum())} images in {cfg.bags} bags "
               f"({loader.decoder} decoder)")


@cli.command("eval")
@click.argument("dst", required=False)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Extract features with this checkpoint's model.")
@click.option("--query-features", type=click.Path(dir_okay=False), help="Score this feature Parquet file as queries.")
@click.option("--gallery-features", type=click.Path(dir_okay=False), help="... against this one as the gallery.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder for metrics.json, per_query.parquet, cmc.png, ranked.png (and the feature cache). "
                   "Default: eval-SPLIT beside the checkpoint or the query feature file.")
@click.option("--compare", nargs=2, metavar="RUN_A RUN_B", default=None,
              help="Print two runs' metrics side by side (writes nothing).")
@cli_options(EvalOptions)
@click.option("--json", "as_json", is_flag=True,
              help="Print metrics.json instead of the table (with --compare: both runs' metrics and B-A).")
def eval_(dst: str | None, checkpoint: str | None, query_features: str | None, gallery_features: str | None,
          out_dir: str | None, compare: tuple[str, str] | None, as_json: bool, **values) -> None:
    """Evaluate with the official SYSU-30k protocol: rank-1/5/10/20 and both mAPs.

    sysu30k eval DST --checkpoint CKPT [--split test|val] extracts features (cached in the run folder);
    sysu30k eval DST --query-features F --gallery-features F scores any model's features (Parquet: key,
    pid, camid, feature; files with keys only are joined with DST's split manifest);
    sysu30k eval --compare RUN_A RUN_B puts two runs side by side.
    """
    from .evaluation import reports, run

    opts = build(EvalOptions, values)
    if compare:
        if checkpoint or query_features or gallery_features:
            raise UserError("--compare takes two run folders and no other input")
        click.echo(json.dumps(_compared(*compare), indent=1) if as_json else reports.compare(*compare))
        return
    if checkpoint and (query_features or gallery_features):
        raise UserError("give either --checkpoint or --query-features/--gallery-features, not both")
    if checkpoint:
        if not dst:
            raise UserError("--checkpoint needs DST (the packed dataset to extract features from)")
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"eval-{opts.split}")
        metrics = run.evaluate_checkpoint(dst, checkpoint, out_dir, opts)
    elif query_features or gallery_features:
        if not (query_features and gallery_features):
            raise UserError("--query-features and --gallery-features go together")
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(query_features)), f"eval-{opts.split}")
        metrics = run.evaluate_features(dst, query_features, gallery_features, out_dir, opts)
    else:
        raise UserError("nothing to evaluate: give --checkpoint, --query-features/--gallery-features or --compare")
    if int(os.environ.get("RANK", "0")):
        return                                   # under torchrun, rank 0 reports
    if as_json:
        click.echo(json.dumps(metrics, indent=1))
        return
    click.echo(reports.table(metrics["metrics"]))
    if "rerank" in metrics:
        r = metrics["rerank"]
        click.echo(f"\nre-ranked (k1={r['k1']}, k2={r['k2']}, lambda={r['lambda']}; {r['seconds']:.1f} s):")
        click.echo(reports.table(r["metrics"]))
    click.echo(f"wrote {out_dir}/ (metrics.json, per_query.parquet, cmc.png, ranked.png)")


def _compared(run_a: str, run_b: str) -> dict:
    """``eval --compare --json``: the two runs' metrics and B - A of every number both have."""
    from .evaluation.reports import load_metrics

    a, b = load_metrics(run_a)["metrics"], load_metrics(run_b)["metrics"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return {"a": {"run": run_a, "metrics": a}, "b": {"run": run_b, "metrics": b},
            "b_minus_a": {k: b[k] - v for k, v in a.items() if number(v) and number(b.get(k))}}


@cli.command("embed")
@click.argument("images", nargs=-1, required=True)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Any checkpoint eval reads: sysu30k's, the official net_6.pth, torchvision ResNet-50 weights; or "
                   "a model.onnx of sysu30k export (run with onnxruntime on the CPU).")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="The feature Parquet file.")
@cli_options(EvalOptions, only=("feature", "batch", "device", "height", "width", "flip", "normalize"))
def embed(images: tuple[str, ...], checkpoint: str, out_file: str, **values) -> None:
    """Features of your own images: IMAGES are folders, globs, image files or tar shards (webdataset).

    The file (key, pid, camid, feature) opens in pandas or DuckDB and in eval --query-features/--gallery-features;
    SYSU-30k test names (<id>_c<cam>_<k>.jpg) keep their labels, other images are keyed by their path.
    """
    from .evaluation.embed import embed_images

    got = embed_images(list(images), checkpoint, out_file, build(EvalOptions, values))
    click.echo(f"wrote {out_file}: {got['images']} images, {got['dim']}-d {got['feature']} features of a "
               f"{got['format']} checkpoint{' (ONNX, onnxruntime CPU)' if got.get('onnx') else ''} "
               f"({'labelled from file names' if got['labelled'] else 'keys only'})")


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The ONNX file to write (its name ends in .onnx).")
@cli_options(ExportOptions)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(checkpoint: str, out_file: str, as_json: bool, **values) -> None:
    """Write CHECKPOINT's network (any format eval reads) as an ONNX model computing embed's features.

    The graph takes ImageNet-normalised RGB float32 images [batch, 3, H, W] (any batch; H x W fixed: the
    checkpoint's or --height/--width) and returns L2(f(x) + f(flip(x))) of the chosen feature f, as eval and
    embed compute it; sysu30k embed --checkpoint model.onnx runs it with onnxruntime on the CPU.
    """
    from .model.export import export_onnx

    got = export_onnx(checkpoint, out_file, build(ExportOptions, values))
    if as_json:
        click.echo(json.dumps(got, indent=1))
        return
    check = "" if got["max_deviation"] is None else f"; onnxruntime vs PyTorch max |diff| {got['max_deviation']:.1e}"
    click.echo(f"wrote {got['out']}: the {got['dim']}-d {got['feature']} feature of {checkpoint} ({got['format']} "
               f"format), input {got['input']} [batch, 3, {got['height']}, {got['width']}], opset {got['opset']}, "
               f"{got['bytes'] / 1e6:.1f} MB{check}")


def _run_folder(f):
    """The run folder and the config file of a training command (the first options)."""
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE.toml",
                     help="Read options from this TOML file (keys are option names, e.g. per_bag = 16); flags "
                          "given on the command line override it.")(f)
    return click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                        help="Run folder: checkpoints, metrics.jsonl, config.json. An existing run resumes.")(f)


def _how_to_run(f):
    """How a training command runs (the last options): RunOptions and --overwrite."""
    f = click.option("--overwrite", is_flag=True, help="Delete an existing run in --out and start over.")(f)
    return cli_options(RunOptions)(f)


def _start_run(ctx: click.Context, values: dict) -> tuple[str, dict, RunOptions]:
    """(run folder, the command's values with its config file applied, RunOptions); deletes the run folder
    first when asked to."""
    import shutil

    values = apply_config(ctx, values, values.pop("config_file"))
    out_dir = values.pop("out_dir")
    if values.pop("overwrite") and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    return out_dir, values, build(RunOptions, values)


def _done(out_dir: str) -> None:
    """The closing line: best.pt and the val rank-1 it was kept for (read from best.pt itself)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from .model.checkpoint import load

    best = os.path.join(out_dir, "best.pt")
    if not os.path.exists(best):
        click.echo(f"done: {out_dir}/last.pt (no best.pt: no epoch had a finite validation)")
        return
    rank1 = load(best).get("best_rank1")
    click.echo(f"done: {best}" + (f" (val rank-1 {rank1:.3f})" if rank1 is not None else ""))


@cli.command("train-weak")
@click.argument("dst")
@_run_folder
@cli_options(TrainConfig)
@_how_to_run
@click.pass_context
def train_weak(ctx: click.Context, dst: str, **values) -> None:
    """Train a ReID model on DST from bag-level labels only (Differentiable Graphical Learning).

    Checkpoints every epoch and on SIGTERM; rerun the same command to resume exactly. With
    `sysu30k split --val-folders N` done first, each epoch is validated and best.pt kept by val rank-1.
    Several GPUs: torchrun --nproc-per-node N -m sysu30k train-weak ...
    """
    from .train.weak import train

    out_dir, values, run = _start_run(ctx, values)
    train(dst, out_dir, build(TrainConfig, values), run)
    _done(out_dir)


_SSG_FIELDS = {f.name for f in dataclasses.fields(SSGConfig)} - {"model", "stage"}
_SSG_NOTES = {k: f"adapt {getattr(SSGConfig, k)}, source {v}" for k, v in SOURCE_DEFAULTS.items()}


@cli.command("train-ssg")
@click.argument("dst")
@_run_folder
@cli_options(SSGConfig, defaults=False, notes=_SSG_NOTES)
@click.option("--truth", type=click.Path(exists=True, dir_okay=False),
              help="A synth truth.csv: NMI/ARI of every clustering round, and SSG++'s annotator.")
@_how_to_run
@click.pass_context
def train_ssg(ctx: click.Context, dst: str, truth: str | None, **values) -> None:
    """Self-similarity Grouping: a source-stage model adapted to DST by clustering (no labels on DST).

    \b
    sysu30k train-ssg SRC_DST --stage source --out src-run
    sysu30k train-ssg TGT_DST --init src-run/last.pt --source SRC_DST --out ssg-run [--truth truth.csv]

    Unset options take the released code's settings for the stage (the source stage's differ where the
    help says so). Checkpoints every epoch and on SIGTERM; rerun the same command to resume exactly.
    With `sysu30k split --val-folders N` on DST, each clustering round ends with a validation and best.pt
    is kept by val rank-1.
    """
    from .model.config import ModelConfig
    from .synth.truth import read_truth
    from .train.ssg.train import train

    out_dir, values, run = _start_run(ctx, values)
    stage = values.get("stage") or SSGConfig.stage
    model_given = [k for k in ("arch", "embedding", "pretrained") if values.get(k) is not None]
    if stage == "adapt" and model_given:
        raise UserError(f"--{model_given[0]} is the source stage's: adaptation takes the architecture of --init")
    cfg = SSGConfig.for_stage(stage, model=build(ModelConfig, values, head="ssg"),
                              **{k: v for k, v in values.items() if k in _SSG_FIELDS})
    labels = {k: t for k, (t, _) in read_truth(truth, dst, run.storage_options).items()} if truth else None
    train(dst, out_dir, cfg, run, labels)
    _done(out_dir)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    code = 0
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):    # Click turns Ctrl-C into Abort; SIGTERM comes as either
        click.echo("interrupted: rerun the same command to resume", err=True)
        code = 130
    except click.UsageError as exc:              # a bad flag or value: one line, like every user error
        where = exc.ctx.command_path if exc.ctx else "sysu30k"
        message = " ".join(exc.format_message().split())
        click.echo(f"{where}: error: {message} (see {where} --help)", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except UserError as exc:
        click.echo(f"sysu30k: error: {exc}", err=True)
        code = 2
    except OSError as exc:                         # the machine said no: a full disk, a missing folder, permissions
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"sysu30k: error: {exc.strerror or exc}{where}", err=True)
        code = 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Every output is written and closed by now. Skip the interpreter's teardown, where a native
    # thread pool (seen once in 7 loaded runs of `shard`) can abort a finished run with SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
