"""Reptile: the outer update moves the initialisation toward the adapted weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from monai_metalearn.learners import Reptile
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

from .synthetic import random_episode


def _model() -> FewShotClassifier:
    return FewShotClassifier(ConvEncoder3D(features=(4, 8)), 8, 3, zero_init_head=False)


def _manual_sgd(model, x, y, lr, steps):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (x,)), y), list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("epsilon", [1.0, 0.5])
def test_outer_step_interpolates_toward_adapted_weights(epsilon):
    torch.manual_seed(0)
    model = _model()
    sx, sy, qx, qy = random_episode(size=8)
    learner = Reptile(model, inner_lr=0.1, inner_steps=3, epsilon=epsilon, inner_on_query=False)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = learner.adapt(sx, sy).params
    manual = _manual_sgd(model, sx, sy, 0.1, 3)
    for n in theta:
        torch.testing.assert_close(phi[n], manual[n])
        assert not torch.equal(phi[n], theta[n])
    metrics = learner.outer_step(sx, sy, qx, qy, optimizer=None)
    assert set(metrics) == {"loss", "accuracy"}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] + epsilon * (phi[n] - theta[n]))


def test_inner_loop_trains_on_support_and_query_by_default():
    torch.manual_seed(1)
    model = _model()
    sx, sy, qx, qy = random_episode(size=8)
    learner = Reptile(model, inner_lr=0.1, inner_steps=2, epsilon=1.0)
    expected = _manual_sgd(model, torch.cat([sx, qx]), torch.cat([sy, qy]), 0.1, 2)
    learner.outer_step(sx, sy, qx, qy)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n])


def test_optimizer_update_matches_interpolation():
    torch.manual_seed(2)
    episode = random_episode(size=8)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    Reptile(a, inner_lr=0.1, inner_steps=2, epsilon=0.5).outer_step(*episode)
    learner_b = Reptile(b, inner_lr=0.1, inner_steps=2, outer_update="optimizer")
    learner_b.outer_step(*episode, torch.optim.SGD(learner_b.parameters(), lr=0.5))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    with pytest.raises(ValueError, match="needs an optimizer"):
        learner_b.outer_step(*episode)


def test_meta_batch_step_moves_to_mean_of_adapted_weights():
    torch.manual_seed(3)
    model = _model()
    learner = Reptile(model, inner_lr=0.1, inner_steps=2, epsilon=1.0, inner_on_query=False)
    episodes = [random_episode(size=8) for _ in range(3)]
    phis = [learner.adapt(e[0], e[1]).params for e in episodes]
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    metrics = learner.meta_batch_step(episodes, opt)
    assert metrics["tasks"] == 3.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), sum(phi[n] for phi in phis) / 3)


def test_adam_inner_optimizer_meta_loss_and_adapt():
    torch.manual_seed(4)
    model = _model()
    sx, sy, qx, qy = random_episode(size=8)
    learner = Reptile(model, inner_lr=0.01, inner_steps=3, inner_optimizer="adam", eval_inner_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    assert not loss.requires_grad and metrics["loss"] == pytest.approx(loss.item())
    predictor = learner.adapt(sx, sy)
    assert predictor(qx).shape == (6, 3)
    # Adam's first step moves every parameter with a non-zero gradient by about lr per step
    delta = max(float((predictor.params[n] - before[n]).abs().max()) for n in before)
    assert 0.01 < delta <= 0.05 + 1e-6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_options_raise():
    model = _model()
    for kwargs, match in [
        ({"inner_optimizer": "rmsprop"}, "inner_optimizer"),
        ({"outer_update": "x"}, "outer_update"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"inner_steps": 0}, "inner_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            Reptile(model, **kwargs)
    assert Reptile(model, outer_lr=0.3).epsilon == 0.3
    with pytest.raises(ValueError, match="at least one"):
        Reptile(model).meta_batch_step([])
