"""SSG++ (SSG.md §3): one labelled image per global cluster, nearest-labelled-neighbour labels for the
rest, and a second, growing supervised stream trained beside the cluster stream.

At iteration ``plus_from`` one random member of each global cluster is annotated (the annotator is
``truth``: the benchmark's oracle, as the released code's ``--sample cluster``). From then on, every
iteration labels each unlabelled image with its nearest labelled image under the re-ranked distance
0.7·Jaccard + 0.3·‖u − l‖² on the jointly normalised 6144-d feature (the Jaccard term from the same
sparse k-reciprocal sets as the clustering, over the whole target set) and keeps the
(it + 1)·⌊|U| / iterations⌋ most confident, so the stream covers all of U by the last iteration. Its
loss is T(e; y) + Σ_v T(f_v; y), one label for every view, added to the SSG loss at each step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ...errors import UserError
from ...loader import GroupLoader, GroupSpec, LoaderOptions, TransformSpec
from ..loop import Session
from .losses import view_triplet

log = logging.getLogger("sysu30k")
JACCARD_WEIGHT = 0.7


def annotate(labels_g: np.ndarray, seed: int, iteration: int) -> np.ndarray:
    """Indices of one randomly chosen member of each global cluster (outliers are never chosen)."""
    rng = np.random.default_rng([seed, iteration, 0x2B2B])
    clusters = np.unique(labels_g[labels_g >= 0])
    return np.array([rng.choice(np.flatnonzero(labels_g == c)) for c in clusters], np.int64)


def nearest_labelled(joint: torch.Tensor, labelled: np.ndarray, k1: int, k2: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """For every image: the position (in ``labelled``) of its nearest labelled image and that distance,
    0.7·d_J + 0.3·‖x − l‖² on the L2-normalised ``joint`` features."""
    from .rerank import ssg_distance

    stored = ssg_distance(joint, None, k1, k2, lam=0.0, device=device).matrix.tocsc()[:, labelled].tocoo()
    jac = np.ones((len(joint), len(labelled)))     # unstored pairs share no support: d_J = 1
    jac[stored.row, stored.col] = stored.data
    lab = joint[torch.from_numpy(labelled)]
    sq = (2 - 2 * (joint @ lab.T)).clamp_min(0).numpy()
    d = JACCARD_WEIGHT * jac + (1 - JACCARD_WEIGHT) * sq
    return d.argmin(1), d.min(1)


class PlusStream:
    """The second stream of one iteration: its labels, its loader, and the loss of one of its batches."""

    def __init__(self, s: Session, cfg, dst_url: str, keys: list[str], labels: np.ndarray, truth: dict[str, int],
                 iteration: int, options: LoaderOptions, excluded: frozenset[int], transform: TransformSpec,
                 features: torch.Tensor | None):
        """``features``: this iteration's target features (:func:`.train.train_features`, ``keys`` order),
        from which the stream's labels are made; None when resuming, the labels being in ``s.extra``."""
        self.s, self.cfg = s, cfg
        if "plus_labelled" not in s.extra:
            s.extra["plus_labelled"] = torch.from_numpy(annotate(labels[0], cfg.seed, iteration))
        labelled = s.extra["plus_labelled"].numpy()
        if features is not None:
            joint = torch.nn.functional.normalize(features, dim=1)
            nearest, dist = nearest_labelled(joint, labelled, cfg.k1, cfg.k2, s.device)
            ids = np.array([truth.get(keys[i], -1) for i in labelled], np.int64)
            unlabelled = np.setdiff1d(np.arange(len(keys)), labelled)
            take = min((iteration + 1) * (len(unlabelled) // cfg.iterations), len(unlabelled))
            chosen = unlabelled[np.argsort(dist[unlabelled], kind="stable")[:take]]
            targets = np.full(len(keys), -1, np.int64)
            targets[labelled] = ids
            targets[chosen] = ids[nearest[chosen]]
            s.extra["plus_targets"] = torch.from_numpy(targets)
            s.extra.pop("plus_loader", None)
            truth_all = np.array([truth.get(k, -1) for k in keys])
            log.info("SSG++: %d labelled, %d of %d unlabelled images pseudo-labelled (%.1f%% correct)",
                     len(labelled), len(chosen), len(unlabelled),
                     100 * float((targets[chosen] == truth_all[chosen]).mean()) if len(chosen) else 0.0)
        self.targets = s.extra["plus_targets"].to(s.device)
        self.index = {k: i for i, k in enumerate(keys)}
        stream = {k: int(t) for k, t in zip(keys, s.extra["plus_targets"].tolist()) if t >= 0}
        self.loader = GroupLoader(dst_url, stream, GroupSpec(cfg.groups, cfg.per_group), transform, options, excluded)
        if len(self.loader) == 0:
            raise UserError(f"SSG++: the labelled stream has fewer than --groups {cfg.groups} identities")
        if "plus_loader" in s.extra:
            self.loader.load_state_dict(s.extra["plus_loader"])
        self._batches = iter(self.loader)

    def _next(self):
        try:
            return next(self._batches)
        except StopIteration:                       # the second stream cycles
            self.loader.set_epoch(self.loader.epoch + 1)
            self._batches = iter(self.loader)
            return next(self._batches)

    def loss(self, fwd) -> torch.Tensor:
        """L_os of the stream's next batch; its position is saved with every checkpoint."""
        b = self._next().to(self.s.device, torch.float32)
        self.s.extra["plus_loader"] = self.loader.state_dict()
        out = fwd(b.images)
        y = self.targets[torch.tensor([self.index[k] for k in b.keys], device=self.s.device)]
        m, mining = self.cfg.margin, self.cfg.mining
        return (view_triplet(out["emb"], b.bag, y, m, mining) + view_triplet(out["feat"], b.bag, y, m, mining)
                + view_triplet(out["up"], b.bag, y, m, mining) + view_triplet(out["low"], b.bag, y, m, mining))

    def close(self) -> None:
        """Stop the stream's loader workers."""
        self._batches = iter(())
