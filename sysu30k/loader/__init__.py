"""Data loading: bag-structured or identity-sampled training batches and ordered evaluation batches from packed shards."""

from .groups import GroupSpec
from .loader import DECODERS, Batch, EvalLoader, GroupLoader, LoaderOptions, TrainLoader, resolve_decoder
from .sampler import BagSpec
from .transforms import TransformSpec

__all__ = ["DECODERS", "Batch", "BagSpec", "EvalLoader", "GroupLoader", "GroupSpec", "LoaderOptions", "TrainLoader", "TransformSpec",
           "resolve_decoder"]
