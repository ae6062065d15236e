"""FineTuneBaseline (Baseline / Baseline++): pre-training on global labels, a new head per task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_metalearn.learners import FineTuneBaseline
from monai_metalearn.networks import ConvEncoder3D, CosineClassifier

from .synthetic import TaskFamily, random_episode


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_adapt_freezes_encoder_and_fits_support(head):
    torch.manual_seed(0)
    enc = ConvEncoder3D(features=(4, 8), norm="batch")
    learner = FineTuneBaseline(enc, 8, n_base_classes=5, head=head, finetune_steps=100, finetune_lr=0.1)
    assert isinstance(learner.base_head, CosineClassifier if head == "cosine" else nn.Linear)
    family = TaskFamily(noise=0.1)
    sx, sy, qx, qy = family.episode(n_way=3, k_shot=3)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    predictor = learner.adapt(sx, sy)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights and BatchNorm running stats untouched
    assert (predictor(sx).argmax(1) == sy).all(), "the new head should fit the support set"
    assert predictor(qx).shape == (9, 3)
    assert not predictor(qx).requires_grad
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    assert metrics["loss"] == pytest.approx(loss.item()) and not loss.requires_grad


def test_pretrain_step_trains_encoder_and_base_head():
    torch.manual_seed(1)
    learner = FineTuneBaseline(ConvEncoder3D(features=(4, 8)), 8, n_base_classes=16, head="cosine")
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    x, y = TaskFamily().flat_batch(8)
    before = [p.detach().clone() for p in learner.parameters()]
    metrics = learner.pretrain_step(x, y, opt)
    assert set(metrics) == {"loss", "accuracy"}
    assert all(not torch.equal(p, b) for p, b in zip(learner.parameters(), before))
    assert learner(x).shape == (8, 16)
    with pytest.raises(ValueError, match="outside 0..15"):
        learner.pretrain_step(x, y + 16, opt)
    # outer_step on an episode with global ids is a pre-training step on support + query together
    sx, qx = x[:4], x[4:]
    sy, qy = y[:4], y[4:]
    torch.manual_seed(2)
    a = FineTuneBaseline(ConvEncoder3D(features=(4, 8)), 8, n_base_classes=16, head="cosine")
    b = FineTuneBaseline(ConvEncoder3D(features=(4, 8)), 8, n_base_classes=16, head="cosine")
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    assert a.outer_step(sx, sy, qx, qy, oa) == b.pretrain_step(x, y, ob)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    a.meta_batch_step([(sx, sy, qx, qy)], oa)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="outside 0..15"):
        a.outer_step(sx, sy + 16, qx, qy, oa)
    with pytest.raises(ValueError, match="head"):
        FineTuneBaseline(nn.Flatten(), 8, 4, head="mlp")
