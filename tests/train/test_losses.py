"""The DGL loss terms against hand-computed cases."""

import math

import pytest
import torch

from sysu30k.train.config import LossWeights
from sysu30k.train.losses import (
    bag_classes,
    method_loss,
    pairwise_loss,
    pseudo_labels_argmax,
    pseudo_labels_balanced,
    unary_loss,
    weak_triplet_loss,
)


def test_argmax_pseudo_labels_never_leave_the_bag_label_set():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 5
    labels = torch.randint(1, 51, (64, 3))
    labels[::4, 1:] = -1                                       # some single-folder bags
    classes = bag_classes(labels)
    pseudo = pseudo_labels_argmax(logits, classes)
    for i in range(64):
        allowed = classes[i][classes[i] >= 0]
        assert pseudo[i] in allowed
        assert logits[i, pseudo[i]] == logits[i, allowed].max()
    logits[0, 7] = 1e4                                         # the global argmax is outside the bag
    assert pseudo_labels_argmax(logits, torch.tensor([[2, 3, -1]] + [[1, -1, -1]] * 63))[0] in (2, 3)


def test_balanced_assignment_quotas():
    # one bag of 6 images, labels {classes 0, 1, 2}: quota 2 each, even though every image prefers class 0
    logits = torch.tensor([[9.0, 1, 0], [8, 2, 0], [7, 0, 3], [6, 5, 0], [5, 0, 4], [4, 3, 2]])
    classes = torch.tensor([[0, 1, 2]] * 6)
    got = pseudo_labels_balanced(logits, classes, torch.zeros(6, dtype=torch.long))
    assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]
    assert got[:2].tolist() == [0, 0]                          # the two strongest class-0 votes are locked
    # round 2: class 2 wins 2 of 4 votes (4 vs 1)... see below
    assert got.tolist() == [0, 0, 2, 1, 2, 1]


def test_balanced_assignment_per_bag_and_uneven_sizes():
    torch.manual_seed(1)
    logits = torch.randn(15, 20)
    classes = torch.tensor([[3, 4, 5]] * 9 + [[7, -1, -1]] * 6)
    bag = torch.tensor([0] * 9 + [1] * 6)
    got = pseudo_labels_balanced(logits, classes, bag)
    assert torch.bincount(got[:9], minlength=20)[[3, 4, 5]].tolist() == [3, 3, 3]
    assert (got[9:] == 7).all()
    assert set(pseudo_labels_balanced(logits[:7], classes[:7], bag[:7]).tolist()) <= {3, 4, 5}


def test_pairwise_term_vanishes_when_pseudo_labels_agree_and_matches_formula():
    torch.manual_seed(2)
    logits, app = torch.randn(5, 4), torch.randn(5, 3)
    valid = torch.ones(5, dtype=torch.bool)
    assert pairwise_loss(logits, app, torch.zeros(5, dtype=torch.long), valid) == 0
    pseudo = torch.tensor([0, 1, 0, 2, 1])
    p = torch.softmax(logits, 1)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            if pseudo[i] != pseudo[j]:
                expected += math.exp(-float(((app[i] - app[j]) ** 2).sum()) / 0.5) * -float(p[i] @ p[j])
    assert pairwise_loss(logits, app, pseudo, valid, sigma=0.5) == pytest.approx(expected / 25, rel=1e-5)


def test_pairwise_median_bandwidth_follows_the_data_scale():
    torch.manual_seed(4)
    logits, pseudo = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    valid = torch.ones(6, dtype=torch.bool)
    far = torch.randn(6, 64) * 10                              # squared distances in the thousands
    assert abs(float(pairwise_loss(logits, far, pseudo, valid, sigma=1.0))) < 1e-12   # fixed sigma: no signal
    auto = float(pairwise_loss(logits, far, pseudo, valid, sigma=0))
    assert auto < -1e-3                                        # the median bandwidth restores it
    assert auto == pytest.approx(float(pairwise_loss(logits * 1, far / 10, pseudo, valid, sigma=0)), rel=1e-4)


