"""The options of ``sysu30k eval``, declared once (light to import: no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..io.device import device_field
from ..loader.config import decoder_field
from ..model.config import FEATURES
from ..options import ByteSize, check, opt, storage_option_field

SPLITS = ("test", "val")


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
    flip: bool = opt(True, "Add the flipped image's feature.")
    normalize: bool = opt(True, "L2-normalise features.")
    show: tuple[str, ...] = opt((), "Query key for ranked.png (repeatable).", multiple=True, metavar="KEY",
                                default_note="the worst queries")
    worst: int = opt(6, "Worst queries drawn in ranked.png when no --show.", min=0)
    storage_options: dict = storage_option_field()

    def __post_init__(self) -> None:
        check(self)
