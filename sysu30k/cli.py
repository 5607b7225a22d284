"""The ``sysu30k`` command line: a thin Click layer over the library functions."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import click

from . import __version__
from .release.constants import SUBSETS
from .errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ByteSize(click.ParamType):
    """A byte count with an optional unit: 256MB, 1.5GiB, 500k, 4096."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m[2].lower() not in _UNITS:
            self.fail(f"{value!r} is not a size such as 256MB, 1GiB or 500000", param, ctx)
        return int(float(m[1]) * _UNITS[m[2].lower()])


def _subsets(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sysu30k")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
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
@click.option("--folders", default=100, show_default=True, help="Training folders (identities).")
@click.option("--images-per-folder", default=16, show_default=True, help="Mean images per training folder.")
@click.option("--test-ids", default=50, show_default=True, help="Query/gallery identities (one query and one true match each).")
@click.option("--distractors", default=200, show_default=True, help="Gallery distractors (0000others).")
@click.option("--height", type=click.Choice(["144", "288"]), default="144", show_default=True,
              help="Image height in pixels (width is half of it).")
@click.option("--impurity", default=0.2, show_default=True,
              help="Fraction of a folder's images that show a neighbouring identity (k±1, k±2).")
@click.option("--style", default=0, show_default=True, help="Visual style (camera casts, backgrounds).")
@click.option("--seed", default=0, show_default=True)
@click.option("--id-offset", default=0, show_default=True,
              help="Added to every identity before rendering: another domain with people unseen in this one.")
@click.option("--no-bag-json", is_flag=True, help="Do not write bag_level_label.json (bags then follow the folder rule).")
@click.option("--workers", default=1, show_default=True, help="Processes.")
def synth(out: str, folders: int, images_per_folder: int, test_ids: int, distractors: int, height: str,
          impurity: float, style: int, seed: int, id_offset: int, no_bag_json: bool, workers: int) -> None:
    """Write a SYSU-30k-shaped synthetic dataset to OUT (deterministic by seed).

    The tree follows the released layout; OUT/truth.csv holds the true identity of every training
    image (for oracle benchmarks only; the pipeline never reads it).
    """
    from .synth import SynthConfig, write_synth

    cfg = SynthConfig(folders=folders, images_per_folder=images_per_folder, test_ids=test_ids,
                      distractors=distractors, height=int(height), impurity=impurity, style=style, seed=seed,
                      id_offset=id_offset, bag_json=not no_bag_json)
    s = write_synth(out, cfg, workers=workers, progress=True)
    click.echo(f"wrote {s.train_images} training images in {s.folders} folders, {s.query_images} queries, "
               f"{s.gallery_images} gallery images ({s.distractors} distractors), {s.bytes / 1e6:.1f} MB "
               f"to {s.root} in {s.seconds:.1f} s")


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--shard-size", type=ByteSize(), default="256MB", show_default=True,
              help="Target tar size per shard (planned from source sizes).")
@click.option("--shard-count", default=100_000, show_default=True, help="Maximum images per shard.")
@click.option("--resize", type=int, default=None, metavar="PX",
              help="Scale images so the long side is PX (e.g. 144); never upscales.")
@click.option("--quality", default=95, show_default=True, help="JPEG quality of re-encoded images.")
@click.option("--verify", type=click.Choice(["full", "header"]), default="full", show_default=True,
              help="full: decode every image; header: parse headers and check the JPEG end marker (faster).")
@click.option("--max-pixels", default=89_478_485, show_default=True,
              help="Reject larger images as decompression bombs.")
@click.option("--subsets", default=",".join(SUBSETS), show_default=True, callback=_subsets,
              help="Which subsets to pack.")
@click.option("--workers", default=1, show_default=True, help="Local worker processes (one shard per task).")
@click.option("--scheduler", metavar="tcp://HOST:PORT",
              help="Pack on this existing Dask cluster (one task per shard) instead of local processes.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="Passed to the filesystem of a remote SRC/DST (repeatable; JSON values allowed). "
                   "S3 endpoint, region and keys come from the standard AWS variables and config.")
