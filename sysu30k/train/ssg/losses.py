"""SSG's losses (SSG.md §1 and §2.7): cross-entropy + batch-hard triplet for the source stage, and the
four triplet terms of the adaptation stage, T(e; y_g) + T(f_g; y_g) + T(f_up; y_up) + T(f_low; y_low).

Distances are Euclidean on un-normalised features (sqrt clamped at 1e-12), margin 0.5. ``semi`` is the
released code's mining: within each block of K images of one global cluster every ordered pair (a, p),
p after a, is a positive pair and a's negative distance is its nearest sample whose label *under this
view* differs (so for the part terms a "positive" may carry another part label, as in the original).
``hard`` is the paper's plain batch-hard triplet per view. Anchors without a negative are skipped
(the original crashes there, SSG issue #27).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances of the rows of ``x``."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()


def batch_hard_triplet(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Mean over anchors of relu(hardest positive − hardest negative + margin); anchors lacking either skipped."""
    d = euclidean(feat)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=feat.device)
    pos, neg = same & ~eye, ~same
    ok = pos.any(1) & neg.any(1)
    if not ok.any():
        return feat.sum() * 0.0
    hardest_pos = d.masked_fill(~pos, float("-inf")).max(1).values
    hardest_neg = d.masked_fill(~neg, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[ok].mean()


def block_triplet(feat: torch.Tensor, block: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """The released code's variant: positives are later samples of the anchor's block, negatives the
    nearest sample with another label; mean hinge over all (anchor, positive) pairs."""
    d = euclidean(feat)
    n = len(block)
    later = torch.triu(torch.ones(n, n, dtype=torch.bool, device=feat.device), diagonal=1)
    pairs = later & (block[:, None] == block[None, :])
    neg = labels[:, None] != labels[None, :]
    d_an = d.masked_fill(~neg, float("inf")).min(1).values
    pairs &= neg.any(1)[:, None]
    if not pairs.any():
        return feat.sum() * 0.0
    a, p = pairs.nonzero(as_tuple=True)
    return F.relu(d[a, p] - d_an[a] + margin).mean()


def view_triplet(feat: torch.Tensor, block: torch.Tensor, labels: torch.Tensor, margin: float,
                 mining: str) -> torch.Tensor:
    """One triplet term under ``mining`` (``semi``: :func:`block_triplet`, ``hard``: :func:`batch_hard_triplet`)."""
    if mining == "semi":
        return block_triplet(feat, block, labels, margin)
    if mining == "hard":
        return batch_hard_triplet(feat, labels, margin)
    raise ValueError(f"unknown mining {mining!r}")


def source_loss(out: dict[str, torch.Tensor], classes: torch.Tensor, margin: float = 0.5) -> dict[str, torch.Tensor]:
    """Source stage: cross-entropy on the logits + batch-hard triplet on the pooled feature, equal weights."""
    terms = {"ce": F.cross_entropy(out["logits"], classes), "triplet": batch_hard_triplet(out["feat"], classes, margin)}
    terms["total"] = terms["ce"] + terms["triplet"]
    return terms


def ssg_loss(out: dict[str, torch.Tensor], block: torch.Tensor, y_g: torch.Tensor, y_up: torch.Tensor,
             y_low: torch.Tensor, margin: float = 0.5, mining: str = "semi") -> dict[str, torch.Tensor]:
    """Adaptation stage: the four triplet terms on (emb, y_g), (feat, y_g), (up, y_up), (low, y_low)."""
    terms = {"emb": view_triplet(out["emb"], block, y_g, margin, mining),
             "global": view_triplet(out["feat"], block, y_g, margin, mining),
             "up": view_triplet(out["up"], block, y_up, margin, mining),
             "low": view_triplet(out["low"], block, y_low, margin, mining)}
    terms["total"] = terms["emb"] + terms["global"] + terms["up"] + terms["low"]
    return terms
