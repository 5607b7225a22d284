"""Evaluation with the official SYSU-30k protocol: feature extraction and files, exact chunked scoring,
reports (metrics.json, CMC and ranked-list PNGs, per-query Parquet), the ``sysu30k eval`` command's logic."""

from ..lazy import exports

_WHERE = {
    "FeatureSet": "features", "Scores": "scoring", "ap_from_ranks": "scoring",
    "extract_features": "features", "read_features": "features", "score": "scoring",
    "write_features": "features"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
