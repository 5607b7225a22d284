"""The options of ``sysu30k split``, declared once, and the shape of the held-out blocks."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt, storage_option_field

VAL_BLOCK = 25                            # held-out folders per contiguous block, at most
GUARD = 2                                 # guard folders on each side of a block: impurity reaches k±2


@dataclass(frozen=True)
class SplitOptions:
    """The options of ``sysu30k split`` (and the defaults of :func:`build_splits`)."""

    val_folders: int = opt(0, "Training folders to hold out for a val split (0: test split only).", min=0)
    val_block: int = opt(VAL_BLOCK, f"Held-out folders per contiguous block; each block gets {GUARD} guard folders on "
                         "each side.", min=1)
    val_distractors: float = opt(0.5, "Fraction of held-out blocks that give only distractors (the rest give "
                                 "--val-queries queries per folder).", min=0, max=1, max_open=True)
    val_queries: int = opt(1, "Queries per val query folder: its N images with the lowest seeded hash, at most all "
                           "but one (the rest are its true matches). Rank-1 that ranks epochs needs >= 50 queries.",
                           min=1)
    seed: int = opt(0, "Seed of the val folders and val queries.", min=0)
    expected: str = opt("auto", "Counts the test split must have. official: 1,000 queries / 479,730 gallery images; "
                        "auto: official, or a synthetic tree's own counts when the source DST was packed from holds a "
                        "synth.json (sysu30k synth); none: no count check; Q,G: those counts.", flag="--expect",
                        metavar="auto|official|none|Q,G")
    strict: bool = opt(False, "Make broken invariants and count deviations an error (exit 2).")
    scheduler: str | None = opt(None, "Use this Dask scheduler instead of a local cluster ('sync': no cluster, in "
                                "this process).", metavar="tcp://HOST:PORT")
    workers: int = opt(2, "Workers of the local Dask cluster.", min=1)
    storage_options: dict = storage_option_field()
