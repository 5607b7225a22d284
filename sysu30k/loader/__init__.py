"""Data loading: bag-structured or identity-sampled training batches and ordered evaluation batches from packed
shards, and ``peek``'s picture of a batch.

The public API (``from sysu30k.loader import TrainLoader, EvalLoader, BagSpec, TransformSpec, LoaderOptions,
Batch``) is imported lazily, so :mod:`.config` (the decoder choices) is light to import. May import
``sysu30k.io``, the manifest contract and ``sysu30k.split.holdout`` (the folders training skips).
"""

from ..lazy import exports

_WHERE = {
    "BagSpec": "sampler", "Batch": "loader", "DECODERS": "config", "EvalLoader": "loader",
    "GroupLoader": "loader", "GroupSpec": "groups", "LoaderOptions": "loader", "TrainLoader": "loader",
    "TransformSpec": "transforms", "decoder_field": "config", "resolve_decoder": "loader"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
