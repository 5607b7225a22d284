"""What ``sysu30k synth`` generates, declared once (light to import)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..options import check, opt

HEIGHTS = (144, 288)
RELEASE_PARTS = 3   # training archives of --release unless --parts says otherwise


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: sizes of the training and test sets, image height, folder impurity, style and seed."""

    folders: int = opt(100, "Training folders (identities).", min=1)
    images_per_folder: int = opt(16, "Mean images per training folder.", min=1)
    folder_size_jitter: float = opt(0.5, "Spread of the folder sizes around the mean (fraction of it).", min=0, max=1)
    test_ids: int = opt(50, "Query/gallery identities (one query and one true match each).", min=0)
    distractors: int = opt(200, "Gallery distractors (0000others).", min=0)
    height: int = opt(144, "Image height in pixels (width is half of it).", choices=HEIGHTS)
    impurity: float = opt(0.2, "Fraction of a folder's images that show a neighbouring identity (k±1, k±2).",
                          min=0, max=1)
    style: int = opt(0, "Visual style (camera casts, backgrounds).", min=0)
    seed: int = opt(0, "Seed of everything drawn.", min=0)
    id_offset: int = opt(0, "Added to every identity before rendering: another domain with people unseen in this one.",
                         min=0)
    bag_json: bool = opt(True, "Write bag_level_label.json (without it, bags follow the folder rule).",
                         flag="--bag-json/--no-bag-json")
    quality: int = opt(90, "JPEG quality of the written images.", min=1, max=100)
    release: bool = opt(False, "Write the release packaging as downloaded: train/…_partN.tar, test/…tar, lists at "
                        "the root.")
    parts: int | None = opt(None, "Training archives of --release.", min=1, default_note=str(RELEASE_PARTS))

    def __post_init__(self) -> None:
        """Reject settings that cannot describe a dataset (the declared ranges and choices), and --parts without
        --release, which would otherwise be ignored."""
        check(self)
        if self.parts is not None and not self.release:
            raise UserError("--parts needs --release (it sets how many training archives the release has)")
        if self.release and self.release_parts > self.folders:
            raise UserError(f"--release with {self.release_parts} parts (--parts) needs at least as many --folders, "
                            f"not {self.folders}")

    @property
    def release_parts(self) -> int:
        """The number of training archives --release writes."""
        return RELEASE_PARTS if self.parts is None else self.parts