@click.option("--retries", default=5, show_default=True, help="Retries of a transient storage fault (backoff).")
@click.option("--overwrite", is_flag=True, help="Delete previous output in DST and start over.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shard(src: str, dst: str, shard_size: int, shard_count: int, resize: int | None, quality: int, verify: str,
          max_pixels: int, subsets: tuple[str, ...], workers: int, scheduler: str | None,
          storage_options: tuple[str, ...], retries: int, overwrite: bool, as_json: bool) -> None:
    """Pack the SYSU-30k tree SRC into WebDataset shards and Parquet manifests under DST.

    SRC and DST are local paths or URLs such as s3://bucket/prefix. Resumable: rerun the same command
    after an interruption and it continues from the completed shards, ending byte-identical to an
    uninterrupted run.
    """
    from .ingest.imageproc import ImageOptions
    from .ingest.plan import ShardingOptions
    from .io.retry import RetryPolicy
    from .ingest.shard import ShardJob, run_shard
    from .io.storage import parse_options

    job = ShardJob(ShardingOptions(shard_size, shard_count), ImageOptions(verify, resize, quality, max_pixels),
                   subsets)
    summary = run_shard(src, dst, job, workers=workers, overwrite=overwrite,
                        storage_options=parse_options(storage_options), scheduler=scheduler,
                        retry=RetryPolicy(attempts=max(1, retries + 1)))
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"{'subset':<8} {'images':>10} {'rejects':>8} {'shards':>7} {'MB':>10}")
    for subset, s in summary["subsets"].items():
        click.echo(f"{subset:<8} {s['images']:>10} {s['rejects']:>8} {s['shards']:>7} {s['bytes'] / 1e6:>10.1f}")
    if summary["rejects_by_reason"]:
        click.echo("rejects: " + ", ".join(f"{k} {v}" for k, v in summary["rejects_by_reason"].items()))
    click.echo(f"bags: {summary['bags']} ({summary['bag_source']}); manifests in {dst}/manifests/")


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
        click.echo(f"{'ok ' if r.ok else '-- '} {r.name:<14} {r.detail}")


@cli.command()
@click.argument("dst")
@click.option("--val-folders", default=0, show_default=True,
              help="Training folders to hold out for a val split (0: test split only).")
@click.option("--val-block", default=25, show_default=True,
              help="Held-out folders per contiguous block; each block gets 2 guard folders on each side.")
@click.option("--val-distractors", default=0.5, show_default=True,
              help="Fraction of held-out blocks that give only distractors (the rest give one query per folder).")
@click.option("--seed", default=0, show_default=True, help="Seed of the val folders and val queries.")
@click.option("--expect", default="auto", show_default=True, metavar="auto|official|none|Q,G",
              help="Counts the test split must have. official: 1,000 queries / 479,730 gallery images; auto: "
                   "official, or a synthetic tree's own counts when the source DST was packed from holds a "
                   "synth.json (sysu30k synth); none: no count check; Q,G: those counts.")
