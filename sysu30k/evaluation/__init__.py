"""Evaluation with the official SYSU-30k protocol: ``config`` (the options of ``sysu30k eval``), feature
extraction and files, exact chunked scoring, reports (metrics.json, CMC and ranked-list PNGs, per-query
Parquet) and ``run`` (the command's logic, and the trainers' per-epoch validation).

Rebuilds networks through ``sysu30k.model``, never through the trainer; may import ``sysu30k.io``,
``sysu30k.loader``, ``sysu30k.model`` and the manifest contract. Public names are exported lazily.
"""

from ..lazy import exports

_WHERE = {
    "FeatureSet": "features", "Scores": "scoring", "ap_from_ranks": "scoring",
    "extract_features": "features", "read_features": "features", "score": "scoring",
    "write_features": "features"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
