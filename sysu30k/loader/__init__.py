"""Data loading: bag-structured training batches and ordered evaluation batches from packed shards."""

from .loader import DECODERS, Batch, EvalLoader, LoaderOptions, TrainLoader, resolve_decoder
from .sampler import BagSpec
from .transforms import TransformSpec

__all__ = ["DECODERS", "Batch", "BagSpec", "EvalLoader", "LoaderOptions", "TrainLoader", "TransformSpec",
           "resolve_decoder"]
