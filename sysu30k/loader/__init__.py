"""Data loading: bag-structured or identity-sampled training batches and ordered evaluation batches from packed shards."""

from ..lazy import exports

_WHERE = {
    "BagSpec": "sampler", "Batch": "loader", "DECODERS": "config", "EvalLoader": "loader",
    "GroupLoader": "loader", "GroupSpec": "groups", "LoaderOptions": "loader", "TrainLoader": "loader",
    "TransformSpec": "transforms", "decoder_field": "config", "resolve_decoder": "loader"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
