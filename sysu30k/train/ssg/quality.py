"""How good a round of self-similarity grouping is: clusters and outliers per view, the images kept for
training, and (when the true identities are known, e.g. synthetic data) NMI and ARI of the global
clusters against them, over the kept images."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

VIEWS = ("g", "up", "low")


def clustering_quality(labels: np.ndarray, truth: list[int] | None = None) -> dict:
    """Figures for ``labels`` [3, N] (−1 = outlier); ``truth`` (one identity per image, −1 unknown) adds
    ``nmi``/``ari`` of the global clusters on the kept images that have a known identity."""
    keep = (labels >= 0).all(0)
    out: dict = {"images": int(labels.shape[1]), "kept": int(keep.sum())}
    for name, lab in zip(VIEWS, labels):
        out[f"clusters_{name}"] = int(len(np.unique(lab[lab >= 0])))
        out[f"outliers_{name}"] = int((lab < 0).sum())
    if truth is not None:
        t = np.asarray(truth, np.int64)
        known = keep & (t >= 0)
        out["true_ids"] = int(len(np.unique(t[t >= 0])))
        if known.sum() > 1:
            out["nmi"] = float(normalized_mutual_info_score(t[known], labels[0][known]))
            out["ari"] = float(adjusted_rand_score(t[known], labels[0][known]))
    return out