@click.option("--strict", is_flag=True, help="Make broken invariants and count deviations an error (exit 2).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Use this Dask scheduler instead of a local cluster ('sync': no cluster, in this process).")
@click.option("--workers", default=2, show_default=True, help="Workers of the local Dask cluster.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def split(dst: str, val_folders: int, val_block: int, val_distractors: float, seed: int, expect: str,
          strict: bool, scheduler: str | None, workers: int, as_json: bool) -> None:
    """Build the official test split (and a val split) of DST into DST/manifests/split.parquet.

    Reads DST/manifests/images.parquet (local path or fsspec URL such as s3://...) with Dask, checks
    the protocol's invariants and reports every deviation, and writes split.parquet, holdout.parquet
    (folders a trainer must skip) and split_summary.json.
    """
    from .split.build import build_splits

    s = build_splits(dst, val_folders=val_folders, seed=seed, scheduler=scheduler, strict=strict, expected=expect,
                     val_block=val_block, val_distractors=val_distractors, workers=workers)
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
@click.option("--batch", "index", default=0, show_default=True, help="Which batch of the epoch to show.")
@click.option("--bags", default=12, show_default=True, help="Bags per batch.")
@click.option("--per-bag", default=15, show_default=True, help="Images per bag.")
@click.option("--height", default=256, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "pil", "dali"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
def peek(dst: str, out: str, index: int, bags: int, per_bag: int, height: int, width: int, decoder: str,
         seed: int) -> None:
    """Draw one bag-structured training batch of DST as a PNG: a row per bag, with its weak label."""
    from .loader import BagSpec, LoaderOptions, TrainLoader, TransformSpec
    from .loader.peek import batch_sheet

    spec = BagSpec(bags=bags, per_bag=per_bag)
    loader = TrainLoader(dst, spec, TransformSpec(height=height, width=width),
                         LoaderOptions(decoder=decoder, workers=0, seed=seed))
    if not 0 <= index < len(loader):
        raise UserError(f"--batch must be below {len(loader)} (batches per epoch)")
    loader.load_state_dict({"epoch": 0, "consumed": index})
    batch = next(iter(loader))
    batch_sheet(batch, spec).save(out)
    click.echo(f"wrote {out}: batch {index} of {len(loader)}, {int(batch.valid.sum())} images in {bags} bags "
               f"({loader.decoder} decoder)")


@cli.command("eval")
@click.argument("dst", required=False)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Extract features with this checkpoint's model.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Which split of DST/manifests/split.parquet to evaluate (or to join keys-only feature files with).")
@click.option("--query-features", type=click.Path(dir_okay=False), help="Score this feature Parquet file as queries.")
@click.option("--gallery-features", type=click.Path(dir_okay=False), help="... against this one as the gallery.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder for metrics.json, per_query.parquet, cmc.png, ranked.png (and the feature cache). "
                   "Default: eval-SPLIT beside the checkpoint or the query feature file.")
@click.option("--compare", nargs=2, metavar="RUN_A RUN_B", default=None,
              help="Print two runs' metrics side by side (writes nothing).")
@click.option("--chunk", type=int, default=None,
              help="Queries per similarity block (memory: CHUNK x gallery x 4 bytes). Default: 64 on a GPU, "
                   "up to 384 MB of scores on the CPU.")
@click.option("--device", default="auto", show_default=True, help="auto (GPU when present), cpu, cuda, cuda:1 ...")
@click.option("--show", multiple=True, metavar="KEY", help="Query key for ranked.png (repeatable; default: the worst).")
@click.option("--worst", default=6, show_default=True, help="Worst queries drawn in ranked.png when no --show.")
@click.option("--batch", default=128, show_default=True, help="Extraction batch size.")
@click.option("--workers", default=2, show_default=True, help="Loader processes for extraction.")
@click.option("--height", type=int, help="Extraction: resize height (bicubic). Default: the checkpoint's training "
              "height (256 for the paper recipe, the official evaluator's size).")
@click.option("--width", type=int, help="Extraction: resize width. Default: the checkpoint's training width.")
@click.option("--no-flip", is_flag=True, help="Do not add the flipped image's feature.")
@click.option("--no-normalize", is_flag=True, help="Do not L2-normalise features.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
def eval_(dst: str | None, checkpoint: str | None, split: str, query_features: str | None,
          gallery_features: str | None, out_dir: str | None, compare: tuple[str, str] | None, chunk: int | None,
          device: str,
          show: tuple[str, ...], worst: int, batch: int, workers: int, height: int, width: int, no_flip: bool,
          no_normalize: bool, as_json: bool) -> None:
    """Evaluate with the official SYSU-30k protocol: rank-1/5/10/20 and both mAPs.

    sysu30k eval DST --checkpoint CKPT [--split test|val] extracts features (cached in the run folder);
    sysu30k eval DST --query-features F --gallery-features F scores any model's features (Parquet: key,
    pid, camid, feature; files with keys only are joined with DST's split manifest);
    sysu30k eval --compare RUN_A RUN_B puts two runs side by side.
    """
    import os

    from .evaluation import reports, run

    if compare:
        if checkpoint or query_features or gallery_features:
            raise UserError("--compare takes two run folders and no other input")
        click.echo(reports.compare(*compare))
        return
    if checkpoint and (query_features or gallery_features):
        raise UserError("give either --checkpoint or --query-features/--gallery-features, not both")
    if checkpoint:
        if not dst:
            raise UserError("--checkpoint needs DST (the packed dataset to extract features from)")
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"eval-{split}")
        metrics = run.evaluate_checkpoint(dst, checkpoint, split, out_dir, device=device, chunk=chunk, batch=batch,
                                          workers=workers, flip=not no_flip, normalize=not no_normalize, height=height,
                                          width=width, show=show, worst=worst)
    elif query_features or gallery_features:
        if not (query_features and gallery_features):
            raise UserError("--query-features and --gallery-features go together")
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(query_features)), f"eval-{split}")
        metrics = run.evaluate_features(dst, query_features, gallery_features, out_dir, split=split, device=device,
                                        chunk=chunk, show=show, worst=worst)
    else:
        raise UserError("nothing to evaluate: give --checkpoint, --query-features/--gallery-features or --compare")
    if as_json:
        click.echo(json.dumps(metrics, indent=1))
        return
    click.echo(reports.table(metrics["metrics"]))
    click.echo(f"wrote {out_dir}/ (metrics.json, per_query.parquet, cmc.png, ranked.png)")


