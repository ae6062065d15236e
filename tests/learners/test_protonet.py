"""ProtoNet: prototypes, distances, both interfaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_metalearn.learners import ProtoNet, compute_prototypes
from monai_metalearn.networks import ConvEncoder3D

from .synthetic import random_episode


def _clusters(n_way=3, k=4, q=5, dim=4, spread=0.05, seed=0):
    """Well-separated clusters as 1x1xdim 'volumes' (encoder = flatten)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(n_way, dim) * 5.0 + 1.0
    def draw(m):
        y = torch.arange(n_way).repeat_interleave(m)
        x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
        return x.view(len(y), 1, 1, 1, dim), y
    return (*draw(k), *draw(q))


def test_prototypes_are_class_means():
    torch.manual_seed(0)
    f = torch.randn(7, 5)
    y = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    protos = compute_prototypes(f, y)
    for c in range(3):
        torch.testing.assert_close(protos[c], f[y == c].mean(0))
    with pytest.raises(ValueError, match="missing"):
        compute_prototypes(f, torch.tensor([0, 0, 2, 2, 2, 2, 2]))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_logits_and_perfect_accuracy_on_separated_clusters(distance):
    sx, sy, qx, qy = _clusters()
    learner = ProtoNet(nn.Flatten(), distance=distance, scale=7.0)
    predictor = learner.adapt(sx, sy)
    protos = torch.stack([sx.flatten(1)[sy == c].mean(0) for c in range(3)])
    torch.testing.assert_close(predictor.prototypes, protos)
    q = qx.flatten(1)
    if distance == "euclidean":
        expected = -torch.cdist(q, protos) ** 2
    else:
        expected = 7.0 * F.cosine_similarity(q[:, None], protos[None], dim=-1)
    torch.testing.assert_close(predictor(qx), expected, rtol=1e-4, atol=1e-4)
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    assert metrics["accuracy"] == 1.0
    torch.testing.assert_close(loss, F.cross_entropy(expected, qy), rtol=1e-4, atol=1e-4)
    # easyfsl's two calls
    learner.process_support_set(sx, sy)
    assert (learner(qx).argmax(1) == qy).all()


def test_meta_loss_trains_the_encoder_and_forward_needs_support():
    torch.manual_seed(1)
    enc = ConvEncoder3D(features=(4, 8))
    learner = ProtoNet(enc, distance="cosine", learn_scale=True)
    with pytest.raises(RuntimeError, match="process_support_set"):
        learner(torch.randn(2, 1, 8, 8, 8))
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = [p.detach().clone() for p in enc.parameters()]
    metrics = learner.outer_step(*random_episode(size=8), opt)
    assert set(metrics) == {"loss", "accuracy"}
    assert learner.scale.grad is not None
    assert all(not torch.equal(p, b) for p, b in zip(enc.parameters(), before))
    with pytest.raises(ValueError, match="distance"):
        ProtoNet(enc, distance="manhattan")
