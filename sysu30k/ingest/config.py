"""The options of ``sysu30k shard``, declared once (default, help, range): how shards are cut, how images
are checked and re-encoded, what is packed, and how the job runs. Light to import (no pyarrow, no
torch), so the command line can build its options from them at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from PIL import Image

from ..errors import UserError
from ..options import ByteSize, Listed, check, opt, storage_option_field
from ..release.constants import SUBSETS

VERIFY_MODES = ("full", "header")
MAX_SOURCE_BYTES = 64 << 20      # a source file larger than this is rejected (too-large) unread: SYSU-30k's are ~3 KB


@dataclass(frozen=True)
class ShardingOptions:
    """Where shards are cut: at most ``shard_count`` images and about ``shard_size`` bytes of tar."""

    shard_size: int = opt(256 * 10**6, "Target tar size per shard (planned from source sizes).", min=1024,
                          type=ByteSize(), default_note="256MB")
    shard_count: int = opt(100_000, "Maximum images per shard.", min=1)


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and transformed (the shard command's --verify/--resize/--quality/--max-pixels)."""

    verify: str = opt("full", "full: decode every image; header: parse headers and check the JPEG end marker "
                      "(faster).", choices=VERIFY_MODES)
    resize: int | None = opt(None, "Scale images so the long side is PX (e.g. 144); never upscales.", min=8,
                             metavar="PX")
    quality: int = opt(95, "JPEG quality of re-encoded images.", min=1, max=100)
    max_pixels: int = opt(Image.MAX_IMAGE_PIXELS or 89_478_485, "Reject larger images as decompression bombs.", min=1)


@dataclass(frozen=True)
class ShardJob:
    """What to pack and how: the options that decide the output bytes."""

    sharding: ShardingOptions = field(default_factory=ShardingOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    subsets: tuple[str, ...] = opt(SUBSETS, "Which subsets to pack (comma-separated).", type=Listed(str, "LIST"))
    labels: bool = opt(True, "Pack KEY.json (subset; folder, or pid/camid/distractor) beside each KEY.jpg, so "
                       "webdataset, Hugging Face datasets and DALI readers get labels without the manifests.",
                       flag="--labels/--no-labels")

    def settings(self) -> dict:
        """The options as plain data, recorded in the plan and compared on resume."""
        return {"sharding": asdict(self.sharding), "image": asdict(self.image), "subsets": list(self.subsets),
                "labels": self.labels}

    def check(self) -> None:
        """Raise UserError for options that cannot work."""
        check(self.image)
        check(self.sharding)
        unknown = set(self.subsets) - set(SUBSETS)
        if unknown or not self.subsets:
            raise UserError(f"--subsets takes a comma-separated choice of {', '.join(SUBSETS)}")


@dataclass(frozen=True)
class ShardRun:
    """How to run a shard job (not part of its output): where the work runs, storage options, retries."""

    workers: int = opt(1, "Local worker processes (one shard per task).", min=1)
    scheduler: str | None = opt(None, "Pack on this existing Dask cluster (one task per shard) instead of local "
                                "processes.", metavar="tcp://HOST:PORT")
    storage_options: dict = storage_option_field("Passed to the filesystem of a remote SRC/DST (repeatable; JSON "
                                                 "values allowed). S3 endpoint, region and keys come from the "
                                                 "standard AWS variables and config.")
    retries: int = opt(5, "Retries of a transient storage fault (backoff).", min=0)
    strict: bool = opt(False, "A damaged archive (truncated or corrupt download) is an error; by default what it "
                       "holds before the damage is packed and the images it lost are rejects.",
                       flag="--strict/--no-strict")