_RUN_OPTIONS = [
    click.option("--decoder", type=click.Choice(["auto", "pil", "dali"]), default="auto", show_default=True),
    click.option("--workers", default=2, show_default=True, help="DataLoader worker processes per GPU/process."),
    click.option("--device", help="cpu, cuda or cuda:N (default: the local GPU when there is one)."),
    click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                 help="For datasets in object storage (repeatable)."),
    click.option("--log-every", default=10, show_default=True, help="Steps between JSONL step records."),
    click.option("--keep-every", default=0, show_default=True,
                 help="Also keep checkpoints/epoch-NNN.pt every N epochs (last.pt is rewritten every epoch)."),
    click.option("--overwrite", is_flag=True, help="Delete an existing run in --out and start over."),
]


def _run_options(f):
    """The options of every training command that say how to run, not what to train."""
    for option in reversed(_RUN_OPTIONS):
        f = option(f)
    return f


def _start_run(out_dir: str, overwrite: bool, decoder: str, workers: int, device: str | None,
               storage_options: tuple[str, ...], log_every: int, keep_every: int):
    """The RunOptions of a training command (after deleting ``out_dir`` when asked to)."""
    import shutil

    from .train.loop import RunOptions
    from .io.storage import parse_options

    if overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    return RunOptions(decoder=decoder, workers=workers, device=device, log_every=log_every, keep_every=keep_every,
                      storage_options=parse_options(storage_options))


@cli.command("train-weak")
@click.argument("dst")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.jsonl, config.json. An existing run resumes.")
@click.option("--method", type=click.Choice(["dgl", "unary", "folder"]), default="dgl", show_default=True,
              help="dgl: unary + pairwise + weak triplet; unary: the released SYSU-30k recipe; folder: baseline.")
@click.option("--arch", type=click.Choice(["resnet50", "resnet18"]), default="resnet50", show_default=True)
@click.option("--embedding", default=2048, show_default=True, help="Embedding size (the BN-neck feature).")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False),
              help="ImageNet weights: a torchvision state_dict file (random initialisation without it).")
@click.option("--epochs", default=8, show_default=True)
@click.option("--bags", default=12, show_default=True, help="Bags per batch (windows of 1, 3, 5 folders mixed).")
@click.option("--per-bag", default=15, show_default=True, help="Images per bag.")
@click.option("--height", default=256, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="Backbone learning rate.")
@click.option("--head-lr-mult", default=10.0, show_default=True, help="Learning-rate factor of neck and classifier.")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--lr-steps", default="", help="Epochs at which the learning rate is multiplied by 0.1, e.g. 40,70.")
@click.option("--pairwise-weight", default=2.0, show_default=True)
@click.option("--triplet-weight", default=2.0, show_default=True)
@click.option("--sigma", default=1.0, show_default=True,
              help="Bandwidth of the pairwise appearance kernel; 0 = the batch median of squared distances.")
