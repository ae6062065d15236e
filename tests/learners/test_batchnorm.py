"""BatchNorm in inner loops: per-task batch statistics, running statistics never updated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_metalearn.learners import ANIL, FOMAML, MAML, MetaSGD, ProtoNet, Reptile
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier, batch_norm_mode, has_batch_norm, monai_backbone

from .synthetic import random_episode


def _bn_model() -> FewShotClassifier:
    torch.manual_seed(0)
    model = FewShotClassifier(ConvEncoder3D(features=(4, 8), norm="batch"), 8, 3, zero_init_head=False)
    with torch.no_grad():  # non-trivial running statistics, so using them would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def test_batch_norm_mode_switches_and_restores():
    bn = nn.BatchNorm3d(2)
    bn.running_mean.fill_(5.0)
    x = torch.randn(4, 2, 3, 3, 3)
    bn.eval()
    with batch_norm_mode(bn, "transductive"):
        out = bn(x)
        assert bn.training and not bn.track_running_stats
    assert not bn.training and bn.track_running_stats
    torch.testing.assert_close(out, nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
    assert torch.all(bn.running_mean == 5.0) and int(bn.num_batches_tracked) == 0
    bn.train()
    with batch_norm_mode(bn, "frozen"):
        out = bn(x)
    assert bn.training
    expected = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False)
    torch.testing.assert_close(out, expected)
    assert torch.all(bn.running_mean == 5.0)
    with pytest.raises(ValueError, match="batch_norm"):
        with batch_norm_mode(bn, "train"):
            pass
    assert has_batch_norm(bn) and not has_batch_norm(nn.GroupNorm(1, 2))


LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.1, inner_steps=2),
    "fomaml": lambda m: FOMAML(m, inner_lr=0.1, inner_steps=2),
    "anil": lambda m: ANIL(m, inner_lr=0.1, inner_steps=2),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.1, inner_steps=1),
    "reptile": lambda m: Reptile(m, inner_lr=0.1, inner_steps=2),
    "protonet": lambda m: ProtoNet(m.encoder),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("train_mode", [True, False])
def test_running_stats_untouched_and_mode_restored(name, train_mode):
    model = _bn_model()
    model.train(train_mode)
    learner = LEARNERS[name](model)
    buffers = _buffers(model)
    sx, sy, qx, qy = random_episode(size=8)
    opt = torch.optim.SGD(learner.parameters(), lr=0.01)
    learner.outer_step(sx, sy, qx, qy, opt)
    learner.adapt(sx, sy)(qx)
    with torch.no_grad():
        learner.meta_loss(sx, sy, qx, qy)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(m.training == train_mode and m.track_running_stats for m in bns)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_transductive_predictions_use_the_batch_statistics(name):
    model = _bn_model()
    learner = LEARNERS[name](model)
    sx, sy, qx, qy = random_episode(size=8)
    predictor = learner.adapt(sx, sy)
    x0 = qx[:1]
    a = predictor(torch.cat([x0, torch.randn(3, 1, 8, 8, 8)]))[0]
    b = predictor(torch.cat([x0, 3 + 2 * torch.randn(3, 1, 8, 8, 8)]))[0]
    assert not torch.allclose(a, b, atol=1e-3), "per-task (batch) statistics should make outputs batch-dependent"
    # train/eval mode of the model does not matter: statistics come from the batch either way
    if name != "reptile":
        model.train()
        loss_train = learner.meta_loss(sx, sy, qx, qy)[0].item()
        model.eval()
        assert learner.meta_loss(sx, sy, qx, qy)[0].item() == pytest.approx(loss_train, rel=1e-5)


def test_frozen_mode_uses_running_statistics():
    model = _bn_model()
    learner = MAML(model, inner_lr=0.1, inner_steps=2, batch_norm="frozen")
    sx, sy, qx, qy = random_episode(size=8)
    predictor = learner.adapt(sx, sy)
    x0 = qx[:1]
    a = predictor(torch.cat([x0, torch.randn(3, 1, 8, 8, 8)]))[0]
    b = predictor(torch.cat([x0, 3 + 2 * torch.randn(3, 1, 8, 8, 8)]))[0]
    torch.testing.assert_close(a, b)
    buffers = _buffers(model)
    learner.meta_loss(sx, sy, qx, qy)[0].backward()
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_monai_resnet_with_batch_norm_in_anil():
    torch.manual_seed(0)
    encoder, dim = monai_backbone("resnet10", widen_factor=0.25)
    model = FewShotClassifier(encoder, dim, 3)
    learner = ANIL(model, inner_lr=0.1, inner_steps=2)
    buffers = _buffers(model)
    sx, sy, qx, qy = random_episode(size=16)
    metrics = learner.outer_step(sx, sy, qx, qy, torch.optim.SGD(learner.parameters(), lr=0.01))
    assert set(metrics) == {"loss", "accuracy"}
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
