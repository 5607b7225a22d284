"""Evaluation with the official SYSU-30k protocol: feature extraction and files, exact chunked scoring,
reports (metrics.json, CMC and ranked-list PNGs, per-query Parquet), the ``sysu30k eval`` command's logic."""

from .features import FeatureSet, extract_features, read_features, write_features
from .scoring import Scores, ap_from_ranks, score

__all__ = ["FeatureSet", "Scores", "ap_from_ranks", "extract_features", "read_features", "score", "write_features"]