@click.option("--margin", default=1.2, show_default=True, help="Weak triplet margin.")
@click.option("--warmup-epochs", default=0, show_default=True,
              help="dgl/unary: pseudo-labels are the images' folders for the first N epochs, so the in-bag argmax "
                   "starts from a classifier that already names people (useful without ImageNet weights).")
@click.option("--pad", type=click.IntRange(min=0), default=None,
              help="Random-crop padding in pixels  [10 × width / 128]")
@click.option("--erase-p", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Random-erasing probability.")
@click.option("--resample", is_flag=True, help="Exact bag windows with repeated images, instead of exactly-once epochs.")
@click.option("--seed", default=0, show_default=True)
@_run_options
def train_weak(dst: str, out_dir: str, method: str, arch: str, embedding: int, pretrained: str | None, epochs: int,
               bags: int, per_bag: int, height: int, width: int, optimizer: str, lr: float, head_lr_mult: float,
               weight_decay: float, lr_steps: str, pairwise_weight: float, triplet_weight: float, sigma: float,
               margin: float, warmup_epochs: int, pad: int | None, erase_p: float, resample: bool, seed: int,
               decoder: str, workers: int, device: str | None, storage_options: tuple[str, ...], log_every: int,
               keep_every: int, overwrite: bool) -> None:
    """Train a ReID model on DST from bag-level labels only (Differentiable Graphical Learning).

    Checkpoints every epoch and on SIGTERM; rerun the same command to resume exactly. With
    `sysu30k split --val-folders N` done first, each epoch is validated and best.pt kept by val rank-1.
    Several GPUs: torchrun --nproc-per-node N -m sysu30k train-weak ...
    """
    from .train.losses import LossWeights
    from .model.network import ModelConfig
    from .train.weak import TrainConfig, train

    try:
        steps = tuple(int(x) for x in lr_steps.split(",") if x.strip())
    except ValueError:
        raise UserError("--lr-steps takes comma-separated epochs, e.g. 40,70") from None
    run = _start_run(out_dir, overwrite, decoder, workers, device, storage_options, log_every, keep_every)
    cfg = TrainConfig(method=method, model=ModelConfig(arch=arch, embedding=embedding, pretrained=pretrained),
                      epochs=epochs, bags=bags, per_bag=per_bag, height=height, width=width, optimizer=optimizer,
                      lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay, lr_steps=steps,
                      pad=pad, erase_p=erase_p, warmup_epochs=warmup_epochs,
                      weights=LossWeights(pairwise_weight, triplet_weight, sigma, margin), resample=resample,
                      seed=seed)
    record = train(dst, out_dir, cfg, run)
    val = {k: v for k, v in record.items() if k.startswith("val_")}
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"done: {out_dir}/best.pt" + (f" (val rank-1 {val['val_rank1']:.3f})" if "val_rank1" in val else ""))


@cli.command("train-ssg")
@click.argument("dst")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.jsonl (epochs and clustering rounds), config.json. Resumes.")
@click.option("--stage", type=click.Choice(["source", "adapt"]), default="adapt", show_default=True,
              help="source: supervised on a labelled DST (folder = identity); adapt: SSG on an unlabelled DST.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False),
              help="adapt: the source-stage checkpoint to start from (its architecture is used).")
@click.option("--source", "source_dst", metavar="SRC_DST",
              help="adapt: the packed source dataset whose features enter the distance (the λ term).")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False),
              help="A synth truth.csv: NMI/ARI of every clustering round, and SSG++'s annotator.")
@click.option("--arch", type=click.Choice(["resnet50", "resnet18"]), default="resnet50", show_default=True,
              help="source stage only.")
