"""The weakly supervised losses of Differentiable Graphical Learning (SYSU30K.md §4), one function each.

Labels: a bag's label is a set of folder ids; the classifier's class of folder ``f`` is ``f - 1``.
``bag_labels`` is [N, L] folder ids padded with -1 (each image carries its bag's label set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossWeights


def bag_classes(bag_labels: torch.Tensor) -> torch.Tensor:
    """Folder ids → class indices, keeping the -1 padding."""
    return torch.where(bag_labels >= 0, bag_labels - 1, bag_labels)


def pseudo_labels_argmax(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """ŷ_i = argmax over the bag's label set of the classifier's score (the full DGL model, §4.4)."""
    scores = logits.detach().gather(1, classes.clamp(min=0)).masked_fill(classes < 0, float("-inf"))
    return classes.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


def pseudo_labels_balanced(logits: torch.Tensor, classes: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """The released recipe's greedy balanced assignment (``mySelect``, §4.3), bag by bag.

    With m distinct labels and n images, quota q = n // m. m rounds: every unlocked image votes for its
    best still-open label; the label with most votes (ties: smallest class) takes all its voters, its q
    best voters (by logit) are locked, and the label closes. Unlocked images may be re-assigned later.
    """
    logits = logits.detach()
    out = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    for b in torch.unique(bag).tolist():
        idx = torch.nonzero(bag == b).squeeze(1)
        labels = torch.unique(classes[idx[0]][classes[idx[0]] >= 0])
        sub = logits[idx][:, labels]                                  # [n, m]
        n, m = sub.shape
        quota = n // m
        assigned = torch.zeros(n, dtype=torch.long, device=logits.device)
        locked = torch.zeros(n, dtype=torch.bool, device=logits.device)
        open_ = torch.ones(m, dtype=torch.bool, device=logits.device)
        for _ in range(m):
            voters = ~locked
            if not voters.any():
                break
            votes = sub.masked_fill(~open_, float("-inf")).argmax(1)
            counts = torch.bincount(votes[voters], minlength=m).masked_fill(~open_, -1)
            winner = int(counts.argmax())
            chosen = voters & (votes == winner)
            assigned[chosen] = winner
            ranked = torch.nonzero(chosen).squeeze(1)
            best = ranked[sub[ranked, winner].argsort(descending=True)[:quota]]
            locked[best] = True
            open_[winner] = False
        out[idx] = labels[assigned]
    return out


def unary_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against (pseudo-)labels, over valid images."""
    return F.cross_entropy(logits[valid], targets[valid])


def pairwise_loss(logits: torch.Tensor, appearance: torch.Tensor, pseudo: torch.Tensor, valid: torch.Tensor,
                  sigma: float = 1.0) -> torch.Tensor:
    """L_p = 1/N² Σ_ij exp(-‖a_i - a_j‖² / σ) · (−p_iᵀp_j) · 1[ŷ_i ≠ ŷ_j]  (§4.4): images that look alike
    but got different pseudo-labels are pulled toward the same class posterior. Zero when labels agree.

    σ = 1 is the released code's value, tuned to its descriptor's scale; ``sigma <= 0`` takes the batch
    median of the squared distances instead (with σ = 1 on our layer-1 descriptors, whose median squared
    distance was measured at 9-17, the kernel averages 0.003-0.013 and the term does nothing)."""
    p = F.softmax(logits[valid].float(), dim=1)
    a = appearance[valid].float()
    d2 = torch.cdist(a, a).pow(2).detach()
    if sigma <= 0:                                     # the median heuristic: the kernel's scale follows the data
        off = d2[~torch.eye(len(d2), dtype=torch.bool, device=d2.device)]
        sigma = float(off.median()) if off.numel() else 1.0
    kernel = torch.exp(-d2 / max(sigma, 1e-12))
    differ = (pseudo[valid][:, None] != pseudo[valid][None, :]).float()
    n = p.shape[0]
    return -(kernel * differ * (p @ p.T)).sum() / max(n * n, 1)


def weak_triplet_loss(feat: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor,
                      margin: float = 1.2) -> torch.Tensor:
    """L_wt = mean_i max(0, median_{j∈pos(i)} d_ij − min_{k∈neg(i)} d_ik + m)  (§4.4).

    Positives share a bag label (the label sets overlap, i itself included); negatives have disjoint
    labels. The median, not the hardest positive, tolerates positives that are in fact other people.
    """
    f, c = feat[valid].float(), classes[valid]
    ids = torch.unique(c[c >= 0])
    hot = (c[:, :, None] == ids[None, None, :]).any(1).float()      # [n, U] multi-hot bag labels
    positive = (hot @ hot.T) > 0
    d = torch.cdist(f, f)
    has_neg = (~positive).any(1)
    if not has_neg.any():
        return feat.sum() * 0.0
    med = torch.stack([d[i][positive[i]].median() for i in range(len(d))])
    hardest_neg = d.masked_fill(positive, float("inf")).min(1).values
    return F.relu(med - hardest_neg + margin)[has_neg].mean()


def method_loss(method: str, out: dict[str, torch.Tensor], bag_labels: torch.Tensor, bag: torch.Tensor,
                folder: torch.Tensor, valid: torch.Tensor, w: LossWeights = LossWeights(),
                targets: torch.Tensor | None = None, warm: bool = False) -> dict[str, torch.Tensor]:
    """The loss terms of ``method`` and their weighted ``total``.

    dgl: argmax pseudo-labels, unary + pairwise + weak triplet. unary: the released SYSU-30k recipe,
    balanced pseudo-labels and cross-entropy only. folder: each image labelled with its own folder.
    ``targets`` (class per image) overrides the labels, e.g. for an oracle trained on true identities.
    ``warm``: a warm-up step, whose pseudo-labels are the images' own folders (every other term unchanged).
    """
    logits, classes = out["logits"], bag_classes(bag_labels)
    own = folder - 1                                   # each image's own folder, as a class
    if targets is not None or method == "folder":
        labels = targets if targets is not None else own
        terms = {"unary": unary_loss(logits, labels, valid)}
    elif method == "unary":
        pseudo = own if warm else pseudo_labels_balanced(logits, classes, bag)
        terms = {"unary": unary_loss(logits, pseudo, valid)}
    elif method == "dgl":
        pseudo = own if warm else pseudo_labels_argmax(logits, classes)
        terms = {"unary": unary_loss(logits, pseudo, valid),
                 "pairwise": pairwise_loss(logits, out["appearance"], pseudo, valid, w.sigma),
                 "triplet": weak_triplet_loss(out["feat"], classes, valid, w.margin)}
    else:
        raise ValueError(f"unknown method {method!r}")
    terms["total"] = (terms["unary"] + w.pairwise * terms.get("pairwise", 0.0)
                      + w.triplet * terms.get("triplet", 0.0))
    return terms
