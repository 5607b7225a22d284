"""Identity-sampled batch plans: P groups × K images, for training on (pseudo-)identity labels.

This is open-reid's ``RandomIdentitySampler`` as SSG uses it (SSG.md §2.6): an epoch visits every group
once, in random order, taking K of its images (drawn with replacement when it has fewer than K); P
groups make a batch and an incomplete last batch is dropped. Groups are training folders (a labelled
source dataset: folder = identity) or cluster labels (SSG's pseudo-identities). Images with a negative
group take no part. The plan of an epoch is a pure function of (labels, seed, epoch), so every rank
and worker derives the same list and takes its own slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampler import BatchPlan


@dataclass(frozen=True)
class GroupSpec:
    """Batch shape: ``groups`` groups (P) of ``per_group`` images (K)."""

    groups: int = 32
    per_group: int = 4

    @property
    def batch_size(self) -> int:
        return self.groups * self.per_group


def group_batches(labels: np.ndarray, spec: GroupSpec) -> int:
    """Batches per epoch: ⌊K·#groups / batch size⌋ (every group once, the last partial batch dropped)."""
    n_groups = len(np.unique(labels[labels >= 0]))
    return (n_groups * spec.per_group) // spec.batch_size


def plan_group_epoch(shard: np.ndarray, row: np.ndarray, labels: np.ndarray, spec: GroupSpec, seed: int,
                     epoch: int) -> list[BatchPlan]:
    """All batch plans of one epoch; image i is at (``shard[i]``, ``row[i]``) and belongs to ``labels[i]``.

    ``BatchPlan.bag`` is the group's block within the batch and ``labels`` lists each block's group.
    """
    rng = np.random.default_rng([seed, epoch, 0x5356])
    keep = np.flatnonzero(labels >= 0)
    order = np.argsort(labels[keep], kind="stable")
    members = np.split(keep[order], np.flatnonzero(np.diff(labels[keep][order])) + 1) if len(keep) else []
    groups = np.array([int(labels[m[0]]) for m in members], np.int64)
    visit = rng.permutation(len(members))
    picks = []
    for g in visit:
        m = members[g]
        picks.append(rng.choice(m, spec.per_group, replace=len(m) < spec.per_group))
    plans = []
    for b in range(len(picks) // spec.groups):
        block = picks[b * spec.groups:(b + 1) * spec.groups]
        idx = np.concatenate(block)
        plans.append(BatchPlan(shard[idx].astype(np.int32), row[idx].astype(np.int32),
                               np.repeat(np.arange(spec.groups, dtype=np.int32), spec.per_group),
                               np.ones(len(idx), bool),
                               [(int(groups[g]),) for g in visit[b * spec.groups:(b + 1) * spec.groups]]))
    return plans