@click.option("--embedding", default=2048, show_default=True, help="source stage only: the FC embedding size.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False),
              help="source stage: ImageNet weights (a torchvision state_dict file).")
@click.option("--epochs", type=int, help="source stage: epochs  [150]")
@click.option("--decay-from", type=int, help="source stage: epoch after which the lr decays to 0.001×  [100]")
@click.option("--iterations", type=int, help="adapt: clustering rounds  [30]")
@click.option("--epochs-per-iteration", type=int, help="adapt: epochs after each clustering  [70]")
@click.option("--groups", type=int, help="Identities (clusters) per batch, P  [source 16, adapt 32]")
@click.option("--per-group", type=int, help="Images per identity, K  [source 8, adapt 4]")
@click.option("--height", type=int, help="Input height  [256]")
@click.option("--width", type=int, help="Input width  [128]")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), help="[source adam, adapt sgd]")
@click.option("--lr", type=float, help="[source 3e-4, adapt 6e-5]")
@click.option("--head-lr-mult", type=float, help="Learning-rate factor of the new layers  [source 3, adapt 1]")
@click.option("--weight-decay", type=float, help="[5e-4]")
@click.option("--margin", type=float, help="Triplet margin  [0.5]")
@click.option("--mining", type=click.Choice(["semi", "hard"]),
              help="semi: the released code's block pairs; hard: batch-hard per view  [semi]")
@click.option("--k1", type=int, help="k-reciprocal neighbours  [20]")
@click.option("--k2", type=int, help="Query-expansion neighbours  [6]")
@click.option("--lambda", "lam", type=float, help="Weight of the source term in the distance  [0.1]")
@click.option("--rho", type=float, help="eps = mean of the smallest rho fraction of pairwise distances  [1.6e-3]")
@click.option("--min-samples", type=int, help="DBSCAN min_samples (the point included)  [4]")
@click.option("--plus-from", type=int, help="SSG++: add the one-label-per-cluster stream from this iteration  [off]")
@click.option("--seed", type=int, help="[1]")
@_run_options
def train_ssg(dst: str, out_dir: str, stage: str, init: str | None, source_dst: str | None, truth: str | None,
              arch: str, embedding: int, pretrained: str | None, decoder: str, workers: int, device: str | None,
              storage_options: tuple[str, ...], log_every: int, keep_every: int, overwrite: bool, **settings) -> None:
    """Self-similarity Grouping: a source-stage model adapted to DST by clustering (no labels on DST).

    \b
    sysu30k train-ssg SRC_DST --stage source --out src-run
    sysu30k train-ssg TGT_DST --init src-run/last.pt --source SRC_DST --out ssg-run [--truth truth.csv]

    Unset options take the released code's settings for the stage (in brackets). Checkpoints every
    epoch and on SIGTERM; rerun the same command to resume exactly. With `sysu30k split --val-folders N`
    on DST, each clustering round ends with a validation and best.pt is kept by val rank-1.
    """
    from .model.network import ModelConfig
    from .train.ssg.train import SSGConfig, train
    from .synth.truth import read_truth

    run = _start_run(out_dir, overwrite, decoder, workers, device, storage_options, log_every, keep_every)
    cfg = SSGConfig.for_stage(stage, init=init, source=source_dst,
                              model=ModelConfig(arch=arch, embedding=embedding, pretrained=pretrained, head="ssg"),
                              **settings)
    labels = {k: t for k, (t, _) in read_truth(truth, dst, run.storage_options).items()} if truth else None
    record = train(dst, out_dir, cfg, run, labels)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f" (val rank-1 {record['val_rank1']:.3f})" if "val_rank1" in record else ""
        click.echo(f"done: {out_dir}/best.pt{val}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    code = 0
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except UserError as exc:
        click.echo(f"sysu30k: error: {exc}", err=True)
        code = 2
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Every output is written and closed by now. Skip the interpreter's teardown, where a native
    # thread pool (seen once in 7 loaded runs of `shard`) can abort a finished run with SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
