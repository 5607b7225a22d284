"""The options of ``sysu30k eval``, declared once (light to import: no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from ..errors import UserError
from ..io.device import device_field
from ..loader.config import decoder_field
from ..model.config import FEATURES
from ..options import ByteSize, check, opt, storage_option_field

SPLITS = ("test", "val")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # --precision: torch dtype names
RERANK_DEFAULT = (20, 6, 0.3)   # k1, k2, λ: the re-ranking paper's (Zhong et al. 2017) and the toolkits' defaults


def rerank_params(value) -> tuple[int, int, float]:
    """(k1, k2, λ) from ``"20,6,0.3"`` or a sequence of three numbers; a UserError saying what is wrong."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if len(parts) != 3:
        raise UserError(f"--rerank takes K1,K2,LAMBDA (e.g. {','.join(map(str, RERANK_DEFAULT))}), not {value!r}")
    try:
        k1, k2, lam = int(str(parts[0])), int(str(parts[1])), float(parts[2])
    except (TypeError, ValueError):
        raise UserError(f"--rerank takes K1,K2,LAMBDA: two integers and a number, not {value!r}") from None
    if k1 < 1 or k2 < 1 or not 0 <= lam <= 1:
        raise UserError(f"--rerank needs K1 >= 1, K2 >= 1 and LAMBDA in [0, 1], not {k1},{k2},{lam}")
    return k1, k2, lam


class RerankType(click.ParamType):
    """The ``--rerank`` value K1,K2,LAMBDA (a TOML list of three numbers in a config file)."""

    name = "K1,K2,LAMBDA"

    def convert(self, value, param, ctx) -> tuple[int, int, float]:
        try:
            return rerank_params(value)
        except UserError as exc:
            self.fail(f"{exc}; give DST before --rerank, whose value is optional" if isinstance(value, str)
                      and "," not in value else str(exc), param, ctx)


@dataclass(frozen=True)
class EvalOptions:
    """How ``sysu30k eval`` extracts and scores: the defaults of :func:`evaluate_checkpoint` and
    :func:`evaluate_features`."""

    split: str = opt("test", "Which split of DST/manifests/split.parquet to evaluate (or to join keys-only feature "
                     "files with).", choices=SPLITS)
    device: str = device_field("auto (GPU when present), cpu, cuda, cuda:1 ...")
    chunk: int | None = opt(None, "Gallery images per similarity block (memory: queries x CHUNK x 16 bytes).", min=1,
                            default_note="64 MB of block on the CPU, 256 MB on a GPU")
    batch: int = opt(128, "Extraction batch size.", min=1)
    workers: int = opt(2, "Loader processes for extraction (0: in this process).", min=0)
    decoder: str = decoder_field()
    height: int | None = opt(None, "Extraction: resize height (bicubic).", min=8,
                             default_note="the checkpoint's training height (256 for the paper recipe, the official "
                             "evaluator's size)")
    width: int | None = opt(None, "Extraction: resize width.", min=8, default_note="the checkpoint's training width")
    feature: str = opt("auto", "The feature compared: logits (the classifier output: the official feature), pool "
                       "(the 2048-d pooled last stage; the flip's is added before the one L2, as for every feature, "
                       "where the self-supervised script normalises the image's first), neck (train-weak's BN-neck "
                       "embedding) or auto (logits for the official model, neck for train-weak, SSG's test feature "
                       "for train-ssg, pool for torchvision weights).", choices=FEATURES)
    memory_budget: int = opt(4 << 30, "Hold the split's features in memory (and cache them in the run folder) when "
                             "they fit in this many bytes; otherwise score the gallery as it is extracted (feature "
                             "files: as the gallery file is read).",
                             min=1, type=ByteSize(), default_note="4GiB")
    save_features: bool = opt(False, "Also write the features when they are scored as extracted (the official "
                              "28,310-d feature of the test set takes 54 GB); under torchrun the ranks' parts are "
                              "joined into the file one process writes.")
    precision: str = opt("fp32", "Extraction arithmetic: fp32, or bf16/fp16 autocast (weights stay float32; "
                         "faster on a GPU, features differ from fp32 by about 1e-2). Part of the feature cache key.",
                         choices=tuple(PRECISIONS))
    flip: bool = opt(True, "Add the flipped image's feature.")
    normalize: bool = opt(True, "L2-normalise features.")
    show: tuple[str, ...] = opt((), "Query key for ranked.png (repeatable).", multiple=True, metavar="KEY",
                                default_note="the worst queries")
    worst: int = opt(6, "Worst queries drawn in ranked.png when no --show.", min=0)
    rerank: tuple[int, int, float] | None = opt(
        None, "Also score with k-reciprocal re-ranking (exact, at full gallery size; the features must fit "
        "--memory-budget): both results go into metrics.json. The bare flag takes the paper's K1,K2,LAMBDA.",
        type=RerankType(), flag_value=",".join(map(str, RERANK_DEFAULT)), metavar="[K1,K2,LAMBDA]",
        default_note="off; bare flag: " + ",".join(map(str, RERANK_DEFAULT)))
    storage_options: dict = storage_option_field()

    def __post_init__(self) -> None:
        check(self)
        if self.rerank is not None:
            object.__setattr__(self, "rerank", rerank_params(self.rerank))