def test_pairwise_gradient_pulls_similar_images_together():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    app = torch.zeros(2, 3)                                    # identical appearance
    pairwise_loss(logits, app, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool)).backward()
    # descending the gradient raises image 0's class-1 score and image 1's class-0 score: posteriors agree more
    assert logits.grad[0, 1] < 0 and logits.grad[1, 0] < 0


def test_weak_triplet_with_median_positive():
    feat = torch.tensor([[0.0, 0], [1, 0], [3, 0], [10, 0]])
    labels = torch.tensor([[1, 2], [1, 2], [2, -1], [9, -1]])  # 0,1,2 overlap; 3 is disjoint
    classes = bag_classes(labels)
    valid = torch.ones(4, dtype=torch.bool)
    d = torch.cdist(feat, feat)
    expected = []
    for i, pos in enumerate([[0, 1, 2], [0, 1, 2], [0, 1, 2], [3]]):
        neg = [k for k in range(4) if k not in pos]
        expected.append(max(0.0, float(d[i, pos].median()) - float(d[i, neg].min()) + 1.2))
    assert weak_triplet_loss(feat, classes, valid) == pytest.approx(sum(expected) / 4)
    assert weak_triplet_loss(feat, bag_classes(torch.tensor([[1, -1]] * 4)), valid) == 0   # no negatives


def test_methods_combine_their_terms():
    torch.manual_seed(3)
    out = {"logits": torch.randn(6, 10, requires_grad=True), "appearance": torch.randn(6, 4),
           "feat": torch.randn(6, 8, requires_grad=True)}
    labels = torch.tensor([[1, 2, 3]] * 3 + [[5, -1, -1]] * 3)
    bag, folder = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1, 2, 3, 5, 5, 5])
    valid = torch.tensor([True] * 5 + [False])
    w = LossWeights(pairwise=0.5, triplet=3.0)
    dgl = method_loss("dgl", out, labels, bag, folder, valid, w)
    assert dgl["total"].item() == pytest.approx((dgl["unary"] + 0.5 * dgl["pairwise"] + 3.0 * dgl["triplet"]).item())
    folder_terms = method_loss("folder", out, labels, bag, folder, valid, w)
    assert folder_terms["total"].item() == pytest.approx(unary_loss(out["logits"], folder - 1, valid).item())
    oracle = method_loss("dgl", out, labels, bag, folder, valid, w, targets=torch.tensor([0, 0, 0, 4, 4, 4]))
    assert set(oracle) == {"unary", "total"}
    dgl["total"].backward()
    assert out["feat"].grad is not None and out["logits"].grad[5].abs().sum() == 0   # invalid slot: no gradient


def test_warm_up_steps_take_the_folders_as_pseudo_labels():
    """A warm-up step of dgl/unary: cross-entropy against each image's own folder, other dgl terms unchanged;
    after it, the in-bag argmax (which here differs from the folder for image 0)."""
    logits = torch.full((4, 6), -5.0)
    logits[0, 2] = 5.0                                   # image 0 (folder 1) looks like class 2 (folder 3)
    out = {"logits": logits, "appearance": torch.randn(4, 3), "feat": torch.randn(4, 5)}
    labels = torch.tensor([[1, 2, 3]] * 4)
    bag, folder, valid = torch.zeros(4, dtype=torch.long), torch.tensor([1, 1, 2, 3]), torch.ones(4, dtype=torch.bool)
    for method in ("dgl", "unary"):
        warm = method_loss(method, out, labels, bag, folder, valid, warm=True)
        assert float(warm["unary"]) == pytest.approx(float(unary_loss(logits, folder - 1, valid)))
        cold = method_loss(method, out, labels, bag, folder, valid)
        assert float(cold["unary"]) < float(warm["unary"])
    warm, cold = (method_loss("dgl", out, labels, bag, folder, valid, warm=w) for w in (True, False))
    assert float(warm["triplet"]) == pytest.approx(float(cold["triplet"]))
